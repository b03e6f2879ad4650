"""A raw POP3 exchange that keeps the exact octets of a RETR reply."""

from __future__ import annotations

import socket

TERMINATOR = b"\r\n.\r\n"


def stuff(message: bytes) -> bytes:
    """Return ``message`` in POP3 multi-line form: CRLF ends, dots doubled, terminator.

    Every bare LF becomes CRLF and a final CRLF is added when missing
    (RFC 1939 section 3).
    """
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in out) + b".\r\n"


class RawPop3:
    """Send POP3 commands on a plain socket and return replies as octets."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("POP3 server closed the connection")
        self.buffer += chunk

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise AssertionError(f"{text.split()[0]} failed: {reply!r}")
        return reply

    def multiline(self, text: str) -> tuple[bytes, bytes]:
        """Send a command with a multi-line reply; return (status line, body with terminator)."""
        status = self.command(text)
        body = self.buffer
        while not (body == b".\r\n" or body.endswith(TERMINATOR)):
            self._fill()
            body = self.buffer
        self.buffer = b""
        return status, body

    def login(self, user: str, password: str) -> None:
        self.command(f"USER {user}")
        self.command(f"PASS {password}")

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.line()
        finally:
            self.sock.close()
