"""SCRAM-SHA-256 (RFC 5802, RFC 7677): the client and server message flow.

Both the POP3 server (RFC 5034 AUTH) and the POP3 client use these classes.
They only build and check the SASL messages; the caller moves them over the
wire (base64-encoded, as RFC 5034 requires).  Channel binding is not offered
(gs2 header ``n,,``).

Dovecot stores SCRAM credentials as
``{SCRAM-SHA-256}ITERATIONS,SALT_B64,STORED_KEY_B64,SERVER_KEY_B64``;
:class:`ScramCredentials` reads and writes that form.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MECHANISM",
    "ScramClient",
    "ScramCredentials",
    "ScramError",
    "ScramServer",
]

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # RFC 7677 section 4: at least 4096
NONCE_OCTETS = 24
GS2_HEADER = "n,,"


class ScramError(ValueError):
    """A malformed or failed SCRAM exchange."""


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ScramError(f"invalid base64 {text[:20]!r}") from None


def _saslname(name: str) -> str:
    # RFC 5802 section 5.1: "," and "=" are escaped in user names.
    return name.replace("=", "=3D").replace(",", "=2C")


def _unsaslname(name: str) -> str:
    if "=" in name.replace("=3D", "").replace("=2C", ""):
        raise ScramError("invalid escape in user name")
    return name.replace("=2C", ",").replace("=3D", "=")


def _attributes(message: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM attribute {part[:20]!r}")
        result.setdefault(part[0], part[2:])
    return result


@dataclass(frozen=True)
class ScramCredentials:
    """What a server stores for one user: no password, only derived keys."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(
        cls, password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramCredentials:
        salt = salt if salt is not None else secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(iterations, salt, _h(client_key), _hmac(salted, b"Server Key"))

    @classmethod
    def parse(cls, text: str) -> ScramCredentials:
        """Parse Dovecot's ``ITER,SALT,STOREDKEY,SERVERKEY`` (without the scheme prefix)."""
        parts = text.split(",")
        if len(parts) != 4 or not parts[0].isdigit():
            raise ScramError("expected ITERATIONS,SALT,STORED_KEY,SERVER_KEY")
        return cls(int(parts[0]), _unb64(parts[1]), _unb64(parts[2]), _unb64(parts[3]))

    def format(self) -> str:
        return ",".join(
            [str(self.iterations), _b64(self.salt), _b64(self.stored_key), _b64(self.server_key)]
        )


# User name -> credentials, or None for an unknown user.
ScramCredentialsLookup = Callable[[str], ScramCredentials | None]


class ScramServer:
    """The server side of one exchange: first message in, challenge out, proof in."""

    def __init__(self, lookup: ScramCredentialsLookup) -> None:
        self._lookup = lookup
        self.username: str | None = None
        self._credentials: ScramCredentials | None = None
        self._auth_message_start = ""
        self._nonce = ""
        self._client_first_bare = ""

    def first(self, client_first: str) -> str:
        """Take the client-first-message; return the server-first-message."""
        if not client_first.startswith(GS2_HEADER):
            raise ScramError("channel binding and authzid are not supported")
        bare = client_first[len(GS2_HEADER) :]
        attrs = _attributes(bare)
        if "n" not in attrs or "r" not in attrs or not attrs["r"]:
            raise ScramError("client-first-message lacks n= or r=")
        self.username = _unsaslname(attrs["n"])
        credentials = self._lookup(self.username)
        if credentials is None:
            # Go on with made-up credentials so that an unknown user looks
            # like a wrong password (RFC 5802 section 5.1, "e=unknown-user"
            # would tell an attacker which users exist).
            credentials = ScramCredentials.from_password(secrets.token_hex(16), iterations=4096)
        self._credentials = credentials
        self._nonce = attrs["r"] + _b64(secrets.token_bytes(NONCE_OCTETS))
        self._client_first_bare = bare
        server_first = f"r={self._nonce},s={_b64(credentials.salt)},i={credentials.iterations}"
        self._auth_message_start = f"{bare},{server_first}"
        return server_first

    def final(self, client_final: str) -> str:
        """Check the client-final-message; return the server-final-message.

        Raise ScramError if the proof is wrong.
        """
        if self._credentials is None:
            raise ScramError("client-final-message before client-first-message")
        without_proof, sep, proof_text = client_final.rpartition(",p=")
        if not sep:
            raise ScramError("client-final-message lacks p=")
        attrs = _attributes(without_proof)
        if attrs.get("c") != _b64(GS2_HEADER.encode()) or attrs.get("r") != self._nonce:
            raise ScramError("channel binding or nonce mismatch")
        auth_message = f"{self._auth_message_start},{without_proof}".encode()
        signature = _hmac(self._credentials.stored_key, auth_message)
        proof = _unb64(proof_text)
        if len(proof) != len(signature):
            raise ScramError("authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(_h(client_key), self._credentials.stored_key):
            raise ScramError("authentication failed")
        return "v=" + _b64(_hmac(self._credentials.server_key, auth_message))


class ScramClient:
    """The client side of one exchange."""

    def __init__(self, username: str, password: str, *, nonce: str | None = None) -> None:
        self._password = password
        self._nonce = nonce or _b64(secrets.token_bytes(NONCE_OCTETS))
        self._bare = f"n={_saslname(username)},r={self._nonce}"
        self._server_signature = b""

    def first(self) -> str:
        """Return the client-first-message."""
        return GS2_HEADER + self._bare

    def final(self, server_first: str) -> str:
        """Take the server-first-message; return the client-final-message."""
        attrs = _attributes(server_first)
        nonce, salt_text, iter_text = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise ScramError("server nonce does not extend the client nonce")
        if not iter_text.isdigit() or int(iter_text) < 1:
            raise ScramError(f"invalid iteration count {iter_text!r}")
        salted = hashlib.pbkdf2_hmac(
            "sha256", self._password.encode("utf-8"), _unb64(salt_text), int(iter_text)
        )
        client_key = _hmac(salted, b"Client Key")
        without_proof = f"c={_b64(GS2_HEADER.encode())},r={nonce}"
        auth_message = f"{self._bare},{server_first},{without_proof}".encode()
        signature = _hmac(_h(client_key), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={_b64(proof)}"

    def check(self, server_final: str) -> None:
        """Verify the server-final-message; raise ScramError if the server is false."""
        attrs = _attributes(server_final)
        if "e" in attrs:
            raise ScramError(f"server reported error {attrs['e']!r}")
        if not self._server_signature or not hmac.compare_digest(
            _unb64(attrs.get("v", "")), self._server_signature
        ):
            raise ScramError("server signature does not verify")
