"""The POP3 client's exceptions: one class per kind of failure.

Every one is a :class:`~mailfeed.errors.TempFailure`, so a session error
never bounces mail; :class:`Pop3AuthError` and the response codes of
RFC 3206 tell the caller whether the credentials were refused for good.
"""

from __future__ import annotations

from mailfeed.errors import TempFailure

__all__ = [
    "Pop3AuthError",
    "Pop3Error",
    "Pop3ProtocolError",
    "Pop3ServerError",
    "Pop3Timeout",
    "Pop3TlsError",
]


class Pop3Error(TempFailure):
    """Base of the client's errors.

    The mail stays on the server whatever went wrong, so every POP3 error is
    a temporary failure for the program that ends with it.
    """


class Pop3ProtocolError(Pop3Error):
    """The server broke the protocol; the session is closed.

    Raised for a status line that is neither ``+OK``/``+OK text`` nor
    ``-ERR...``, a reply cut off before its terminator, a line longer than
    ``max_line_length`` where no per-message failure is possible, and a
    connection closed in the middle of a reply.
    """


class Pop3ServerError(Pop3Error):
    """The server answered ``-ERR``.

    ``command`` is the command (secrets masked), ``text`` the reply text after
    ``-ERR``, and ``code`` the RFC 2449 section 8 / RFC 3206 response code
    without brackets (``IN-USE``, ``LOGIN-DELAY``, ``SYS/TEMP``,
    ``SYS/PERM``, ``AUTH``) or None.
    """

    def __init__(
        self, command: str, text: str, code: str | None, *, message: str | None = None
    ) -> None:
        self.command = command
        self.text = text
        self.code = code
        if message is None:
            message = f"POP3 server rejected {command}: -ERR {text}".rstrip()
        super().__init__(message)


class Pop3AuthError(Pop3ServerError):
    """Authentication failed or no acceptable mechanism is available."""


class Pop3TlsError(Pop3Error):
    """TLS was required but could not be established.

    Raised before any credential is sent: STLS missing from CAPA or refused,
    a failed handshake or certificate check, or plaintext refused for a host
    that is not loopback.
    """


class Pop3Timeout(Pop3Error):
    """The server did not answer within the timeout of one phase.

    ``phase`` is one of ``connect``, ``greeting``, ``login``, ``command`` or
    ``data``; ``seconds`` is the timeout that expired.  The session is closed.
    """

    def __init__(self, phase: str, seconds: float, detail: str = "") -> None:
        self.phase = phase
        self.seconds = seconds
        message = f"POP3 {phase} timed out after {seconds:g} s"
        super().__init__(f"{message}: {detail}" if detail else message)
