# Every target is a thin wrapper: the logic lives in the scripts it names.
# .ci/run (packaging/venv) makes .venv: the project and its test tools, nothing in the system Python.
PYTHON ?= .venv/bin/python
# A second interpreter environment with the oldest aiocoap we support (Debian 13 ships 0.4.14);
# .ci/run creates it.
OLDEST ?= .venv-aiocoap-0.4.14/bin/python

.PHONY: run test test-oldest lint deb systemtest bench

run:
	$(PYTHON) -m coapfs

# Every test once on the newest aiocoap, the system tests (markers: pyproject.toml) among them.
test: lint test-oldest
	$(PYTHON) -m pytest -q tests

# Everything but the system tests once more on aiocoap 0.4.14 (the system tests install the
# package, whose aiocoap is Debian's 0.4.14).
test-oldest:
	@test -x $(OLDEST) || { echo "missing $(OLDEST): run .ci/run (or set OLDEST=)"; exit 1; }
	$(OLDEST) -m pytest -q -p no:cacheprovider -m "not system" tests

lint:
	$(PYTHON) -m ruff check coapfs tests bench packaging
	$(PYTHON) -m ruff format --check coapfs tests bench packaging
	$(PYTHON) -m mypy

deb:
	packaging/build-deb

systemtest:
	$(PYTHON) -m pytest -q -m system tests

bench:
	$(PYTHON) bench/run.py
