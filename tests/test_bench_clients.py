"""The benchmark's C load generators (bench/coapload.c) against the real server: what they count
must be what happened, or the numbers in bench/ mean nothing."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import coapload
import pytest

from support.client import Client
from support.server import Servers
from support.tools import require

SZX = 2  # 64-byte blocks, as the fleet benchmark asks
FILES = [f"small/s{i}.txt" for i in range(4)]


@pytest.fixture(scope="module")
def program() -> Path:
    require("cc", "gcc")
    return coapload.binary()


@pytest.fixture
def served(tmp_path: Path, start_server: Servers):
    root = tmp_path / "root"
    (root / "small").mkdir(parents=True)
    for i, name in enumerate(FILES):
        (root / name).write_bytes(bytes([65 + i]) * 200)
    image = random.Random(5).randbytes(2048 + 17)  # 33 blocks, the last one short
    (root / "image.bin").write_bytes(image)
    return root, start_server(root)


def run(*args: str, timeout: float = 60) -> dict:
    done = subprocess.run(
        coapload.command(*args), capture_output=True, text=True, timeout=timeout, check=True
    )
    return json.loads(done.stdout)


def gets(server, *args: str) -> dict:
    common = ("--port", str(server.port), "--server-pid", str(server.proc.pid))
    return run("gets", *common, *args)


def test_gets_counts_every_answer_and_the_server_cpu(program: Path, served) -> None:
    _, server = served
    r = gets(
        server, "--window", "8", "--sockets", "4", "--requests", "500", "--warmup", "50", *FILES
    )
    assert 500 <= r["ok"] <= 500 + 8  # the last batch read may finish a window's worth more
    assert (r["lost"], r["other"], r["sockets_used"]) == (0, 0, 4)
    assert r["rate"] > 0 and r["timed_out"] is False
    assert r["server_cpu"][1] > r["server_cpu"][0]  # the server's tree worked for them
    assert 0 < r["latency_median_ms"] < 1000


def test_gets_for_a_time_with_a_tick(program: Path, served) -> None:
    _, server = served
    t0 = time.monotonic()
    r = gets(
        server, "--window", "16", "--sockets", "8", "--seconds", "1", "--tick", "0.002", *FILES
    )
    assert r["ok"] > 100 and r["lost"] == 0 and r["other"] == 0
    assert 0.9 < r["elapsed"] < 3 and time.monotonic() - t0 < 10


def test_gets_with_an_etag_counts_only_2_03(program: Path, served, client: Client) -> None:
    _, server = served
    etag = client.get(server.uri(FILES[0])).opt.etag
    assert etag
    right = gets(server, "--window", "4", "--requests", "200", "--etag", etag.hex(), FILES[0])
    assert 200 <= right["ok"] <= 204 and right["other"] == 0
    wrong = gets(server, "--window", "4", "--requests", "200", "--etag", "00ff", FILES[0])
    assert wrong["ok"] == 0 and wrong["other"] >= 200 + 200  # each 2.05 counted, not a success


def fleet(root: Path, server, image: Path, *args: str) -> dict:
    start = time.monotonic() + 0.5
    return run(
        "fleet",
        *("--port", str(server.port), "--path", "image.bin", "--image", str(image)),
        *("--count", "6", "--szx", str(SZX), "--rtt", "0.002", "--ramp", "0.1"),
        *("--ack-timeout", "0.2", "--start", str(start), "--end", str(start + 30)),
        *args,
    )


def test_fleet_devices_download_the_whole_image_through_losses(program: Path, served) -> None:
    root, server = served
    r = fleet(root, server, root / "image.bin", "--loss", "0.2", "--seed", "3")
    blocks = -(-(2048 + 17) // (16 << SZX))
    assert r["total_blocks"] == blocks
    devices = r["devices"]
    assert [d["error"] for d in devices] == [None] * 6
    assert all(d["done"] is not None and d["offset"] == 2048 + 17 for d in devices)
    assert all(d["blocks"] == blocks and d["restarts"] == 0 for d in devices)
    assert sum(d["lost"] for d in devices) > 0  # 20 % of 198 responses ignored...
    assert all(d["retries"] >= d["lost"] for d in devices)  # ...and each one asked again
    assert sum(r["bins"]) == 6 * blocks and r["bin"] > 0
    assert len(r["resp_ms"]) == 6 * blocks and 0 <= min(r["resp_ms"]) < 1000


def test_fleet_devices_compare_every_block_with_the_image(program: Path, served, tmp_path) -> None:
    root, server = served
    other = tmp_path / "other.bin"
    data = bytearray((root / "image.bin").read_bytes())
    data[1000] ^= 1  # block 15
    other.write_bytes(data)
    r = fleet(root, server, other, "--loss", "0")
    errors = [d["error"] for d in r["devices"]]
    assert all(e and e.startswith("image mismatch") and "byte 960" in e for e in errors), errors
    assert all(d["blocks"] == 15 and d["done"] is None for d in r["devices"])
