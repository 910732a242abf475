"""Several workers (`--workers N`): one server, N processes on the same port, the supervisor the
one owner of lifecycle — a client stays on one worker, strangers are refused, OSCORE is handled
by one process only, READY/STATUS/WATCHDOG speak for all, reloads reach all or none, a crashed
worker is replaced, SIGTERM drains all. And the steering program in the kernel decides as its
Python model does."""

from __future__ import annotations

import asyncio
import collections
import math
import os
import random
import re
import select
import signal
import socket
import time
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers import codes

from coapfs.daemon import cpus, sockets
from coapfs.transport import steering

from support import cgroup
from support.client import Client
from support.identities import Identities
from support.polling import wait_until
from support.ports import free_udp_port
from support.server import Server, run_coapfs

WORKERS = 2


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("served by every worker")
    return root


def start(servers, root: Path, *args: str, env=None) -> Server:
    server = servers.start("--workers", str(WORKERS), *args, root=root, notify=True, env=env)
    server.notify.wait_for("READY", 30)
    return server


def worker_pids(server: Server) -> list[int]:
    """The supervisor's children: its workers."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    return [int(p) for p in children.split()]


def answered_by(server: Server) -> list[str]:
    """Which worker logged each access log line, in order."""
    return re.findall(r"\[worker (\d+)\] \S+ GET ", server.log())


def get_from_new_ports(uri: str, count: int) -> list[aiocoap.Message]:
    """`count` GETs, each from a client context of its own (its own source port)."""

    async def run() -> list[aiocoap.Message]:
        answers = []
        for _ in range(count):
            context = await aiocoap.Context.create_client_context()
            try:
                message = aiocoap.Message(code=aiocoap.GET, uri=uri)
                answers.append(await asyncio.wait_for(context.request(message).response, 10))
            finally:
                await context.shutdown()
        return answers

    return asyncio.run(run())


def test_workers_share_the_port_and_keep_each_client(start_server, root, client):
    server = start(start_server, root, "--access-log")
    ready = server.notify.all("READY")[0][1]
    assert "2 workers" in ready["STATUS"], ready
    assert len(worker_pids(server)) == WORKERS
    answers = get_from_new_ports(server.uri("a.txt"), 40)
    assert all(a.code == codes.CONTENT for a in answers)
    wait_until(lambda: len(answered_by(server)) >= 40, 10, what="40 access log lines")
    spread = collections.Counter(answered_by(server))
    assert set(spread) == {"0", "1"}, spread  # both workers serve
    # One client (one source port) always reaches the same worker.
    before = len(answered_by(server))
    for _ in range(20):
        assert client.get(server.uri("a.txt")).code == codes.CONTENT
    wait_until(lambda: len(answered_by(server)) >= before + 20, 10, what="20 more lines")
    assert len(set(answered_by(server)[before:])) == 1
    # STATUS= sums the workers' counters.
    wait_until(
        lambda: (
            server.notify.collect(0.5)
            or any(
                int(re.search(r"; (\d+) requests", m["STATUS"]).group(1)) >= 60
                for _, m in server.notify.all("STATUS")
                if "requests" in m["STATUS"]
            )
        ),
        15,
        what="STATUS= counting the requests of both workers",
    )
    assert server.stop() == 0
    assert not [p for p in worker_pids_gone(server)]


def worker_pids_gone(server: Server) -> list[int]:
    """Processes still around whose parent was the stopped supervisor (none, once stopped)."""
    alive = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == server.proc.pid:
                alive.append(int(entry.name))
    return alive


def auto_workers(servers, root: Path, wrapper: list[str]) -> int:
    """How many workers `--workers auto` starts under `wrapper` (one: served in-process)."""
    server = servers.start("--workers", "auto", root=root, notify=True, wrapper=wrapper)
    status = server.notify.wait_for("READY", 30)["STATUS"]
    count = len(worker_pids(server)) or 1
    assert (f", {count} workers" in status) == (count > 1), status
    assert server.stop() == 0
    return count


def test_auto_is_one_worker_per_cpu_the_server_may_run_on(start_server, root):
    assert auto_workers(start_server, root, []) == cpus.usable_cpus()
    assert auto_workers(start_server, root, ["taskset", "--cpu-list", "0"]) == 1


@pytest.mark.needs_root
@pytest.mark.parametrize("quota", [1.0, 1.5])
def test_auto_is_capped_by_the_cgroup_cpu_quota(start_server, root, quota):
    """systemd's CPUQuota= (and a container's --cpus) is a cgroup CPU quota: "auto" starts
    no more workers than it gives CPUs' worth of time, rounded up."""
    with cgroup.cpu_limited(quota) as procs:
        enter = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]
        expected = min(math.ceil(quota), len(os.sched_getaffinity(0)))
        assert auto_workers(start_server, root, enter) == expected


