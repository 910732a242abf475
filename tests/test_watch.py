"""The watcher on real inotify and real directories, driven by a real asyncio loop.

Waits are generous (5 s) and assert arrival only; latency is measured in bench/.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from coapfs.config import CacheConfig
from coapfs.watch import Watcher, filesystem_type, inotify_sees_all_changes

from support.polling import wait_until_async

WAIT = 5.0


class Recorder:
    """Collects the watcher's reports and lets a test wait for one."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, Path]] = []
        self.history: list[tuple[str, Path]] = []  # every report, never consumed
        self._arrived = asyncio.Event()

    def change(self, path: Path) -> None:
        self.reports.append(("change", path))
        self.history.append(("change", path))
        self._arrived.set()

    def reset(self, path: Path) -> None:
        self.reports.append(("reset", path))
        self.history.append(("reset", path))
        self._arrived.set()

    async def wait_for(self, kind: str, path: Path, timeout: float = WAIT) -> None:
        """Wait until (kind, path) has been reported, and consume that report."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (kind, path) not in self.reports:
            self._arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {kind} for {path} within {timeout} s: {self.reports}")
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                continue
        self.reports.remove((kind, path))

    def seen(self, kind: str, path: Path) -> bool:
        return (kind, path) in self.reports


def pyinotify_complaints(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pyinotify" and r.levelno >= logging.WARNING
    ]


Scenario = Callable[[Watcher, Recorder], Awaitable[None]]


def run(root: Path, scenario: Scenario, **options: object) -> tuple[Watcher, Recorder]:
    """Run scenario on a fresh loop with a started watcher on root; close it afterwards."""

    async def main() -> tuple[Watcher, Recorder]:
        recorder = Recorder()
        watcher = Watcher(root, recorder.change, recorder.reset, CacheConfig(**options))
        watcher.start()
        try:
            await asyncio.wait_for(scenario(watcher, recorder), 60)
        finally:
            watcher.close()
        return watcher, recorder

    return asyncio.run(main())


async def settle(recorder: Recorder, marker_dir: Path) -> None:
    """Let every earlier event be reported: a fresh marker file's report comes after them."""
    marker = marker_dir / f".marker-{len(recorder.reports)}-{os.urandom(4).hex()}"
    marker.write_bytes(b"")
    await recorder.wait_for("change", marker)
    marker.unlink()
    await recorder.wait_for("change", marker)
    recorder.reports.clear()


