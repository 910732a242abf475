"""The atheris (libFuzzer) driver of `datagrams.Harness`:

    python tests/fuzz/run.py -max_total_time=60 -artifact_prefix=WORKDIR/ WORKDIR tests/fuzz/corpus

New inputs go to WORKDIR (libFuzzer writes to its first corpus directory), the committed corpus
is only read; an input that breaks an invariant is written as WORKDIR/crash-*. `make fuzz` runs
this for FUZZ_SECONDS. coapfs and aiocoap are instrumented for coverage as they are imported."""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

with atheris.instrument_imports(include=["coapfs", "aiocoap"]):
    from fuzz.datagrams import Harness


def main() -> None:
    harness = Harness()
    atheris.Setup(sys.argv, harness.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
