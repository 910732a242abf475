"""Debian root filesystems and systemd-nspawn containers for building and testing the package.

Why this module exists: the development and CI machines have no systemd as PID 1 and no Docker,
but a real systemd boots inside systemd-nspawn (see shared/notes/systemd-container.md). Everything
here follows that note: the root filesystem comes from mmdebstrap and is cached as a zstd
tarball keyed by a hash of its package list; every container runs on an overlayfs above the
cached tree, so each run starts pristine; nspawn runs in a private mount namespace (tmpfs on
/run/systemd/nspawn) and in cgroups of its own; commands run inside through nsenter; stopping is
`kill -TERM` of the nspawn PID this module recorded, never a process found by name.

Used by packaging/build-deb (a clean trixie build, the way sbuild builds) and tests/test_package.py
(a booted trixie with the .deb installed). Also a small command line, see `python3 container.py -h`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
# Named explicitly (it holds the trixie keys), so no guessing among the host's apt keyrings.
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGING = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("COAPFS_PACKAGING_CACHE", PACKAGING / "cache"))
RUNS = CACHE / "runs"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))
# Inside the container a command sees only the distribution's paths, never the host's environment.
CONTAINER_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "DEBIAN_FRONTEND=noninteractive",
)

# What a booted test system needs: systemd itself, the package's dependencies (so the .deb installs
# offline), libcoap's coap-client as an independent CoAP peer, man-db, with which
# `systemd-analyze verify` checks the unit's Documentation=man: pages, and autopkgtest, which
# runs debian/tests against the installed package (`autopkgtest ... -- null`), with dpkg-dev,
# which it needs to prepare an unbuilt source tree (dpkg-source --before-build), as Debian's CI
# prepares the source package.
RUNTIME_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-aiocoap",
    "python3-sdnotify",
    "python3-pyinotify",
    "python3-daemon",
    "python3-cbor2",
    "python3-cryptography",
    "python3-filelock",
    "libcoap3-bin",
    "man-db",
    "autopkgtest",
    "dpkg-dev",
)

# The build user, as sbuild has one: the package is built and its tests run without root.
BUILD_USER = "builder"
BUILD_UID = 1000


class ContainerError(RuntimeError):
    """A container could not be created, booted or driven."""


def log(message: str) -> None:
    """Progress goes to stderr, so stdout stays clean for callers that capture it."""
    print(f"[container] {message}", file=sys.stderr, flush=True)


def rootfs_key(packages: Sequence[str], hooks: Sequence[str] = ()) -> str:
    """Cache key: suite, mirror, the sorted package list and any customize hooks."""
    text = "\n".join([SUITE, MIRROR, *sorted(set(packages)), *hooks])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise concurrent runs that want the same cached tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_rootfs(packages: Sequence[str], hooks: Sequence[str] = ()) -> Path:
    """Return an unpacked trixie root filesystem with `packages`, creating and caching it if needed.

    The tarball `CACHE/<key>.tar.zst` is the cache; `CACHE/<key>/` is its unpacked copy, used
    read-only as the lower layer of every overlay. Only the first run for a package list needs the
    network (Debian's archive).
    """
    key = rootfs_key(packages, hooks)
    tarball = CACHE / f"rootfs-{key}.tar.zst"
    tree = CACHE / f"rootfs-{key}"
    stamp = CACHE / f"rootfs-{key}.unpacked"
    with _locked(CACHE / f"rootfs-{key}.lock"):
        if stamp.exists():
            return tree
        if not tarball.exists():
            _mmdebstrap(packages, hooks, tarball)
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir(parents=True)
        started = time.monotonic()
        subprocess.run(
            ["tar", "--zstd", "-xpf", tarball, "--numeric-owner", "--xattrs", "-C", tree],
            check=True,
        )
        log(f"unpacked {tarball.name} in {time.monotonic() - started:.1f} s")
        stamp.touch()
    return tree


def _mmdebstrap(packages: Sequence[str], hooks: Sequence[str], tarball: Path) -> None:
    """Create the tarball. --skip=cleanup/apt/lists keeps the apt lists for offline installs."""
    partial = tarball.with_name(tarball.name + ".partial.tar.zst")
    cmd = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=tar",
        "--skip=cleanup/apt/lists",
        f"--keyring={KEYRING}",
        "--include=" + ",".join(sorted(set(packages))),
        *(f"--customize-hook={hook}" for hook in hooks),
        SUITE,
        str(partial),
        MIRROR,
    ]
    log(f"creating {tarball.name}: {shlex.join(cmd)}")
    started = time.monotonic()
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        partial.unlink(missing_ok=True)
        raise ContainerError(f"mmdebstrap failed: {e}") from e
    partial.rename(tarball)
    size = tarball.stat().st_size / 1e6
    log(f"created {tarball.name} ({size:.0f} MB) in {time.monotonic() - started:.0f} s")


def build_rootfs(build_depends: Sequence[str]) -> Path:
    """The clean build environment: build-essential, the Build-Depends, lintian and a build user."""
    packages = ["build-essential", "lintian", *build_depends]
    hooks = [f'chroot "$1" useradd --create-home --uid {BUILD_UID} {BUILD_USER}']
    return ensure_rootfs(packages, hooks)


def runtime_rootfs() -> Path:
    """The test system: a bootable trixie with everything the package depends on."""
    return ensure_rootfs(RUNTIME_PACKAGES)


PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM (an orderly poweroff of nspawn) if our caller dies, so
    a killed test run leaves no container behind. It survives the exec into nspawn."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def prune_stale_runs() -> None:
    """Remove run directories and cgroups left by runs whose process is gone (killed runs).

    A run is named coapfs-<pid of its creator>-<random>; one whose creator still exists is left
    alone, even if that pid may have been reused: pruning is conservative.
    """
    if not RUNS.exists():
        return
    for run in RUNS.iterdir():
        parts = run.name.split("-")
        if len(parts) != 3 or parts[0] != "coapfs" or not parts[1].isdigit():
            continue
        if Path(f"/proc/{parts[1]}").exists():
            continue
        log(f"removing stale run {run.name}")
        for root in CGROUP_ROOTS:
            _remove_cgroup(root / run.name)
        shutil.rmtree(run, ignore_errors=True)


class Container:
    """A systemd-nspawn container on an overlay of a cached root filesystem.

    With boot=True the container's own systemd runs as its PID 1 and `run` enters it with nsenter.
    With boot=False `command` is the container's only program (used for the package build), and
    `wait` returns its exit code.
    """

    def __init__(
        self,
        lower: Path,
        *,
        boot: bool = True,
        command: Sequence[str] = (),
        binds: Sequence[tuple[Path, str]] = (),
        setenv: Sequence[str] = (),
    ) -> None:
        self.lower = lower
        self.boot = boot
        self.command = list(command)
        self.binds = list(binds)
        self.setenv = list(setenv)
        self.name = f"coapfs-{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = RUNS / self.name
        self.merged = self.dir / "merged"
        self.process: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        self.cgroups = [root / self.name for root in CGROUP_ROOTS]

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Mount the overlay and launch nspawn in its own mount namespace and cgroups."""
        prune_stale_runs()
        for sub in ("upper", "work", "merged"):
            (self.dir / sub).mkdir(parents=True)
        for cgroup in self.cgroups:
            cgroup.mkdir()
        nspawn = [
            "systemd-nspawn",
            f"--directory={self.merged}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--link-journal=no",
            *(f"--bind={host}:{inside}" for host, inside in self.binds),
            *(f"--setenv={item}" for item in self.setenv),
        ]
        if self.boot:
            nspawn += ["--boot", "--console=read-only"]
        else:
            nspawn += ["--console=pipe", "--as-pid2", "--", *self.command]
        overlay = f"lowerdir={self.lower},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"
        # The shell joins the cgroups and mounts, then replaces itself with nspawn: the PID that
        # Popen records is nspawn's own PID, the one `stop` signals. The mounts live and die with
        # the private mount namespace.
        script = "\n".join(
            [
                "set -e",
                *(f"echo $$ > {shlex.quote(str(c / 'cgroup.procs'))}" for c in self.cgroups),
                "mkdir -p /run/systemd/nspawn",
                "mount -t tmpfs tmpfs /run/systemd/nspawn",
                f"mount -t overlay overlay -o {shlex.quote(overlay)}"
                f" {shlex.quote(str(self.merged))}",
                'exec "$@"',
            ]
        )
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        # A booted container's console (boot messages, nspawn's notices) goes to a log that
        # errors quote; a command's output passes through to the caller.
        console = (self.dir / "console.log").open("wb") if self.boot else None
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *nspawn],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=console,
            preexec_fn=_terminate_with_parent,
        )
        log(f"{self.name}: nspawn PID {self.process.pid}")

    def wait_booted(self, timeout: float = 60.0) -> None:
        """Find the container's init and poll until systemd reports the system is up."""
        deadline = time.monotonic() + timeout
        while self.init_pid is None:
            self._check_alive()
            self.init_pid = self._find_init()
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.name}: no init process after {timeout} s")
            time.sleep(0.1)
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                log(f"{self.name}: system {state}")
                return
            time.sleep(0.2)
        raise ContainerError(f"{self.name}: system still {state!r} after {timeout} s")

    def wait(self, timeout: float) -> int:
        """For boot=False: wait for the command to finish and return its exit code."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Orderly poweroff through SIGTERM to nspawn, then remove the run directory and cgroups."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no poweroff after {timeout} s, killing nspawn")
                self.process.kill()
                self.process.wait(10)
        for root in self.cgroups:
            _remove_cgroup(root)
        if self.dir.exists():
            shutil.rmtree(self.dir)

    def __enter__(self) -> Container:
        try:
            self.start()
            if self.boot:
                self.wait_booted()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside ------------------------------------------------------------------------------------

    def run(
        self,
        command: Sequence[str] | str,
        *,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` (a list, or a string for /bin/sh) inside the booted container."""
        if self.init_pid is None:
            raise ContainerError(f"{self.name}: not booted")
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        full = ["nsenter", f"--target={self.init_pid}", "--all", "--", "env", "-i", *CONTAINER_ENV]
        result = subprocess.run(
            [*full, *argv],
            input=input.decode() if isinstance(input, bytes) else input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ContainerError(
                f"{self.name}: {argv} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def path(self, inside: str) -> Path:
        """A host path to a file inside the running container (its root seen through /proc)."""
        if self.init_pid is None:
            raise ContainerError(f"{self.name}: not booted")
        return Path(f"/proc/{self.init_pid}/root") / inside.lstrip("/")

    # -- internals ---------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            console = self.dir / "console.log"
            tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
            raise ContainerError(f"{self.name}: nspawn exited {self.process.returncode}\n{tail}")

    def _find_init(self) -> int | None:
        """The container's init: a child of nspawn whose PID in its own namespace is 1."""
        assert self.process is not None
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            for pid in children.read_text().split():
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
                if nspid.split()[-1] == "1" and len(nspid.split()) > 2:
                    return int(pid)
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass
        return None


def _remove_cgroup(path: Path) -> None:
    """Remove a cgroup tree bottom-up (nspawn and the container's systemd create children)."""
    if not path.exists():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def main(argv: list[str] | None = None) -> int:
    """Manual use: create the test rootfs, or boot it and open a shell inside."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["rootfs", "shell"])
    opts = parser.parse_args(argv)
    tree = runtime_rootfs()
    if opts.action == "rootfs":
        print(tree)
        return 0
    with Container(tree) as container:
        assert container.init_pid is not None
        return subprocess.run(
            ["nsenter", f"--target={container.init_pid}", "--all", "--", "/bin/bash", "-l"]
        ).returncode


if __name__ == "__main__":
    raise SystemExit(main())