@pytest.fixture(params=["inotify", "poll"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def options_for(mode: str) -> dict[str, object]:
    return {"mode": mode, "poll_interval": 0.1}


def test_write_and_close_reports_the_file(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "file.txt"
    target.write_text("old")

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        assert watcher.watch_directory(tmp_path) is (mode == "inotify")
        await settle(recorder, tmp_path)
        with open(target, "a") as stream:
            stream.write(" and new")
        await recorder.wait_for("change", target)

    run(tmp_path, scenario, **options_for(mode))


def test_rename_over_reports_the_target_and_the_directory(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "target"
    target.write_text("old")
    replacement = tmp_path / "replacement"
    replacement.write_text("new content")

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(tmp_path)
        await settle(recorder, tmp_path)
        os.rename(replacement, target)
        await recorder.wait_for("change", target)
        await recorder.wait_for("change", tmp_path)

    run(tmp_path, scenario, **options_for(mode))


def test_delete_reports_the_file_and_the_directory(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "doomed"
    target.write_text("x")

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(tmp_path)
        await settle(recorder, tmp_path)
        target.unlink()
        await recorder.wait_for("change", target)
        await recorder.wait_for("change", tmp_path)

    run(tmp_path, scenario, **options_for(mode))


def test_create_and_delete_inside_a_watched_subdirectory(tmp_path: Path, mode: str) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(sub)
        await settle(recorder, sub)
        created = sub / "new"
        created.write_text("hello")
        await recorder.wait_for("change", created)
        await recorder.wait_for("change", sub)
        created.unlink()
        await recorder.wait_for("change", created)
        await recorder.wait_for("change", sub)
        nested = sub / "nested"
        nested.mkdir()
        await recorder.wait_for("change", sub)
        nested.rmdir()
        await recorder.wait_for("change", sub)

    run(tmp_path, scenario, **options_for(mode))


def test_deleted_directory_reports_itself_and_is_polled_for_its_return(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        assert watcher.watch_directory(sub)
        await settle(recorder, sub)
        sub.rmdir()
        await recorder.wait_for("change", sub)
        await wait_until_async(  # the kernel's IN_IGNORED follows IN_DELETE_SELF
            lambda: watcher.watched_directories().get(sub) is False,
            WAIT,
            what=f"{sub} polled",
        )
        assert watcher.watched_directories() == {sub: False}
        sub.mkdir()
        await recorder.wait_for("change", sub)
        assert watcher.watch_directory(sub) is True

    run(tmp_path, scenario, mode="inotify", poll_interval=0.1)


def test_directory_renamed_away_reports_itself_without_pyinotify_noise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        assert watcher.watch_directory(sub)
        await settle(recorder, sub)
        os.rename(sub, tmp_path / "elsewhere")
        await recorder.wait_for("change", sub)
        assert watcher.watched_directories() == {sub: False}
        (tmp_path / "elsewhere" / "f").write_text("not at the watched path any more")
        sub.mkdir()
        (sub / "g").write_text("at the watched path again")
        await recorder.wait_for("change", sub / "g")

    caplog.set_level(logging.DEBUG, logger="pyinotify")
    run(tmp_path, scenario, mode="inotify", poll_interval=0.1)
    assert [
        r for r in caplog.records if r.name == "pyinotify" and r.levelno >= logging.WARNING
    ] == []


def test_unwatch_stops_reports_without_pyinotify_noise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    quiet = tmp_path / "quiet"
    loud = tmp_path / "loud"
    quiet.mkdir()
    loud.mkdir()

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(quiet)
        watcher.watch_directory(loud)
        await settle(recorder, quiet)
        (quiet / "before").write_text("queued in the kernel, then unwatched")
        watcher.unwatch_directory(quiet)
        (quiet / "after").write_text("not watched")
        await settle(recorder, loud)  # the kernel reports in order: quiet's would come first
        assert not any(path.parent == quiet or path == quiet for _, path in recorder.reports)
        assert watcher.watched_directories() == {loud: True}

    caplog.set_level(logging.DEBUG, logger="pyinotify")
    run(tmp_path, scenario, mode="inotify")
    assert [
        r for r in caplog.records if r.name == "pyinotify" and r.levelno >= logging.WARNING
    ] == []


def test_unwatch_stops_polling(tmp_path: Path) -> None:
    sub, other = tmp_path / "sub", tmp_path / "other"
    sub.mkdir()
    other.mkdir()

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(sub)
        watcher.watch_directory(other)
        await settle(recorder, sub)
        watcher.unwatch_directory(sub)
        since = len(recorder.history)
        (sub / "unseen").write_text("x")
        await asyncio.sleep(0.5)  # five poll intervals
        await settle(recorder, other)
        assert watcher.watched_directories() == {other: False}
        assert not any(path in (sub, sub / "unseen") for _, path in recorder.history[since:])

    run(tmp_path, scenario, mode="poll", poll_interval=0.1)


def test_watch_budget_demotes_least_recently_used_to_polling(tmp_path: Path) -> None:
    one, two, three = (tmp_path / name for name in ("one", "two", "three"))
    for directory in (one, two, three):
        directory.mkdir()

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        assert watcher.watch_directory(one)
        assert watcher.watch_directory(two)
        assert watcher.watch_directory(three)  # over budget: "one" goes to polling
        await recorder.wait_for("reset", one)
        assert watcher.watched_directories() == {one: False, two: True, three: True}
        # The demoted directory still reports its changes, by polling.
        (one / "polled").write_text("x")
        await recorder.wait_for("change", one / "polled")
        # Using "two" makes "three" the least recently used; "one" comes back to inotify.
        assert watcher.watch_directory(two)
        assert watcher.watch_directory(one)
        await recorder.wait_for("reset", three)
        assert watcher.watched_directories() == {one: True, two: True, three: False}
        (one / "prompt").write_text("x")
        await recorder.wait_for("change", one / "prompt")
        (three / "polled").write_text("x")
        await recorder.wait_for("change", three / "polled")

    run(tmp_path, scenario, mode="inotify", watch_budget=2, poll_interval=0.1)


def test_promotion_reports_changes_made_since_the_last_poll(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "kept").write_text("old")

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(one)
        watcher.watch_directory(two)  # demotes "one"; its next poll is an hour away
        await recorder.wait_for("reset", one)
        (one / "kept").write_text("new and longer")
        (one / "added").write_text("x")
        assert watcher.watch_directory(one)  # promoted: what polling missed is reported
        await recorder.wait_for("change", one / "kept")
        await recorder.wait_for("change", one / "added")
        await recorder.wait_for("change", one)

    run(tmp_path, scenario, mode="inotify", watch_budget=1, poll_interval=3600)


def kernel_watches(watcher: Watcher) -> list[str]:
    """The inotify watches the kernel holds for the watcher, from /proc/self/fdinfo."""
    fd = watcher.inotify_fileno()
    assert fd is not None
    info = Path(f"/proc/self/fdinfo/{fd}").read_text()
    return [line for line in info.splitlines() if line.startswith("inotify wd:")]


@pytest.fixture(params=["symlink-to-subdirectory", "symlink-to-root"])
def two_paths(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """Two paths beneath root to one directory: (the directory, a symlink to it)."""
    if request.param == "symlink-to-subdirectory":
        (tmp_path / "v2").mkdir()
        (tmp_path / "latest").symlink_to("v2")
        return tmp_path / "v2", tmp_path / "latest"
    (tmp_path / "self").symlink_to(".")
    return tmp_path, tmp_path / "self"


def test_two_paths_to_one_directory_share_one_watch_and_its_reports(
    tmp_path: Path, two_paths: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    real, alias = two_paths

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        assert watcher.watch_directory(real)
        assert watcher.watch_directory(alias)
        assert watcher.watched_directories() == {real: True, alias: True}
        assert len(kernel_watches(watcher)) == 1
        await settle(recorder, real)
        (real / "f.txt").write_text("written through one path")
        await recorder.wait_for("change", real / "f.txt")
        await recorder.wait_for("change", alias / "f.txt")
        # Serving both paths over and over (what two observers' renders do) reports nothing.
        since = len(recorder.history)
        for _ in range(100):  # for a second at least
            assert watcher.watch_directory(alias)
            assert watcher.watch_directory(real)
            await asyncio.sleep(0.01)
        assert recorder.history[since:] == []
        assert not any(kind == "reset" for kind, _ in recorder.history)
        assert watcher.watched_directories() == {real: True, alias: True}
        # Unwatching one path leaves the other's reports flowing through the same watch.
        watcher.unwatch_directory(real)
        since = len(recorder.history)
        assert watcher.watched_directories() == {alias: True}
        assert len(kernel_watches(watcher)) == 1
        (alias / "f.txt").write_text("written again")
        await recorder.wait_for("change", alias / "f.txt")
        await settle(recorder, alias)  # anything reported for the unwatched path came first
        assert [
            path
            for _, path in recorder.history[since:]
            if path == real or (path.parent == real and path != alias)
        ] == []
        watcher.unwatch_directory(alias)
        assert watcher.watched_directories() == {}
        assert kernel_watches(watcher) == []

    caplog.set_level(logging.DEBUG, logger="pyinotify")
    run(tmp_path, scenario, mode="inotify")
    assert pyinotify_complaints(caplog) == []


def test_two_paths_to_a_directory_renamed_away_are_both_polled(tmp_path: Path) -> None:
    real, alias = tmp_path / "v2", tmp_path / "latest"
    real.mkdir()
    alias.symlink_to("v2")

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        assert watcher.watch_directory(real)
        assert watcher.watch_directory(alias)
        await settle(recorder, real)
        os.rename(real, tmp_path / "v1")
        await recorder.wait_for("change", real)
        await recorder.wait_for("change", alias)
        assert watcher.watched_directories() == {real: False, alias: False}
        assert kernel_watches(watcher) == []
        real.mkdir()
        (real / "f.txt").write_text("at both paths again")
        await recorder.wait_for("change", real / "f.txt")
        await recorder.wait_for("change", alias / "f.txt")

    run(tmp_path, scenario, mode="inotify", poll_interval=0.1)


def test_two_paths_to_a_deleted_directory_are_both_polled(tmp_path: Path) -> None:
    real, alias = tmp_path / "v2", tmp_path / "latest"
    real.mkdir()
    alias.symlink_to("v2")

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        assert watcher.watch_directory(real)
        assert watcher.watch_directory(alias)
        await settle(recorder, real)
        real.rmdir()
        await recorder.wait_for("change", real)
        await recorder.wait_for("change", alias)
        await wait_until_async(  # the kernel's IN_IGNORED follows IN_DELETE_SELF
            lambda: watcher.watched_directories() == {real: False, alias: False},
            WAIT,
            what="both paths polled",
            details=lambda: str(watcher.watched_directories()),
        )
        real.mkdir()
        await recorder.wait_for("change", real)
        await recorder.wait_for("change", alias)
        assert watcher.watch_directory(alias) is True
        assert watcher.watch_directory(real) is True
        assert len(kernel_watches(watcher)) == 1

    run(tmp_path, scenario, mode="inotify", poll_interval=0.1)


def test_demoting_one_of_two_paths_keeps_the_other_on_inotify(tmp_path: Path) -> None:
    real, alias, other = tmp_path / "v2", tmp_path / "latest", tmp_path / "other"
    real.mkdir()
    other.mkdir()
    alias.symlink_to("v2")

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        assert watcher.watch_directory(alias)
        assert watcher.watch_directory(real)
        assert watcher.watch_directory(other)  # over budget: "latest" goes to polling
        await recorder.wait_for("reset", alias)
        assert watcher.watched_directories() == {alias: False, real: True, other: True}
        assert len(kernel_watches(watcher)) == 2
        (real / "f.txt").write_text("x")
        await recorder.wait_for("change", real / "f.txt")
        await recorder.wait_for("change", alias / "f.txt")  # by polling
        assert not recorder.seen("reset", real)

    run(tmp_path, scenario, mode="inotify", watch_budget=2, poll_interval=0.1)


def test_real_queue_overflow_resets_everything_and_watching_goes_on(tmp_path: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    first, second = tmp_path / "a", tmp_path / "b"

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(tmp_path)
        await settle(recorder, tmp_path)
        # Without yielding to the loop nothing is read; each write queues IN_MODIFY and
        # IN_CLOSE_WRITE, alternating files so the kernel cannot merge them.
        for index in range(limit // 2 + 100):
            with open(first if index % 2 else second, "wb") as stream:
                stream.write(b"x")
        await recorder.wait_for("reset", tmp_path)
        (tmp_path / "afterwards").write_text("x")
        await recorder.wait_for("change", tmp_path / "afterwards")

    run(tmp_path, scenario, mode="inotify")


def test_simulated_overflow_resets_everything(tmp_path: Path, mode: str) -> None:
    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(tmp_path)
        watcher.simulate_overflow()
        assert recorder.reports == [("reset", tmp_path)]
        await settle(recorder, tmp_path)

    run(tmp_path, scenario, **options_for(mode))


def test_name_that_is_not_utf8_is_reported_and_nothing_after_it_lost(tmp_path: Path) -> None:
    """The kernel's records are decoded here, a name that is not UTF-8 with its bytes kept as
    surrogates (pyinotify's own reader failed on it, losing every record after it)."""

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(tmp_path)
        await settle(recorder, tmp_path)
        with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9"), "wb") as stream:
            stream.write(b"latin-1 name")
        (tmp_path / "after.txt").write_text("the next record")
        await recorder.wait_for("change", Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")))
        await recorder.wait_for("change", tmp_path / "after.txt")
        await recorder.wait_for("change", tmp_path)
        await settle(recorder, tmp_path)

    run(tmp_path, scenario, mode="inotify")


def test_directory_named_not_utf8_is_polled(tmp_path: Path) -> None:
    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"dir\xff")))
    odd.mkdir()

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        assert watcher.watch_directory(odd) is False
        (odd / "f").write_text("x")
        await recorder.wait_for("change", odd / "f")

    run(tmp_path, scenario, mode="inotify", poll_interval=0.1)


def test_bad_paths_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        with pytest.raises(ValueError):
            watcher.watch_directory(tmp_path.parent)
        with pytest.raises(NotADirectoryError):
            watcher.watch_directory(tmp_path / "file")
        with pytest.raises(FileNotFoundError):
            watcher.watch_directory(tmp_path / "missing")
        assert watcher.watched_directories() == {}

    run(tmp_path, scenario, mode="inotify")


def test_no_reports_after_close(tmp_path: Path, mode: str) -> None:
    async def main() -> None:
        recorder = Recorder()
        watcher = Watcher(
            tmp_path, recorder.change, recorder.reset, CacheConfig(**options_for(mode))
        )
        watcher.start()
        watcher.watch_directory(tmp_path)
        (tmp_path / "f").write_text("x")
        watcher.close()
        await asyncio.sleep(0.5)
        assert recorder.reports == []

    asyncio.run(main())


def test_mode_is_logged_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        pass

    caplog.set_level(logging.INFO, logger="coapfs.watch")
    assert run(tmp_path, scenario, mode="auto")[0].mode == "inotify"
    assert run(tmp_path, scenario, mode="poll", poll_interval=3)[0].mode == "poll"
    messages = [r.getMessage() for r in caplog.records if r.name == "coapfs.watch"]
    assert messages == [
        f"watching {tmp_path} with inotify ({filesystem_type(tmp_path)})",
        f"watching {tmp_path} by polling every 3 s (configured)",
    ]


def mount_types() -> dict[str, str]:
    """Mount point -> filesystem type from /proc/self/mountinfo; later mounts hide earlier."""
    types: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        mount_point = before.split()[4].encode().decode("unicode_escape")
        types[mount_point] = after.split()[0]
    return types


def test_statfs_type_of_root_matches_mountinfo() -> None:
    expected = mount_types()["/"]
    same_magic = {"ext2": "ext4", "ext3": "ext4"}
    assert filesystem_type(Path("/")) == same_magic.get(expected, expected)


def test_statfs_type_of_a_tmpfs() -> None:
    tmpfs = [point for point, kind in mount_types().items() if kind == "tmpfs"]
    assert tmpfs, "no tmpfs mounted (Debian mounts /dev/shm and /run as tmpfs)"
    point = Path("/dev/shm") if "/dev/shm" in tmpfs else Path(tmpfs[0])
    assert filesystem_type(point) == "tmpfs"
    assert inotify_sees_all_changes(point) == (True, "tmpfs")


def test_watching_on_a_tmpfs(mode: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as name:
        root = Path(name)

        async def scenario(watcher: Watcher, recorder: Recorder) -> None:
            watcher.watch_directory(root)
            (root / "f").write_text("x")
            await recorder.wait_for("change", root / "f")

        run(root, scenario, **options_for(mode))


def test_a_storm_of_creations_is_folded_into_resets_of_the_directory(tmp_path: Path) -> None:
    """Thousands of new entries at once cost a few reports, not one each: the watcher folds a
    crowded directory's entries into one reset of it (and reads the kernel's queue in bounded
    slices, so the loop keeps turning meanwhile)."""
    storm = tmp_path / "storm"
    storm.mkdir()

    async def scenario(watcher: Watcher, recorder: Recorder) -> None:
        watcher.watch_directory(storm)
        for i in range(3000):
            (storm / f"f{i}").write_bytes(b"")
        await recorder.wait_for("reset", storm)
        await asyncio.sleep(1)  # the rest of the kernel's queue
        changes = [p for kind, p in recorder.history if kind == "change" and p.parent == storm]
        assert len(changes) < 1500, len(changes)
        (storm / "quiet.txt").write_text("one change, reported as such again")
        await recorder.wait_for("change", storm / "quiet.txt")

    run(tmp_path, scenario, mode="inotify")
