"""Coverage-guided fuzzing of the request path (issue 10), in-process: a datagram is decoded by
aiocoap (`Message.decode`, with the server's lenient string options), gated by the
amplification check as from an unverified public address, and rendered by the real site
(`Gate` around `FileService`) through aiocoap's pipes, exactly as `transport.context` renders
— against real temporary trees, one served read-only and one writable.

Invariants, each a `Finding`:
- nothing escapes but aiocoap's UnparsableMessage (what the server drops), and nothing is
  logged at ERROR;
- no 5.00 (every client mistake is a 4.xx; 5.03 and 5.05 are allowed);
- every response fits the amplification limit (3 x the datagram);
- nothing outside a served root is opened: every descriptor opened meanwhile (`os.open`, the
  `openat2` of tree/root.py) is resolved through /proc/self/fd, and every `open` audit event
  for an absolute path is checked;
- the read-only tree is unchanged, byte for byte.

`tests/fuzz/run.py` drives it with atheris (`make fuzz`); tests/test_fuzz_corpus.py replays
the committed corpus through `Harness.run`, no atheris needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.error
import aiocoap.pipe
from aiocoap.numbers.codes import Code
from aiocoap.transports.udp6 import UDP6EndpointAddress

import coapfs.tree.root
from coapfs.config import Config
from coapfs.daemon.gate import Gate
from coapfs.protocol.resource import FileService
from coapfs.transport.amplification import AddressCheck, Settings, wire_size
from coapfs.transport.context import use_lenient_string_options
from coapfs.transport.datagrams import udp_interfaces

from support.ports import free_udp_port

FACTOR = 3.0
#: Where an unverified peer comes from (TEST-NET-3): the amplification limit applies.
PUBLIC_PEER = ("::ffff:203.0.113.7", 40000, 0, 0)
ALLOWED_5XX = {Code.SERVICE_UNAVAILABLE, Code.PROXYING_NOT_SUPPORTED}
RESPONSE_TIMEOUT = 10.0


class Finding(AssertionError):
    """An invariant broken by an input."""


def make_tree(root: Path, outside: Path) -> None:
    """Files, directories, a large listing, and links in and out, beside a directory outside."""
    (outside / "sub").mkdir(parents=True, exist_ok=True)
    (outside / "secret").write_text("outside the root\n")
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    (root / "big.bin").write_bytes(bytes(range(256)) * 20)
    (root / "dir" / "b.json").write_text("{}")
    (root / "dir" / "sub" / "c").write_bytes(b"c" * 100)
    for i in range(60):
        (root / "dir" / f"entry-{i:02d}").touch()
    (root / ".hidden").write_text("never served")
    (root / "inside").symlink_to("dir")
    (root / "escape").symlink_to(outside)
    (root / "absolute").symlink_to(root / "a.txt")
    os.mkfifo(root / "fifo")


def tree_state(top: Path) -> dict[str, tuple[int, str]]:
    """Every entry below `top`: its mode and (for a file) content digest or link target."""
    state = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = ""
        state[str(path.relative_to(top))] = (st.st_mode, what)
    return state


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Harness:
    """The two served trees, their sites, and the checks; `run(datagram)` raises a Finding."""

    def __init__(self) -> None:
        use_lenient_string_options()
        shm = Path("/dev/shm")
        self.top = Path(tempfile.mkdtemp(prefix="coapfs-fuzz-", dir=shm if shm.is_dir() else None))
        self.outside = self.top / "outside"
        self.roots = {"read-only": self.top / "ro", "writable": self.top / "rw"}
        for root in self.roots.values():
            make_tree(root, self.outside)
        self.real_roots = [str(r.resolve()) for r in self.roots.values()]
        self.loop = asyncio.new_event_loop()
        self.services = {
            "read-only": FileService(Config(root=self.roots["read-only"]).service),
            "writable": FileService(Config(root=self.roots["writable"], write=True).service),
        }
        self.sites = {name: Gate(service) for name, service in self.services.items()}

        async def start() -> None:
            for service in self.services.values():
                service.start()

        self.loop.run_until_complete(start())
        self.check = AddressCheck(Settings(FACTOR, (), "small-blocks", 600.0, 100))
        # The address a request carries belongs to an interface: a real one, on loopback,
        # which sees no traffic (the datagrams are handed to the sites directly).
        self.context = self.loop.run_until_complete(
            aiocoap.Context.create_server_context(None, bind=("127.0.0.1", free_udp_port()))
        )
        self.remote = UDP6EndpointAddress(PUBLIC_PEER, udp_interfaces(self.context)[0])
        self.unchanged = tree_state(self.roots["read-only"])
        self.errors = _Errors()
        self.log = logging.getLogger("coapfs.fuzz")
        self._opened: list[str] = []
        self._confined = False
        sys.addaudithook(self._audit)

    def close(self) -> None:
        self.loop.run_until_complete(self.context.shutdown())
        for service in self.services.values():
            self.loop.run_until_complete(self._close(service))
        self.loop.close()
        shutil.rmtree(self.top, ignore_errors=True)

    @staticmethod
    async def _close(service: FileService) -> None:
        service.close()

    # --- one input ----------------------------------------------------------------------------

    def run(self, data: bytes) -> list[aiocoap.Message]:
        """Every response the sites give `data` (a datagram); a Finding if an invariant breaks."""
        try:
            request = aiocoap.Message.decode(data, self.remote)
        except aiocoap.error.UnparsableMessage:
            return []  # the server drops it (with a warning), as aiocoap's UDP transport does
        if not request.code.is_request():
            return []  # empty messages and responses end in the message layer
        responses = []
        for name, site in self.sites.items():
            for response in self._render(site, request, data):
                responses.append(response)
                if response.code.class_ == 5 and response.code not in ALLOWED_5XX:
                    raise Finding(f"{name}: {response.code} for {request!r}: {response.payload!r}")
        if tree_state(self.roots["read-only"]) != self.unchanged:
            raise Finding(f"the read-only tree changed after {request!r}")
        return responses

    def _render(self, site: Any, request: aiocoap.Message, data: bytes) -> list[aiocoap.Message]:
        request = request.copy()
        request.remote = self.remote
        logging.getLogger().addHandler(self.errors)
        try:
            with self._confinement():
                responses = self.loop.run_until_complete(self._responses(site, request))
        finally:
            logging.getLogger().removeHandler(self.errors)
        if self.errors.records:
            record = self.errors.records[0]
            self.errors.records.clear()
            raise Finding(f"logged at ERROR for {request!r}: {record.getMessage()}")
        for response in responses:
            size = wire_size(response, request.token)
            if size > FACTOR * len(data):
                raise Finding(f"{size} bytes answer a {len(data)}-byte datagram: {response!r}")
        return responses

    async def _responses(self, site: Any, request: aiocoap.Message) -> list[aiocoap.Message]:
        """As transport.context renders: through the amplification gate and aiocoap's pipes;
        an observation is given up on after its first response (the client went away)."""
        pipe = aiocoap.pipe.IterablePipe(request)
        gated = self.check.gate(pipe)
        aiocoap.pipe.run_driving_pipe(
            aiocoap.pipe.error_to_message(gated, self.log), site.render_to_pipe(gated)
        )
        events = aiter(pipe)
        responses = []
        try:
            while True:
                event = await asyncio.wait_for(anext(events), RESPONSE_TIMEOUT)
                if event.exception is not None:
                    raise Finding(f"{event.exception!r} escaped for {request!r}")
                responses.append(event.message)
                if event.is_last or request.opt.observe is not None:
                    break
        except TimeoutError:
            raise Finding(f"no response within {RESPONSE_TIMEOUT} s to {request!r}") from None
        finally:
            del events  # interest ends: the rendering task and any observation are cancelled
        for _ in range(3):
            await asyncio.sleep(0)
        return responses

    # --- nothing outside a root -------------------------------------------------------------

    def _inside(self, real: str) -> bool:
        return any(real == r or real.startswith(r + os.sep) for r in self.real_roots)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if not self._confined or event != "open" or not isinstance(args[0], str | bytes):
            return
        path = os.fsdecode(args[0])
        if os.path.isabs(path) and os.path.realpath(path).startswith(str(self.outside)):
            self._opened.append(path)

    def _checked(self, fd: int) -> int:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if not self._inside(real):
            self._opened.append(real)
        return fd

    @contextlib.contextmanager
    def _confinement(self) -> Iterator[None]:
        """Every descriptor opened meanwhile is checked to lie beneath a served root."""
        os_open, openat2 = os.open, coapfs.tree.root.openat2
        os.open = lambda *a, **k: self._checked(os_open(*a, **k))  # type: ignore[assignment]
        coapfs.tree.root.openat2 = lambda *a, **k: self._checked(openat2(*a, **k))
        self._confined = True
        try:
            yield
        finally:
            self._confined = False
            os.open, coapfs.tree.root.openat2 = os_open, openat2
        if self._opened:
            opened, self._opened = self._opened, []
            raise Finding(f"opened outside the served roots: {opened}")
