"""Observe (RFC 7641) driven by real inotify: every change kind notifies with fresh content and a
fresh ETag, bursts stay bounded, deletion ends the observation with 4.04, large listings are
notified block-wise; and the cache never serves what a processed change made stale."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers import codes
from aiocoap.optiontypes import BlockOption
from aiocoap.util.linkformat import parse

from support.observer import Observer
from support.polling import wait_until


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "file.txt").write_text("version 1")
    return root


@pytest.fixture
def server(root, start_server):
    return start_server(root)


def test_write_and_close_notifies_with_new_content_and_etag(client, server, root):
    obs = Observer(client, server.uri("file.txt"))
    assert obs.first.code == codes.CONTENT and obs.first.opt.observe is not None
    (root / "file.txt").write_text("version 2")
    n = obs.wait_for(lambda m: m.payload == b"version 2")
    assert n is not None, obs.notifications
    assert n.opt.etag != obs.first.opt.etag
    assert client.get(server.uri("file.txt")).payload == b"version 2"
    obs.cancel()


def test_rename_over_notifies(client, server, root):
    obs = Observer(client, server.uri("file.txt"))
    (root / "new.tmp").write_text("renamed over")
    os.rename(root / "new.tmp", root / "file.txt")
    assert obs.wait_for(lambda m: m.payload == b"renamed over") is not None
    obs.cancel()


def test_delete_sends_4_04_and_ends_the_observation(client, server, root):
    obs = Observer(client, server.uri("file.txt"))
    (root / "file.txt").unlink()
    assert obs.wait_ended()
    final = obs.notifications[-1] if obs.notifications else obs.ended.coapmessage
    assert final.code == codes.NOT_FOUND and final.payload


def test_directory_observers_see_creation_and_deletion(client, server, root):
    obs = Observer(client, server.uri("dir/"))
    assert obs.first.payload == b""
    (root / "dir" / "a.txt").write_text("a")
    assert obs.wait_for(lambda m: b"</dir/a.txt>" in m.payload) is not None
    (root / "dir" / "a.txt").unlink()
    n = obs.wait_for(lambda m: m.payload == b"" and m is not obs.notifications[0])
    assert n is not None, [m.payload for m in obs.notifications]
    (root / "dir" / "sub").mkdir()
    assert obs.wait_for(lambda m: b"</dir/sub/>;ct=40" in m.payload) is not None
    obs.cancel()


def test_a_burst_of_1000_files_gives_a_bounded_handful_of_notifications(client, server, root):
    src = root.parent / "src"
    src.mkdir()
    for i in range(1000):
        (src / f"f{i:04d}").write_text(str(i))
    # Block 0 of each notification only: a client assembling the rest mid-burst would see the
    # listing change under it (a new ETag) and, as RFC 7959 wants, give that notification up.
    obs = Observer(client, server.uri("dir/"), blockwise=False)
    for f in sorted(src.iterdir()):
        shutil.copy(f, root / "dir" / f.name)
    final = client.get(server.uri("dir/"))
    assert len(parse(final.payload.decode()).links) == 1000
    assert obs.wait_for(lambda m: m.opt.etag == final.opt.etag, timeout=10) is not None, (
        "the last notification carries the complete listing"
    )
    time.sleep(1)  # let stragglers arrive before counting
    assert 1 <= len(obs.notifications) <= 25, len(obs.notifications)
    for n in obs.notifications:
        assert n.code == codes.CONTENT
        assert n.opt.block2 is None or n.opt.block2.block_number == 0
    obs.cancel()


def test_large_listing_notifications_come_block_wise(client, server, root):
    for i in range(200):
        (root / "dir" / f"long-file-name-{i:04d}.txt").write_text("x")
    obs = Observer(client, server.uri("dir/"))
    assert len(parse(obs.first.payload.decode()).links) == 200
    (root / "dir" / "one-more.txt").write_text("x")
    n = obs.wait_for(lambda m: b"one-more.txt" in m.payload)
    assert n is not None
    # The client assembled the notification from several blocks, all of it parseable.
    assert len(n.payload) > 1024
    assert len(parse(n.payload.decode()).links) == 201
    obs.cancel()


def test_change_during_block_wise_transfer_shows_as_new_etag(client, server, root):
    (root / "big.bin").write_bytes(os.urandom(200_000))
    first = client.get(server.uri("big.bin"), block2=BlockOption.BlockwiseTuple(0, False, 6))
    with open(root / "big.bin", "r+b") as f:
        f.write(b"changed")
    second = client.get(server.uri("big.bin"), block2=BlockOption.BlockwiseTuple(1, False, 6))
    assert second.opt.etag != first.opt.etag


def test_cached_listing_and_file_never_outlive_a_change(client, server, root):
    for round_ in range(20):
        listing = client.get(server.uri("dir/")).payload
        content = client.get(server.uri("file.txt")).payload
        assert content == f"round {round_ - 1}".encode() if round_ else b"version 1"
        assert f"</dir/r{round_}>".encode() not in listing
        (root / "dir" / f"r{round_}").write_text("x")
        (root / "file.txt").write_text(f"round {round_}")
        entry = f"</dir/r{round_}>".encode()
        wait_until(
            lambda entry=entry: entry in client.get(server.uri("dir/")).payload,
            what="the new entry appears in the listing",
            interval=0,
        )
        assert client.get(server.uri("file.txt")).payload == f"round {round_}".encode()


def test_poll_mode_by_configuration_keeps_responses_and_observe_correct(
    client, start_server, root, tmp_path
):
    config = tmp_path / "poll.toml"
    config.write_text('[cache]\nmode = "poll"\npoll_interval = 0.2\n')
    server = start_server(root, "--config", str(config))
    assert client.get(server.uri("file.txt")).payload == b"version 1"
    obs = Observer(client, server.uri("file.txt"))
    (root / "file.txt").write_text("polled change")
    # Without inotify the server validates by stat on every request...
    assert client.get(server.uri("file.txt")).payload == b"polled change"
    # ...and notifies observers from its polling.
    assert obs.wait_for(lambda m: m.payload == b"polled change") is not None
    obs.cancel()


def test_observation_of_missing_file_is_4_04(client, server):
    async def observe_missing() -> aiocoap.Message:
        request = client.context.request(
            aiocoap.Message(code=aiocoap.GET, uri=server.uri("missing"), observe=0)
        )
        return await request.response

    r = client.run(observe_missing())
    assert r.code == codes.NOT_FOUND


def test_many_observers_on_one_file(client, server, root):
    observers = [Observer(client, server.uri("file.txt")) for _ in range(5)]
    (root / "file.txt").write_text("for everyone")
    for obs in observers:
        assert obs.wait_for(lambda m: m.payload == b"for everyone") is not None
        obs.cancel()


def test_a_costly_resource_is_notified_at_most_once_per_ten_renderings() -> None:
    """A listing that takes long to render (tens of thousands of entries) and changes all the
    time is notified less often, so rendering it never takes more than a tenth of the time."""
    from coapfs.protocol.observe import COST_FACTOR, Observations

    class Observation:
        def __init__(self) -> None:
            self.times: list[float] = []

        def trigger(self) -> None:
            self.times.append(asyncio.get_running_loop().time())

    async def scenario() -> list[float]:
        observations = Observations(coalesce=0.01)
        observer = Observation()
        observations.add(("big",), observer)
        observations.rendered(("big",), 0.02)  # 20 ms a rendering: at most one per 200 ms
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while loop.time() < end:
            observations.changed(("big",))
            await asyncio.sleep(0.005)
        observations.close()
        return observer.times

    times = asyncio.run(scenario())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 2 <= len(times) <= 6, times
    assert min(gaps) >= COST_FACTOR * 0.02 - 0.005, gaps
