"""The benchmark's load generators (bench/coapload.c), built on first use with the C compiler.

`coapload gets` (closed-loop small GETs) and `coapload fleet` (devices downloading an image
block by block); why they are C, what they send and count, and what `--tick` does: bench/README.md,
"The load generators". Each run prints one JSON object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "coapload.c"
BUILD = HERE / ".build"
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")


def binary() -> Path:
    """The built program, compiled again whenever the source or the flags change."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    target = BUILD / f"coapload-{key}"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("the benchmark's load generator needs a C compiler: apt install gcc")
    BUILD.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=BUILD, prefix=".coapload-")
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=False
        )
        if done.returncode:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{done.stderr.strip()}")
        os.replace(tmp, target)  # shards building at once: the last rename wins, all equal
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def command(mode: str, *args: str) -> list[str]:
    """argv for one run of `coapload MODE ARGS`."""
    return [str(binary()), mode, *args]
