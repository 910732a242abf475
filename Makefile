# Every target is a thin wrapper: the logic lives in the scripts it names.
PYTHON ?= python3

.PHONY: run test lint deb systemtest bench

run:
	$(PYTHON) -m coapfs

test: lint
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check coapfs tests bench packaging
	$(PYTHON) -m ruff format --check coapfs tests bench packaging

deb:
	packaging/build-deb

systemtest:
	$(PYTHON) -m pytest -q tests/test_package.py

bench:
	$(PYTHON) bench/run.py
