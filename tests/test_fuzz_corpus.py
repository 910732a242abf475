"""The fuzz corpus replayed (tests/fuzz/datagrams.py, no atheris needed): every committed input
— the seeds of every request kind, what fuzzing found, and the bugs it found (`bug-*`, each
fixed) — keeps every invariant. And the harness does catch what it is there to catch. An input
of a bug not fixed yet goes into tests/fuzz/open-bugs/, replayed as a strict xfail, until the
fix moves it into the corpus."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz.datagrams import Finding, Harness

FUZZ = Path(__file__).parent / "fuzz"
CORPUS = sorted((FUZZ / "corpus").iterdir())
OPEN_BUGS = sorted(p for p in (FUZZ / "open-bugs").glob("*") if not p.name.startswith("."))


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def test_the_corpus_has_a_seed_of_every_kind() -> None:
    assert len([p for p in CORPUS if p.name.startswith("seed-")]) >= 40


@pytest.mark.parametrize("input_file", CORPUS, ids=lambda p: p.name)
def test_corpus_input_keeps_every_invariant(harness: Harness, input_file: Path) -> None:
    harness.run(input_file.read_bytes())


if OPEN_BUGS:

    @pytest.mark.parametrize("input_file", OPEN_BUGS, ids=lambda p: p.name)
    @pytest.mark.xfail(strict=True, raises=Finding, reason="a known bug, see the input's name")
    def test_open_bug_still_breaks_an_invariant(harness: Harness, input_file: Path) -> None:
        harness.run(input_file.read_bytes())


def test_the_harness_sees_an_open_outside_the_root(harness: Harness) -> None:
    with pytest.raises(Finding, match="outside"), harness._confinement():
        os.close(os.open(harness.outside / "secret", os.O_RDONLY))
    with pytest.raises(Finding, match="outside"), harness._confinement():
        (harness.outside / "secret").read_bytes()


def test_the_harness_sees_a_change_to_the_read_only_tree(harness: Harness) -> None:
    victim = harness.roots["read-only"] / "a.txt"
    original = victim.read_bytes()
    victim.write_bytes(b"changed")
    try:
        with pytest.raises(Finding, match="read-only tree changed"):
            harness.run((FUZZ / "corpus" / "seed-get-file").read_bytes())
    finally:
        victim.write_bytes(original)