def test_the_quota_is_the_smallest_up_the_cgroup_v2_tree(tmp_path):
    """The parsing of /proc/self/cgroup, mountinfo and cpu.max for a unified hierarchy (this
    machine kind mounts v1's cpu controller, so the real-cgroup test above reads v1)."""
    mount = tmp_path / "cgroup"
    leaf = mount / "system.slice" / "coap-fileserver.service"
    leaf.mkdir(parents=True)
    (mount / "system.slice" / "cpu.max").write_text("150000 100000\n")
    (leaf / "cpu.max").write_text("max 100000\n")
    groups = tmp_path / "cgroup.txt"
    groups.write_text("0::/system.slice/coap-fileserver.service\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"35 24 0:30 / {mount} rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        "24 1 0:22 / /proc rw - proc proc rw\n"
    )
    assert cpus.cpu_quota(groups, mountinfo) == 1.5
    (leaf / "cpu.max").write_text("50000 100000\n")
    assert cpus.cpu_quota(groups, mountinfo) == 0.5
    groups.write_text("garbage\n0::/elsewhere\n")
    assert cpus.cpu_quota(groups, mountinfo) is None  # no cpu.max there: no limit
    groups.write_text("0::/system.slice/coap-fileserver.service\n")
    outside = f"35 24 0:30 /../.. {mount} rw shared:9 - cgroup2 cgroup2 rw\n"
    mountinfo.write_text(outside)  # another namespace's hierarchy: not read
    assert cpus.cpu_quota(groups, mountinfo) is None


def test_a_second_server_on_the_same_address_is_refused(start_server, root):
    first = start(start_server, root)
    result = run_coapfs(
        ["--bind", f"127.0.0.1:{first.port}", str(root)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"coap-fileserver: cannot bind 127.0.0.1:{first.port}: Address already in use"
    ), result.stderr
    assert result.stderr.count("\n") == 1
    # Also with all addresses on that port, which overlaps.
    result = run_coapfs(["--bind", f":{first.port}", str(root)], capture_output=True, text=True)
    assert result.returncode == 1 and "Address already in use" in result.stderr


def test_a_crashed_worker_is_replaced_and_logged(start_server, root):
    server = start(start_server, root)
    victim = worker_pids(server)[1]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(worker_pids(server)) == WORKERS and victim not in worker_pids(server),
        20,
        what="a new worker in place of the killed one",
    )
    assert re.search(
        rf"Worker \d \(pid {victim}\) ended with status -9; starting it again", server.log()
    )
    answers = get_from_new_ports(server.uri("a.txt"), 10)
    assert all(a.code == codes.CONTENT for a in answers)


def test_the_watchdog_starves_while_a_worker_is_stalled(start_server, root):
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""}
    server = start(start_server, root, env=env)
    server.notify.collect(2)
    assert len(server.notify.all("WATCHDOG")) >= 2
    stalled = worker_pids(server)[0]
    os.kill(stalled, signal.SIGSTOP)
    try:
        server.notify.collect(4)  # pings within the last answer's STALE_AFTER (3 s) may come
        mark = time.monotonic()
        server.notify.collect(2.5)
        assert not [t for t, _ in server.notify.all("WATCHDOG") if t > mark]
    finally:
        os.kill(stalled, signal.SIGCONT)
    server.notify.collect(3)
    assert [t for t, _ in server.notify.all("WATCHDOG") if t > mark + 2.5]


