"""Many datagrams to a server, as fast as it answers them, with every answer counted by code.

A thread receives while the test sends; at most `window` datagrams are unanswered at once, and
those that get no answer at all (a malformed datagram is dropped silently) hold the sender up
for `patience` seconds, after which they are given up on. Every wait is bounded, so a flood
always ends."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

import coapmsg

from support.raw import ACK, CON


class Flood:
    """Datagrams over `sock` to `server`; `codes` counts the answers ("2.05", "RST", ...)."""

    def __init__(
        self,
        sock: socket.socket,
        server: tuple[str, int],
        *,
        window: int = 32,
        patience: float = 0.05,
        on_answer: Callable[[bytes], None] | None = None,
    ) -> None:
        self.sock, self.server = sock, server
        self.window, self.patience = window, patience
        self.on_answer = on_answer
        self.codes: Counter[str] = Counter()
        self.sent = self.answered = 0
        self._forgiven = 0  # datagrams given up on: no answer within `patience`
        self._arrived = threading.Condition()
        self._stop = False
        self.sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            code = "?"
            if len(data) >= 4:  # the header alone: cheap, so the receiver keeps up
                mtype = (data[0] >> 4) & 3
                code = "RST" if mtype == 3 else coapmsg.code_str(data[1])
                if mtype == CON:  # a separate response or a notification
                    self.sock.sendto(bytes((0x40 | (ACK << 4), 0, data[2], data[3])), self.server)
            if self.on_answer is not None:
                self.on_answer(data)
            with self._arrived:
                if code != "0.00":  # an empty ACK announces a separate response: not an answer
                    self.answered += 1
                self.codes[code] += 1
                self._arrived.notify_all()

    def _outstanding(self) -> int:
        return self.sent - self.answered - self._forgiven

    def send(self, datagrams: Iterable[bytes]) -> None:
        for datagram in datagrams:
            with self._arrived:
                while self._outstanding() >= self.window:
                    before = self.answered
                    self._arrived.wait(self.patience)
                    if self.answered == before:  # quiet: what is unanswered now was dropped
                        self._forgiven = self.sent - self.answered
                self.sent += 1
            self.sock.sendto(datagram, self.server)

    def drain(self, quiet: float = 0.5, timeout: float = 30.0) -> None:
        """Until every datagram is answered or nothing arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while self.answered < self.sent and time.monotonic() < deadline:
                before = self.answered
                self._arrived.wait(quiet)
                if self.answered == before:
                    return

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
