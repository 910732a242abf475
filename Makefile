# Every target is a thin wrapper: the logic lives in the scripts it names.
PYTHON ?= python3
# A second interpreter environment with the oldest aiocoap we support (Debian 13 ships 0.4.14);
# .ci/run creates it.
OLDEST ?= .venv-aiocoap-0.4.14/bin/python

.PHONY: run test test-oldest lint deb systemtest bench

run:
	$(PYTHON) -m coapfs

test: lint test-oldest
	$(PYTHON) -m pytest -q tests

# The protocol and daemon tests once more on aiocoap 0.4.14 (the package test covers it in Debian).
test-oldest:
	@test -x $(OLDEST) || { echo "missing $(OLDEST): run .ci/run (or set OLDEST=)"; exit 1; }
	$(OLDEST) -m pytest -q -p no:cacheprovider tests --ignore=tests/test_package.py

lint:
	$(PYTHON) -m ruff check coapfs tests bench packaging
	$(PYTHON) -m ruff format --check coapfs tests bench packaging

deb:
	packaging/build-deb

systemtest:
	$(PYTHON) -m pytest -q tests/test_package.py

bench:
	$(PYTHON) bench/run.py