def test_a_reload_reaches_every_worker_or_none(start_server, root, tmp_path):
    config = tmp_path / "server.toml"
    port = free_udp_port()
    base = f'bind = ["127.0.0.1:{port}"]\nworkers = {WORKERS}\n'
    config.write_text(base + f'etag_length = 8\nroot = "{root}"\n')
    server = start_server.start("--config", str(config), notify=True)
    server.notify.wait_for("READY", 30)
    uri = f"coap://127.0.0.1:{port}/a.txt"
    assert {len(a.opt.etag) for a in get_from_new_ports(uri, 12)} == {8}

    def reload(text: str) -> str:
        config.write_text(base + text)
        server.send(signal.SIGHUP)
        server.notify.wait_for("RELOADING", 10)
        return server.notify.wait_for("READY", 30)["STATUS"]

    assert "RELOAD FAILED" not in reload(f'etag_length = 3\nroot = "{root}"\n')
    assert {len(a.opt.etag) for a in get_from_new_ports(uri, 12)} == {3}
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("the other root")
    # Worker 0 cannot load these credentials (their security context is missing) while the
    # others have applied nothing yet: all keep the running configuration.
    broken = tmp_path / "broken.json"
    broken.write_text('{":x": {"oscore": {"basedir": "%s/"}}}' % (tmp_path / "nowhere"))
    status = reload(f'etag_length = 5\nroot = "{other}"\ncredentials = "{broken}"\n')
    assert "RELOAD FAILED" in status and "credentials" in status, status
    answers = get_from_new_ports(uri, 12)
    assert {len(a.opt.etag) for a in answers} == {3}
    assert {a.payload for a in answers} == {b"served by every worker"}
    # A good one again: every worker serves the other root.
    assert "RELOAD FAILED" not in reload(f'etag_length = 5\nroot = "{other}"\n')
    answers = get_from_new_ports(uri, 12)
    assert {a.payload for a in answers} == {b"the other root"}
    assert {len(a.opt.etag) for a in answers} == {5}


def test_a_worker_started_again_during_a_reload_serves_the_new_configuration(
    start_server, root, tmp_path
):
    """A worker that crashed is being started again (on the configuration of its start) while
    a reload is applied to the others: it must not go on serving the old one."""
    config = tmp_path / "server.toml"
    port = free_udp_port()
    base = f'bind = ["127.0.0.1:{port}"]\nworkers = {WORKERS}\nroot = "{root}"\n'
    config.write_text(base + "etag_length = 8\n")
    server = start_server.start("--config", str(config), notify=True)
    server.notify.wait_for("READY", 30)
    victim = worker_pids(server)[1]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: f"(pid {victim}) ended" in server.log(), 10, what="the death noticed")
    config.write_text(base + "etag_length = 3\n")
    server.send(signal.SIGHUP)
    server.notify.wait_for("RELOADING", 10)
    assert "RELOAD FAILED" not in server.notify.wait_for("READY", 30)["STATUS"]
    uri = f"coap://127.0.0.1:{port}/a.txt"
    lengths: set[int] = set()

    def all_new() -> bool:
        lengths.clear()
        lengths.update(len(a.opt.etag) for a in get_from_new_ports(uri, 12))
        return lengths == {3}

    wait_until(
        all_new, 20, what="every worker on the new ETag length", details=lambda: f"{lengths}"
    )
    assert len(worker_pids(server)) == WORKERS


def test_sigterm_drains_every_worker(start_server, root):
    server = start(start_server, root)
    pids = worker_pids(server)
    assert server.stop() == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_oscore_is_handled_by_one_worker_only(start_server, root, tmp_path):
    """Many OSCORE clients, from many source ports, against two workers: every protected
    request succeeds, and only one process ever holds the security contexts (their lock)."""
    names = ("alice", "bob", "carol", "dave")
    identities = Identities(tmp_path / "ids", *names)
    server = start(start_server, root, "--credentials", str(identities.server))
    lock_holders = set()
    for pid in [server.proc.pid, *worker_pids(server)]:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(fd.path).startswith(str(tmp_path / "ids")):
                    lock_holders.add(pid)
            except OSError:
                continue
    assert len(lock_holders) == 1 and server.proc.pid not in lock_holders, lock_holders
    # One client per identity (its security context is locked by the process using it).
    clients = {name: Client(identities.client(name, server.port)) for name in names}
    try:
        for round_ in range(4):
            for name, c in clients.items():
                r = c.get(server.uri("a.txt"))
                assert r.code == codes.CONTENT, (name, round_, r)
                assert "oscore" in type(r.remote).__module__
    finally:
        for c in clients.values():
            c.close()
    # Plain clients keep being spread over both workers meanwhile.
    assert all(a.code == codes.CONTENT for a in get_from_new_ports(server.uri("a.txt"), 10))


# --- the steering program, in the kernel -----------------------------------------------------


def _option(delta: int, value: bytes = b"") -> bytes:
    if len(value) < 13:
        return bytes([(delta << 4) | len(value)]) + value
    return bytes([(delta << 4) | 13, len(value) - 13]) + value


def _message(mtype: int, code: int, mid: int, token=b"\x01\x02", options=b"", payload=b"") -> bytes:
    header = bytes([0x40 | (mtype << 4) | len(token), code, mid >> 8, mid & 0xFF])
    return header + token + options + (b"\xff" + payload if payload else b"")


