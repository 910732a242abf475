"""The kernel's inotify watch limit, reached for real without touching the machine's limit.

Each scenario runs in a child process inside a new user namespace (unshare), where
/proc/sys/user/max_inotify_watches is that namespace's own limit; the machine-wide one
(/proc/sys/fs/inotify/max_user_watches) is never written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.repo import REPO, environment
from support.tools import require

pytestmark = pytest.mark.needs_root

NAMESPACE_LIMIT = Path("/proc/sys/user/max_inotify_watches")


def in_namespace(limit: int, scenario: str, root: Path) -> dict[str, object]:
    """Run scenario in a new user namespace whose inotify watch limit is limit."""
    unshare = require("unshare", "util-linux")
    outer_namespace = os.readlink("/proc/self/ns/user")
    result = subprocess.run(
        [unshare, "--user", "--map-root-user", sys.executable, __file__],
        input=json.dumps([outer_namespace, limit, scenario, str(root)]),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=environment(),  # this checkout's coapfs for the child
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_watch_limit_demotes_least_recently_used_to_polling(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    outcome = in_namespace(2, "evict", tmp_path)
    assert outcome["watched"] == {"a": False, "b": True, "c": True}
    assert outcome["mode"] == "inotify"
    assert ["reset", "a"] in outcome["reports"]
    assert ["change", "c/prompt"] in outcome["reports"]
    assert ["change", "a/polled"] in outcome["reports"]


def test_watch_limit_with_nothing_to_give_up_switches_to_poll_mode(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    outcome = in_namespace(0, "switch", tmp_path)
    assert outcome["mode"] == "poll"
    assert outcome["watched"] == {"a": False}
    assert ["reset", "."] in outcome["reports"]
    assert ["change", "a/polled"] in outcome["reports"]
    assert outcome["log"] == [
        f"INFO watching {tmp_path} with inotify (ext4)".replace("ext4", outcome["fstype"]),
        f"WARNING watching {tmp_path} by polling every 0.1 s from now on "
        "(inotify watch limit reached (ENOSPC))",
    ]


async def _scenario(name: str, root: Path) -> dict[str, object]:
    from coapfs.config import CacheConfig
    from coapfs.watch import Watcher, filesystem_type

    reports: list[list[str]] = []
    arrived = asyncio.Event()

    def report(kind: str) -> object:
        def callback(path: Path) -> None:
            reports.append([kind, os.path.relpath(path, root)])
            arrived.set()

        return callback

    async def wait_for(kind: str, relative: str) -> None:
        async with asyncio.timeout(5):
            while [kind, relative] not in reports:
                arrived.clear()
                await arrived.wait()

    watcher = Watcher(
        root, report("change"), report("reset"), CacheConfig(mode="auto", poll_interval=0.1)
    )
    watcher.start()
    try:
        if name == "evict":
            for directory in ("a", "b", "c"):
                watcher.watch_directory(root / directory)
            await wait_for("reset", "a")
            (root / "c" / "prompt").write_text("x")
            await wait_for("change", "c/prompt")
            (root / "a" / "polled").write_text("x")
            await wait_for("change", "a/polled")
        else:
            watcher.watch_directory(root / "a")
            await wait_for("reset", ".")
            (root / "a" / "polled").write_text("x")
            await wait_for("change", "a/polled")
        watched = {
            os.path.relpath(path, root): by_inotify
            for path, by_inotify in watcher.watched_directories().items()
        }
        return {
            "mode": watcher.mode,
            "watched": watched,
            "reports": reports,
            "fstype": filesystem_type(root),
        }
    finally:
        watcher.close()


def _child() -> None:
    """In the new user namespace: lower its watch limit, run the scenario, print JSON."""
    outer_namespace, limit, name, root = json.loads(sys.stdin.read())
    if os.readlink("/proc/self/ns/user") == outer_namespace:
        sys.exit("not in a new user namespace: refusing to change a limit")
    NAMESPACE_LIMIT.write_text(str(limit))
    log: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log.append(f"{record.levelname} {record.getMessage()}")

    watch_logger = logging.getLogger("coapfs.watch")
    watch_logger.addHandler(Collect())
    watch_logger.setLevel(logging.INFO)
    outcome = asyncio.run(_scenario(name, Path(root)))
    outcome["log"] = log
    print(json.dumps(outcome))


if __name__ == "__main__":
    _child()
