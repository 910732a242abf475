"""The socket systemd listens on for sd_notify messages (NOTIFY_SOCKET)."""

from __future__ import annotations

import socket
import time
from pathlib import Path


class NotifySocket:
    """What systemd listens on: every datagram is kept, with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._next = 0  # messages before this index were already consumed by wait_for

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return False
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return True

    def collect(self, seconds: float) -> None:
        """Receive everything that arrives during the next `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._receive(left)

    def wait_for(self, key: str, timeout: float = 20) -> dict[str, str]:
        """The next not yet consumed message that has `key` (messages before it are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._next, len(self.messages)):
                if key in self.messages[i][1]:
                    self._next = i + 1
                    return self.messages[i][1]
            self._next = len(self.messages)
            left = deadline - time.monotonic()
            assert left > 0, f"no {key} within {timeout} s; got {self.messages}"
            self._receive(left)

    def all(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.messages if key in m]

    def close(self) -> None:
        self.sock.close()