_OSCORE = b"\x09\x00\x05"
DATAGRAMS = {
    "GET /a": lambda mid: _message(0, 1, mid, options=_option(11, b"a")),
    "GET ETag, If-None-Match, /x": lambda mid: _message(
        0, 1, mid, options=_option(4, b"abcd") + _option(1) + _option(6, b"x")
    ),
    "OSCORE POST": lambda mid: _message(0, 2, mid, options=_option(9, _OSCORE), payload=b"c"),
    "Uri-Host, OSCORE": lambda mid: _message(
        0, 2, mid, options=_option(3, b"example.org") + _option(6, _OSCORE), payload=b"c"
    ),
    "Uri-Host(20), Observe, Uri-Port, OSCORE": lambda mid: _message(
        1,
        5,
        mid,
        token=b"12345678",
        options=_option(3, b"h" * 20) + _option(3) + _option(1, b"\x16\x33") + _option(2, _OSCORE),
        payload=b"c",
    ),
    "POST /.well-known/edhoc": lambda mid: _message(
        0, 2, mid, options=_option(11, b".well-known") + _option(0, b"edhoc"), payload=b"m1"
    ),
    "GET /.well-knowX/core": lambda mid: _message(
        0, 1, mid, options=_option(11, b".well-knowX") + _option(0, b"core")
    ),
    "ACK": lambda mid: _message(2, 0, mid, token=b""),
    "RST": lambda mid: _message(3, 0, mid, token=b""),
    "ping": lambda mid: _message(0, 0, mid, token=b""),
    "2.05": lambda mid: _message(0, 0x45, mid, payload=b"x"),
    "short": lambda mid: b"\x40\x01",
}


def _words(host: str) -> list[int]:
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
        return [int.from_bytes(packed[i : i + 4], "big") for i in range(0, 16, 4)]
    return [int.from_bytes(socket.inet_aton(host), "big")]


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize(
    "bind, destination", [(("127.0.0.1", 0), "127.0.0.1"), (("::1", 0), "::1"), ((None, 0), "::1")]
)
def test_the_kernel_steers_as_the_model_decides(workers, bind, destination):
    group = asyncio.run(sockets.claim(bind, workers))
    try:
        for s in group.sockets:
            s.setblocking(False)
        family = socket.AF_INET6 if ":" in destination else socket.AF_INET
        spread: collections.Counter[tuple[str, int]] = collections.Counter()
        for name, make in DATAGRAMS.items():
            for _ in range(24):
                with socket.socket(family, socket.SOCK_DGRAM) as sender:
                    sender.bind((destination, 0))
                    data = make(random.randrange(65536))
                    sender.sendto(data, (destination, group.sockaddr[1]))
                    ready, _, _ = select.select(group.sockets, [], [], 2)
                    assert len(ready) == 1, name
                    got = group.sockets.index(ready[0])
                    ready[0].recv(2048)
                    expected = steering.decide(
                        data, _words(destination), sender.getsockname()[1], workers
                    )
                    assert got == expected, (name, data.hex())
                    spread[(name, got)] += 1
        assert {w for (name, w) in spread if name == "GET /a"} == set(range(workers))
        assert {w for (name, w) in spread if "OSCORE" in name or "edhoc" in name} == {0}
    finally:
        group.close()


def test_a_stranger_joining_a_steered_group_gets_nothing():
    group = asyncio.run(sockets.claim(("127.0.0.1", 0), 2))
    stranger = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        stranger.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind(group.sockaddr)  # same user, SO_REUSEPORT: the kernel lets it join
        everyone = [*group.sockets, stranger]
        for s in everyone:
            s.setblocking(False)
        received = [0] * len(everyone)
        for i in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                sender.sendto(DATAGRAMS["GET /a"](i), ("127.0.0.1", group.sockaddr[1]))
                ready, _, _ = select.select(everyone, [], [], 2)
                received[everyone.index(ready[0])] += 1
                ready[0].recv(2048)
        assert received[-1] == 0 and all(received[:-1]), received
    finally:
        stranger.close()
        group.close()


def test_an_address_held_by_anyone_is_not_claimed():
    port = free_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", port))
        with pytest.raises(sockets.AddressInUse):
            asyncio.run(sockets.claim(("127.0.0.1", port), 2))
        with pytest.raises(sockets.AddressInUse):
            asyncio.run(sockets.claim((None, port), 1))  # all addresses overlap it
