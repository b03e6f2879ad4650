"""Helpers for SMTP receiver tests: a config file and a server in a loop thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mailfeed.mxconfig import ListenAddress, MxConfig, load_mx_config
from mailfeed.smtpserver import SmtpServer

BASE_CONFIG = """\
spool_root = "{root}"

[limits]
max_message_size = {max_size}
max_recipients = {max_rcpts}

[mx]
hostname = "mx.example.net"
smtp_listen = ["127.0.0.1:0"]
pop3_listen = []
min_free_space = 1024
max_connections_per_address = {per_address}
max_errors = {max_errors}
"""

TWO_SITES = """
[sites.site1]
domains = ["example.org"]

[sites.site2]
domains = ["example.com"]
addresses = ["special@example.org"]
"""


def write_config(
    tmp: Path,
    sites: str = TWO_SITES,
    *,
    max_size: int = 100000,
    max_rcpts: int = 50,
    per_address: int = 10,
    max_errors: int = 20,
    extra: str = "",
) -> Path:
    (tmp / "spool").mkdir(exist_ok=True)
    path = tmp / "mx.toml"
    path.write_text(
        BASE_CONFIG.format(
            root=tmp / "spool",
            max_size=max_size,
            max_rcpts=max_rcpts,
            per_address=per_address,
            max_errors=max_errors,
        )
        + extra
        + sites
    )
    return path


class LoopServer:
    """An SmtpServer running in an event loop on a background thread."""

    def __init__(self, config: MxConfig, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: SmtpServer = self.call(lambda: self._make(config, kwargs))
        bound = self.call(lambda: self.server.start([ListenAddress("127.0.0.1", 0)]))
        self.port = bound[0][1]

    @staticmethod
    async def _make(config: MxConfig, kwargs: dict[str, Any]) -> SmtpServer:
        return SmtpServer(config, **kwargs)

    def call(self, make: Callable[[], Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(make(), self.loop)
        return future.result(timeout=30)

    def stop(self) -> None:
        self.call(lambda: self.server.shutdown(5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def start(config_path: Path, **kwargs: Any) -> LoopServer:
    return LoopServer(load_mx_config(config_path), **kwargs)


class RawClient:
    """A line-oriented SMTP client on a plain socket, for byte-exact dialogues."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """Read one complete (possibly multi-line) reply."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def command(self, data: bytes) -> bytes:
        self.send(data)
        return self.reply()

    def closed(self) -> bool:
        """Return True when the server closed the connection with nothing more to read."""
        if self.buffer:
            return False
        return self.sock.recv(65536) == b""

    def close(self) -> None:
        self.sock.close()


def stored_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").glob("*")) if (maildir / "new").exists() else []


def tmp_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "tmp").glob("*")) if (maildir / "tmp").exists() else []
