"""Test helpers for the POP3 server: a server on its own event loop thread,
Maildir and mbox builders, a throwaway TLS certificate, and a byte-exact
scripted client."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailfeed.config import SiteConfig
from mailfeed.passwd import PasswdFile
from mailfeed.pop3server import Pop3Server, Pop3Settings
from tests.support import write_self_signed_cert

USER = "site1"
PASSWORD = "pw-site1-example"
PASSWD_LINE = f"{USER}:{{PLAIN}}{PASSWORD}::::::"


def fast_settings(**overrides: Any) -> Pop3Settings:
    """Settings with short delays and timeouts for tests."""
    values: dict[str, Any] = {
        "hostname": "mx.example.net",
        "enforce_rfc_idle_minimum": False,
        "idle_timeout": 30.0,
        "login_timeout": 30.0,
        "auth_failure_delay": 0.0,
        "auth_failure_max_delay": 0.0,
    }
    values.update(overrides)
    return Pop3Settings(**values)


def maildir_name(unique: str, data: bytes, *, sizes: bool = True) -> str:
    if not sizes:
        return unique
    wire = len(data) + data.count(b"\n") - data.count(b"\r\n")
    return f"{unique},S={len(data)},W={wire}"


def make_maildir(path: Path, messages: Sequence[bytes], *, sizes: bool = True,
                 prefix: str = "17000000") -> list[str]:
    """Create a Maildir holding ``messages`` in new/; return the unique parts in order."""
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    uniques = []
    for index, data in enumerate(messages):
        unique = f"{prefix}{index:02d}.M{index}P1.mx"
        (path / "new" / maildir_name(unique, data, sizes=sizes)).write_bytes(data)
        uniques.append(unique)
    return uniques


@dataclass
class TlsFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        return context


def make_tls_files(folder: Path) -> TlsFiles:
    """Write a self-signed certificate for localhost and 127.0.0.1."""
    cert_path = folder / "cert.pem"
    key_path = folder / "key.pem"
    write_self_signed_cert(cert_path, key_path)
    cert_path.chmod(0o644)
    key_path.chmod(0o644)
    return TlsFiles(cert_path, key_path)


@dataclass
class RunningServer:
    """A Pop3Server on its own event loop in a thread, listening on 127.0.0.1."""

    server: Pop3Server
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    port: int = 0
    tls_port: int = 0
    _stopped: bool = field(default=False)

    def call(self, fn: Callable[[], Any]) -> Any:
        future: Future[Any] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # pragma: no cover - passed to the caller
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout=10)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self, graceful: bool = False) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.run(self.server.close(graceful=graceful, timeout=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def start_server(
    sites: dict[str, SiteConfig],
    *,
    settings: Pop3Settings | None = None,
    passwd_text: str = PASSWD_LINE,
    tls: TlsFiles | None = None,
    implicit_tls: bool = False,
    is_loopback: Callable[[str], bool] | None = None,
) -> RunningServer:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    kwargs: dict[str, Any] = {}
    if is_loopback is not None:
        kwargs["is_loopback"] = is_loopback
    server = Pop3Server(settings or fast_settings(), PasswdFile.parse(passwd_text),
                        sites.get, **kwargs)
    running = RunningServer(server, loop, thread)
    context = tls.server_context() if tls else None
    plain = running.run(server.start("127.0.0.1", 0, ssl_context=context))
    running.port = plain.sockets[0].getsockname()[1]
    if tls and implicit_tls:
        secure = running.run(server.start("127.0.0.1", 0, ssl_context=context, implicit_tls=True))
        running.tls_port = secure.sockets[0].getsockname()[1]
    return running


class Client:
    """A blocking, byte-exact POP3 test client."""

    def __init__(self, port: int, *, timeout: float = 20.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout
        )
        self._buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self._buffer += data
        return True

    def _closed(self) -> EOFError:
        tail = bytes(self._buffer[-80:])
        return EOFError(f"connection closed; {len(self._buffer)} octets unread, ending {tail!r}")

    def read_exact(self, count: int) -> bytes:
        while len(self._buffer) < count:
            if not self._fill():
                raise self._closed()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def line(self) -> bytes:
        while self._buffer.find(b"\r\n") < 0:
            if not self._fill():
                raise self._closed()
        end = self._buffer.index(b"\r\n") + 2
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line

    def multiline(self) -> bytes:
        """Return a whole multi-line reply, status line and terminator included."""
        out = self.line()
        if not out.startswith(b"+OK"):
            return out
        while True:
            line = self.line()
            out += line
            if line == b".\r\n":
                return out

    def command(self, text: bytes) -> bytes:
        self.send(text + b"\r\n")
        return self.line()

    def at_eof(self) -> bool:
        """Return True when the server closed the connection with nothing unread."""
        if self._buffer:
            return False
        return not self._fill()

    def login(self, user: str = USER, password: str = PASSWORD) -> bytes:
        self.line()
        assert self.command(f"USER {user}".encode()) == b"+OK send PASS\r\n"
        return self.command(f"PASS {password}".encode())

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self._buffer
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        self.sock.close()
