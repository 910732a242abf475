"""A real GlusterFS replica-2 volume on this host, in a namespace of the test's own, mounted
twice with FUSE: what two replicas of a file server share.

Everything runs inside a `Namespace` (network: loopback only; mounts: private): a glusterd with
a private volfile (its state in the volume's directory, listening on 127.0.0.1:24007 — one per
network namespace, so it cannot meet another), its brick and self-heal daemons, and the two FUSE
clients. Inside, /etc/hosts names the bricks' host (`BRICK_HOST`: the CLI refuses `127.0.0.1:`
bricks) and glusterd's fixed paths (/var/log/glusterfs, /var/lib/glusterd, /run/gluster) are bind
mounts of folders in the volume's directory, so nothing is written outside it (but these three
folders, made empty where the packages have not made them). The servers under
test run in the mount namespace only (`enter_mounts`), on the host's loopback, where the test's
client reaches them; the test reads the mounts through `outside`.

Coherence across the mounts needs both `performance.stat-prefetch off` and FUSE mounts without
attribute, entry or negative caching (timeouts 0); with either alone the other mount shows old
sizes and content for about a second. Teardown unmounts, SIGKILLs what the keeper started, and
removes the directory (about 1 s); an orderly `volume stop` would take about 7 s.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from coapfs.syscalls import statfs_type

from support.namespace import Namespace, NamespaceError
from support.repo import REPO
from support.tools import missing, require

BRICK_HOST = "coapfs-gluster"
FUSE_MAGIC = 0x65735546
MOUNT_OPTIONS = ("--attribute-timeout=0", "--entry-timeout=0", "--negative-timeout=0")

_GLUSTERD_VOLFILE = """\
volume management
    type mgmt/glusterd
    option working-directory {dir}/wd
    option run-directory {dir}/run
    option glusterd-sockfile {dir}/run/glusterd.socket
    option transport-type socket
    option transport.socket.bind-address 127.0.0.1
    option transport.address-family inet
    option ping-timeout 0
    option event-threads 1
