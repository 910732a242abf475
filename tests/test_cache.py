"""The cache and its watches, looked at from inside a real server (in this process, real UDP,
real inotify): budgets hold, an inotify overflow drops everything, watches go with their last
holder, and responses stay correct throughout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from aiocoap.numbers import codes

from coapfs.tree.cache import Cache, Entry
from coapfs.tree.pathindex import PathIndex

from support.inprocess import InProcess
from support.observer import Observer
from support.polling import wait_until


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for d in range(6):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(5):
            (root / f"d{d}" / f"f{f}.txt").write_text(f"{d}/{f}" * 100)
    return root


@pytest.fixture
def inprocess(client, tree):
    servers: list[InProcess] = []

    def start(**cache) -> InProcess:
        servers.append(InProcess(client, tree, **cache))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def fetch_all(client, server: InProcess, tree: Path) -> None:
    for d in range(6):
        assert client.get(server.uri(f"d{d}/")).code == codes.CONTENT
        for f in range(5):
            r = client.get(server.uri(f"d{d}/f{f}.txt"))
            assert r.payload == (tree / f"d{d}" / f"f{f}.txt").read_bytes()


def test_byte_budget_bounds_the_cache(client, inprocess, tree):
    server = inprocess(byte_budget=4000)
    fetch_all(client, server, tree)
    stats = server.stats()
    assert 0 < stats["cached_bytes"] <= 4000
    assert stats["cached_entries"] < 36
    fetch_all(client, server, tree)  # evicted entries are read again, correctly


def test_watch_budget_bounds_inotify_watches_and_responses_stay_right(client, inprocess, tree):
    server = inprocess(watch_budget=3)
    fetch_all(client, server, tree)
    assert sum(server.watched().values()) <= 3
    for d in range(6):
        (tree / f"d{d}" / "f0.txt").write_text("changed")
    wait_until(  # polled directories notice within poll_interval
        lambda: all(client.get(server.uri(f"d{d}/f0.txt")).payload == b"changed" for d in range(6)),
        what="a change in a directory over the watch budget is seen",
        interval=0.1,
    )


def test_overflow_drops_everything_and_responses_stay_correct(client, inprocess, tree):
    server = inprocess()
    fetch_all(client, server, tree)
    assert server.stats()["cached_entries"] > 0
    obs = Observer(client, server.uri("d0/f0.txt"))
    # A change the kernel's queue lost: only the overflow tells the server.
    (tree / "d0" / "f0.txt").write_text("lost event")
    server.inspect(server.site.tree.simulate_overflow)
    assert server.stats()["cached_entries"] == 0
    assert client.get(server.uri("d0/f0.txt")).payload == b"lost event"
    assert obs.wait_for(lambda m: m.payload == b"lost event") is not None
    obs.cancel()


def test_watches_go_with_their_last_observer(client, inprocess, tree):
    server = inprocess(byte_budget=0)  # nothing cached: only observations hold watches
    first = Observer(client, server.uri("d3/f1.txt"))
    second = Observer(client, server.uri("d3/f1.txt"))
    assert tree / "d3" in server.watched()
    first.cancel()
    # Cancelling is lazy in aiocoap: the server learns of it with the next notification.
    (tree / "d3" / "f1.txt").write_text("wake up")
    assert second.wait_for(lambda m: m.payload == b"wake up") is not None
    assert tree / "d3" in server.watched()
    second.cancel()

    # aiocoap's client answers the first notification after cancelling and rejects (RST) the
    # next; the server then ends the observation. Keep changing the file until it does.
    def released() -> bool:
        if tree / "d3" not in server.watched():
            return True
        (tree / "d3" / "f1.txt").write_text(f"wake up {time.monotonic()}")
        return False

    wait_until(released, 10, what="the last observer's watch goes", interval=0.3)
    assert server.watched() == {}
    assert server.stats()["observers"] == 0


def test_path_index_finds_subtrees():
    index: PathIndex[int] = PathIndex()
    for i, key in enumerate([("a",), ("a", "b"), ("a", "b", "c"), ("ab",), ("x", "y")]):
        index.set(key, i)
    assert sorted(index.at_or_beneath(("a",))) == [("a",), ("a", "b"), ("a", "b", "c")]
    assert index.at_or_beneath(("x",)) == [("x", "y")]
    assert index.at_or_beneath(("nothing",)) == []
    index.pop(("a", "b", "c"))
    assert index.has_beneath(("a",)) and not index.has_beneath(("a", "b"))


def test_cache_evicts_least_recently_used():
    dropped = []
    cache = Cache(1300, lambda key, entry: dropped.append(key))  # room for three
    st = Path("/").stat()
    for name in ("a", "b", "c"):
        assert cache.put((name,), Entry(False, st, b"x" * 100))
    cache.get(("a",))
    cache.put(("d",), Entry(False, st, b"x" * 100))
    assert dropped == [("b",)]
    assert not cache.put(("huge",), Entry(False, st, b"x" * 2000))
    cache.drop((), subtree=True)
    assert len(cache) == 0 and cache.bytes_used == 0


def test_swapped_parent_directory_is_watched_anew(client, inprocess, tree):
    """The release pattern `mv a a.old; mv a.new a`: what is served and observed below `a`
    follows the new directory, not the old inode."""
    for d in ("a", "a.new"):
        (tree / d / "b").mkdir(parents=True)
        (tree / d / "b" / "f.txt").write_text(f"{d} original")
    server = inprocess()
    obs = Observer(client, server.uri("a/b/f.txt"))
    assert client.get(server.uri("a/b/")).code == codes.CONTENT
    (tree / "a").rename(tree / "a.old")
    (tree / "a.new").rename(tree / "a")
    assert obs.wait_for(lambda m: m.payload == b"a.new original") is not None
    (tree / "a" / "b" / "f.txt").write_text("changed in the new tree")
    assert obs.wait_for(lambda m: m.payload == b"changed in the new tree") is not None
    assert client.get(server.uri("a/b/f.txt")).payload == b"changed in the new tree"
    (tree / "a" / "b" / "g.txt").write_text("g")
    wait_until(
        lambda: b"</a/b/g.txt>" in client.get(server.uri("a/b/")).payload,
        what="the new file is listed",
    )
    obs.cancel()


def test_retargeted_symlink_is_followed_for_reads_and_observe(client, inprocess, tree):
    """`latest -> v2` swapped atomically to `v3`: later changes in v3 reach the observer."""
    for v in ("v2", "v3"):
        (tree / v).mkdir()
        (tree / v / "f.txt").write_text(f"{v} original")
    (tree / "latest").symlink_to("v2")
    server = inprocess()
    obs = Observer(client, server.uri("latest/f.txt"))
    assert obs.first.payload == b"v2 original"
    (tree / "latest.tmp").symlink_to("v3")
    (tree / "latest.tmp").rename(tree / "latest")
    assert obs.wait_for(lambda m: m.payload == b"v3 original") is not None
    (tree / "v3" / "f.txt").write_text("v3 changed")
    assert obs.wait_for(lambda m: m.payload == b"v3 changed") is not None
    assert client.get(server.uri("latest/f.txt")).payload == b"v3 changed"
    obs.cancel()


def test_file_behind_a_symlink_is_never_served_stale(client, inprocess, tree):
    """The link's directory is watched, not its target's: such files are read afresh."""
    (tree / "d0" / "link.txt").symlink_to("../d1/f0.txt")
    server = inprocess()
    assert client.get(server.uri("d0/link.txt")).payload == (tree / "d1" / "f0.txt").read_bytes()
    (tree / "d1" / "f0.txt").write_text("changed behind the link")
    assert client.get(server.uri("d0/link.txt")).payload == b"changed behind the link"
    listing = client.get(server.uri("d0/")).payload
    assert b"</d0/link.txt>" in listing
    (tree / "d1" / "f0.txt").unlink()
    assert client.get(server.uri("d0/link.txt")).code == codes.NOT_FOUND
    assert b"</d0/link.txt>" not in client.get(server.uri("d0/")).payload


def test_file_with_another_hard_link_is_never_served_stale(client, inprocess, tree):
    """inotify reports a write under the name it was made through only."""
    os.link(tree / "d0" / "f0.txt", tree / "d1" / "same.txt")
    server = inprocess()
    first = client.get(server.uri("d1/same.txt"))
    with open(tree / "d0" / "f0.txt", "r+") as f:
        f.write("written through the other name")
    second = client.get(server.uri("d1/same.txt"))
    assert second.payload.startswith(b"written through the other name")
    assert second.opt.etag != first.opt.etag


def test_swapped_root_is_served_by_its_path(client, inprocess, tree, tmp_path):
    """`mv root root.old; mv root.new root`: the server follows the path, as clients expect."""
    server = inprocess()
    assert client.get(server.uri("d0/f0.txt")).code == codes.CONTENT
    new = tmp_path / "root.new"
    (new / "d0").mkdir(parents=True)
    (new / "d0" / "f0.txt").write_text("the new tree")
    tree.rename(tmp_path / "root.old")
    new.rename(tree)
    wait_until(
        lambda: client.get(server.uri("d0/f0.txt")).payload == b"the new tree",
        what="the new root is served",
    )
    (tree / "d0" / "f0.txt").write_text("the new tree, changed")
    wait_until(
        lambda: client.get(server.uri("d0/f0.txt")).payload == b"the new tree, changed",
        what="a change in the new root is served",
    )


def test_new_way_of_watching_keeps_observers_informed(client, inprocess, tree):
    """A reload that changes [cache] restarts watching at once: no change goes unnotified."""
    server = inprocess()
    obs = Observer(client, server.uri("d2/f1.txt"))
    server.reconfigure(mode="poll", poll_interval=0.2)
    assert server.stats()["mode"] == "poll"
    (tree / "d2" / "f1.txt").write_text("after the reload")
    assert obs.wait_for(lambda m: m.payload == b"after the reload") is not None
    obs.cancel()


def test_root_given_with_dot_dot_still_sees_changes(client, tree):
    """`coap-fileserver sub/..`: change reports name the normalised path; they must still land."""
    server = InProcess(client, tree / "d0" / "..")
    try:
        assert client.get(server.uri("d1/f1.txt")).code == codes.CONTENT
        obs = Observer(client, server.uri("d1/f1.txt"))
        (tree / "d1" / "f1.txt").write_text("seen through a root with ..")
        assert obs.wait_for(lambda m: m.payload == b"seen through a root with ..") is not None
        assert client.get(server.uri("d1/f1.txt")).payload == b"seen through a root with .."
        obs.cancel()
    finally:
        server.close()
