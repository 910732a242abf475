# Every target is a thin wrapper: the logic lives in the scripts it names.
# .ci/run (packaging/venv) makes .venv: the project and its test tools, nothing in the system Python.
PYTHON ?= .venv/bin/python
# A second interpreter environment with the oldest aiocoap we support (Debian 13 ships 0.4.14);
# .ci/run creates it.
OLDEST ?= .venv-aiocoap-0.4.14/bin/python

# `make fuzz`: the coverage-guided fuzzer (tests/fuzz/run.py, atheris) for FUZZ_SECONDS; what it
# finds new goes to FUZZ_WORK (crash-* files: inputs that broke an invariant, to be added to
# tests/fuzz/corpus once fixed), the committed corpus is only read.
FUZZ_SECONDS ?= 60
FUZZ_WORK ?= /tmp/coapfs-fuzz

.PHONY: run test test-oldest lint deb systemtest bench fuzz

run:
	$(PYTHON) -m coapfs

# Every test once on the newest aiocoap, the system tests (markers: pyproject.toml) among them;
# then a short fuzzing run (the corpus itself is replayed by the tests, on both aiocoap versions).
test: lint test-oldest
	$(PYTHON) -m pytest -q tests
	$(MAKE) fuzz FUZZ_SECONDS=10

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

fuzz:
	mkdir -p $(FUZZ_WORK)
	$(PYTHON) tests/fuzz/run.py -max_total_time=$(FUZZ_SECONDS) -timeout=20 \
		-artifact_prefix=$(FUZZ_WORK)/ $(FUZZ_WORK) tests/fuzz/corpus