end-volume
"""

#: glusterd's paths that its volfile cannot move, each replaced inside by a folder of ours.
_FIXED_PATHS = {
    "var-log-glusterfs": Path("/var/log/glusterfs"),
    "var-lib-glusterd": Path("/var/lib/glusterd"),
    "run-gluster": Path("/run/gluster"),
}


class GlusterError(RuntimeError):
    """A step of setting up the volume failed; the message has the step's output and the tail of
    every GlusterFS log."""


def required_tools() -> dict[str, str]:
    """The programs the volume needs (each missing one fails under CI, skips elsewhere)."""
    if os.geteuid() != 0:
        missing("a GlusterFS volume needs root (glusterd, FUSE mounts, namespaces)")
    if not Path("/dev/fuse").exists():
        missing("no /dev/fuse: the kernel offers no FUSE")
    return {
        "glusterd": require("glusterd", "glusterfs-server"),
        "gluster": require("gluster", "glusterfs-cli"),
        "glusterfs": require("glusterfs", "glusterfs-client"),
        "unshare": require("unshare", "util-linux"),
        "nsenter": require("nsenter", "util-linux"),
        "ip": require("ip", "iproute2"),
        "mount": require("mount", "mount"),
        "umount": require("umount", "mount"),
    }


class GlusterVolume:
    """A started replica-2 volume `name` with bricks, state and logs in `directory` (which must
    be empty), mounted `mounts` times; `close()` tears all of it down."""

    def __init__(self, directory: Path, name: str = "coapfs", mounts: int = 2) -> None:
        self.tools = required_tools()
        self.directory = directory
        self.name = name
        self.mounts = [directory / f"mount{i}" for i in range(1, mounts + 1)]
        self.bricks = [directory / "brick1", directory / "brick2"]
        self.timings: dict[str, float] = {}
        self.ns: Namespace | None = None
        started = time.monotonic()
        try:
            self.ns = Namespace(
                directory / "namespace.log",
                unshare=self.tools["unshare"],
                nsenter=self.tools["nsenter"],
            )
            self._isolate()
            self._start_glusterd()
            self._create_volume()
            self._mount()
        except BaseException:
            self.close()
            raise
        self.timings["setup"] = time.monotonic() - started

    # --- what a test uses -------------------------------------------------------------------

    def outside(self, path: Path) -> Path:
        """`path` inside (a mount, a file on it), as the test process reaches it."""
        assert self.ns is not None
        return self.ns.outside(path)

    def enter_mounts(self) -> list[str]:
        """A command prefix that runs a server where it sees the mounts (on the host's network)."""
        assert self.ns is not None
        return self.ns.enter_mounts(REPO)

    def logs(self, lines: int = 15) -> str:
        """The tail of glusterd's, the bricks', the self-heal daemon's and the mounts' logs."""
        tails = []
        logs = sorted(self.directory.glob("*.log")) + sorted(
            (self.directory / "var-log-glusterfs").rglob("*.log")
        )
        for log in logs:
            text = log.read_text(errors="replace").splitlines()[-lines:]
            if text:
                tails.append(f"--- {log.relative_to(self.directory)}\n" + "\n".join(text))
        return "\n".join(tails)

    def close(self) -> None:
        """Unmount, kill what was started for the volume, remove the directory."""
        started = time.monotonic()
        if self.ns is not None:
            for mount in self.mounts:
                self.ns.run(self.tools["umount"], "-l", str(mount), check=False, timeout=10)
            self.killed = self.ns.close()
            self.ns = None
        for entry in list(self.directory.iterdir()) if self.directory.exists() else ():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.timings["teardown"] = time.monotonic() - started

    # --- setting up -------------------------------------------------------------------------

    def _run(self, *argv: str, timeout: float = 30) -> str:
        assert self.ns is not None
        try:
            return self.ns.run(*argv, timeout=timeout).output
        except NamespaceError as e:
            raise GlusterError(f"{e}\n{self.logs()}") from None

    def _gluster(self, *args: str, timeout: float = 30) -> str:
        socket = self.directory / "run" / "glusterd.socket"
        command = (self.tools["gluster"], "--mode=script", f"--glusterd-sock={socket}", *args)
        return self._run(*command, timeout=timeout)

    def _isolate(self) -> None:
        """The namespace's own /etc/hosts and glusterd's fixed paths."""
        hosts = self.directory / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {BRICK_HOST}\n::1 localhost\n")
        self._run(self.tools["mount"], "--bind", str(hosts), "/etc/hosts")
        for folder, fixed in _FIXED_PATHS.items():
            (self.directory / folder).mkdir()
            fixed.mkdir(parents=True, exist_ok=True)  # a package's folder: there if installed
            self._run(self.tools["mount"], "--bind", str(self.directory / folder), str(fixed))

    def _start_glusterd(self) -> None:
        started = time.monotonic()
        for folder in ("wd", "run"):
            (self.directory / folder).mkdir()
        volfile = self.directory / "glusterd.vol"
        volfile.write_text(_GLUSTERD_VOLFILE.format(dir=self.directory))
        self._run(
            self.tools["glusterd"],
            "-f",
            str(volfile),
            "-p",
            str(self.directory / "glusterd.pid"),
            f"--log-file={self.directory / 'glusterd.log'}",
        )
        deadline = time.monotonic() + 20
        while True:
            assert self.ns is not None
            socket = self.directory / "run" / "glusterd.socket"
            listing = self.ns.run(
                self.tools["gluster"],
                "--mode=script",
                f"--glusterd-sock={socket}",
                "pool",
                "list",
                check=False,
                timeout=10,
            )
            if listing.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise GlusterError(
                    f"glusterd does not answer within 20 s: {listing}\n{self.logs()}"
                )
            time.sleep(0.1)
        self.timings["glusterd"] = time.monotonic() - started

    def _create_volume(self) -> None:
        started = time.monotonic()
        bricks = [f"{BRICK_HOST}:{brick}" for brick in self.bricks]
        self._gluster("volume", "create", self.name, "replica", "2", *bricks, "force")
        self._gluster("volume", "set", self.name, "performance.stat-prefetch", "off")
        self._gluster("volume", "start", self.name)
        self.timings["volume"] = time.monotonic() - started

    def _mount(self) -> None:
        started = time.monotonic()
        for mount in self.mounts:
            mount.mkdir()
            self._run(
                self.tools["glusterfs"],
                *MOUNT_OPTIONS,
                "--volfile-server=127.0.0.1",
                f"--volfile-id={self.name}",
                f"--pid-file={mount}.pid",
                f"--log-file={mount}.log",
                str(mount),
            )
        for mount in self.mounts:
            self._wait_mounted(mount)
        self.timings["mounts"] = time.monotonic() - started

    def _wait_mounted(self, mount: Path) -> None:
        seen = self.outside(mount)
        deadline = time.monotonic() + 10
        while True:
            try:
                if statfs_type(seen) == FUSE_MAGIC:
                    os.listdir(seen)
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise GlusterError(f"{mount} is not a FUSE mount within 10 s\n{self.logs()}")
            time.sleep(0.05)
