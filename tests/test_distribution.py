"""What is released: one version everywhere, and a wheel that holds the whole package."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import coapfs

from support.repo import REPO
from support.tools import missing, require

CACHES = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache")


def not_sources(directory: str, names: list[str]) -> set[str]:
    """What a build of the checkout must not see: version control, build output, caches (the
    packaging cache holds whole root file systems), virtual environments."""
    ignored = set(CACHES(directory, names))
    where = Path(directory).relative_to(REPO)
    if where == Path("."):
        ignored |= {n for n in names if n in (".git", "build", "dist") or n.startswith(".venv")}
    elif where == Path("packaging"):
        ignored |= {"cache"} & set(names)
    return ignored


# In the unpacked wheel alone: import every module, say where each came from, and run the
# command (`python -m coapfs --version`, which imports coapfs.__main__).
IMPORT_ALL = """
import importlib, json, runpy, sys
files = {name: importlib.import_module(name).__file__ for name in json.loads(sys.argv[1])}
print(json.dumps({"files": files, "path": sys.path}))
sys.argv = ["coap-fileserver", "--version"]
runpy.run_module("coapfs", run_name="__main__")
"""


def modules(names: list[str]) -> set[str]:
    """Module names of the .py files below coapfs/ among `names` (relative paths)."""
    modules = set()
    for name in names:
        parts = Path(name).parts
        if parts[0] == "coapfs" and name.endswith(".py"):
            dotted = ".".join(parts)[: -len(".py")]
            modules.add(dotted.removesuffix(".__init__"))
    return modules


def test_debian_changelog_names_the_version_of_the_code() -> None:
    """The package's version is coapfs.__version__ (which pyproject.toml reads), as dpkg reads
    debian/changelog's newest entry."""
    parse = require("dpkg-parsechangelog", "dpkg-dev")
    newest = subprocess.run(
        [parse, "-l", str(REPO / "debian" / "changelog"), "-S", "Version"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert newest == coapfs.__version__


def wheel_tools() -> None:
    """pip, and setuptools able to build a wheel without build isolation (from 70.1 on by
    itself, before with the wheel package)."""
    try:
        importlib.metadata.version("pip")
        setuptools = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError as e:
        missing(f"{e.name} is not installed (needed to build the wheel)")
    major, minor = (int(part) for part in setuptools.split(".")[:2])
    if (major, minor) < (70, 1):
        try:
            importlib.metadata.version("wheel")
        except importlib.metadata.PackageNotFoundError:
            missing(f"setuptools {setuptools} builds a wheel only with `wheel` (pip install wheel)")


@pytest.mark.needs_pip
def test_the_wheel_ships_and_imports_every_module(tmp_path: Path) -> None:
    """Every module under coapfs/ is in the wheel (and nothing else of coapfs), and each one
    imports from the unpacked wheel alone, with the checkout nowhere on sys.path."""
    wheel_tools()
    source, out, unpacked, empty = (tmp_path / d for d in ("source", "out", "unpacked", "empty"))
    # A copy, so that no build/ or *.egg-info of an earlier build leaks in (or is left behind).
    shutil.copytree(REPO, source, ignore=not_sources, symlinks=True)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*build, "--no-index", "-w", str(out), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob(f"coap_fileserver-{coapfs.__version__}-*.whl")  # the version, too
    with zipfile.ZipFile(wheel) as archive:
        shipped = modules(archive.namelist())
        archive.extractall(unpacked)

    in_repo = modules([str(p.relative_to(REPO)) for p in (REPO / "coapfs").rglob("*.py")])
    assert shipped == in_repo

    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, json.dumps(sorted(in_repo - {"coapfs.__main__"}))],
        cwd=empty,
        env={**env, "PYTHONPATH": str(unpacked)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report, version = result.stdout.splitlines()
    seen = json.loads(report)
    assert version == f"coap-fileserver {coapfs.__version__}"
    outside = {n: f for n, f in seen["files"].items() if not Path(f).is_relative_to(unpacked)}
    assert outside == {}, "imported from elsewhere than the wheel"
    # The checkout is nowhere on the path (the environment may live in it: .venv).
    environment = Path(sys.prefix).resolve()
    assert not [
        p
        for p in seen["path"]
        if p
        and Path(p).resolve().is_relative_to(REPO)
        and not Path(p).resolve().is_relative_to(environment)
    ]
