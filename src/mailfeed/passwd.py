"""Dovecot passwd-file credentials for the POP3 server.

File format (one user a line, ``#`` comments and empty lines ignored)::

    user:{SCHEME}secret:uid:gid:gecos:home:shell:extra

Only the user name and the password field are used; the other fields may be
absent.  A password without ``{SCHEME}`` is read as Dovecot's default
``CRYPT``, of which the ``$6$`` (SHA-512) and ``$5$`` (SHA-256) forms are
supported.

Schemes: ``PLAIN`` and ``CLEARTEXT`` (also ``.B64``/``.HEX`` encoded),
``SHA512-CRYPT`` and ``SHA256-CRYPT``, ``ARGON2ID`` and ``ARGON2I``
(argon2-cffi), ``SCRAM-SHA-256`` (Dovecot's ``ITER,SALT,STOREDKEY,SERVERKEY``),
and the digests ``SHA256``, ``SSHA256``, ``SHA512``, ``SSHA512`` (base64 or
``.HEX``).  SHA-crypt (Drepper's specification) is implemented here because
the ``crypt`` module is deprecated since Python 3.11 and no maintained
replacement is installed.

Invariants: comparisons are constant-time, and :meth:`PasswdFile.verify`
does the same work for an unknown user as for a known one by checking the
password against a decoy of the file's most common scheme.  No secret or
password is ever logged or put into an exception message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import argon2

from mailfeed.errors import ConfigError
from mailfeed.scram import ScramCredentials, ScramError

__all__ = [
    "HASH_SCHEMES",
    "SUPPORTED_SCHEMES",
    "PasswdFile",
    "hash_password",
    "sha_crypt",
]

log = logging.getLogger(__name__)

PLAIN_SCHEMES = frozenset({"PLAIN", "CLEARTEXT"})
CRYPT_SCHEMES = frozenset({"CRYPT", "SHA512-CRYPT", "SHA256-CRYPT"})
ARGON2_SCHEMES = frozenset({"ARGON2ID", "ARGON2I"})
SCRAM_SCHEME = "SCRAM-SHA-256"
# Digest schemes: name -> (hashlib name, salted).
DIGEST_SCHEMES = {
    "SHA256": ("sha256", False),
    "SSHA256": ("sha256", True),
    "SHA512": ("sha512", False),
    "SSHA512": ("sha512", True),
}
SUPPORTED_SCHEMES = tuple(
    sorted(PLAIN_SCHEMES | CRYPT_SCHEMES | ARGON2_SCHEMES | {SCRAM_SCHEME} | set(DIGEST_SCHEMES))
)
# The schemes hash_password writes: all but plain CRYPT, a legacy DES or MD5
# crypt(3) format that is only read.
HASH_SCHEMES = tuple(scheme for scheme in SUPPORTED_SCHEMES if scheme != "CRYPT")
ENCODINGS = ("B64", "BASE64", "HEX")

# SHA-crypt (https://www.akkadia.org/drepper/SHA-crypt.txt).
CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CRYPT_ROUNDS_DEFAULT = 5000
CRYPT_ROUNDS_MIN = 1000
CRYPT_ROUNDS_MAX = 999_999_999
CRYPT_SALT_MAX = 16
# The order in which the digest bytes are encoded, three at a time.
SHA512_CRYPT_ORDER = (
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
    (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
    (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38),
    (18, 39, 60), (40, 61, 19), (62, 20, 41),
)  # fmt: skip
SHA256_CRYPT_ORDER = (
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
    (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29),
)  # fmt: skip
CRYPT_IDS = {"6": "sha512", "5": "sha256"}


def _crypt_b64(b2: int, b1: int, b0: int, count: int) -> str:
    word = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(count):
        out.append(CRYPT_ALPHABET[word & 0x3F])
        word >>= 6
    return "".join(out)


def _repeat_to(digest: bytes, length: int) -> bytes:
    return (digest * (length // len(digest) + 1))[:length]


def sha_crypt(password: str, setting: str) -> str:
    """Compute SHA-crypt of ``password`` for ``setting`` (``$6$[rounds=N$]salt[$...]``).

    Returns the full ``$6$...`` string.  Raises ValueError for a setting that
    is not ``$5$`` or ``$6$``.
    """
    parts = setting.split("$")
    if len(parts) < 3 or parts[0] != "" or parts[1] not in CRYPT_IDS:
        raise ValueError("not a $5$ or $6$ SHA-crypt setting")
    ident = parts[1]
    algorithm = CRYPT_IDS[ident]
    rest = parts[2:]
    rounds = CRYPT_ROUNDS_DEFAULT
    rounds_text = ""
    if rest[0].startswith("rounds="):
        digits = rest[0][len("rounds=") :]
        if not digits.isdigit():
            raise ValueError("invalid rounds= in SHA-crypt setting")
        rounds = min(max(int(digits), CRYPT_ROUNDS_MIN), CRYPT_ROUNDS_MAX)
        rounds_text = f"rounds={rounds}$"
        rest = rest[1:]
        if not rest:
            raise ValueError("SHA-crypt setting has no salt")
    salt = rest[0].encode("utf-8")[:CRYPT_SALT_MAX]
    key = password.encode("utf-8")

    def new(data: bytes = b"") -> hashlib._Hash:
        return hashlib.new(algorithm, data)

    size = new().digest_size
    alternate = new(key + salt + key).digest()
    first = new(key + salt)
    remaining = len(key)
    while remaining > size:
        first.update(alternate)
        remaining -= size
    first.update(alternate[:remaining])
    bits = len(key)
    while bits:
        first.update(alternate if bits & 1 else key)
        bits >>= 1
    result = first.digest()
    key_sequence = _repeat_to(new(key * len(key)).digest(), len(key))
    salt_sequence = _repeat_to(new(salt * (16 + result[0])).digest(), len(salt))
    for i in range(rounds):
        step = new(key_sequence if i & 1 else result)
        if i % 3:
            step.update(salt_sequence)
        if i % 7:
            step.update(key_sequence)
        step.update(result if i & 1 else key_sequence)
        result = step.digest()
    if ident == "6":
        encoded = "".join(_crypt_b64(result[a], result[b], result[c], 4)
                          for a, b, c in SHA512_CRYPT_ORDER)
        encoded += _crypt_b64(0, 0, result[63], 2)
    else:
        encoded = "".join(_crypt_b64(result[a], result[b], result[c], 4)
                          for a, b, c in SHA256_CRYPT_ORDER)
        encoded += _crypt_b64(0, result[31], result[30], 3)
    return f"${ident}${rounds_text}{salt.decode('utf-8')}${encoded}"


@dataclass(frozen=True)
class _Entry:
    user: str
    scheme: str
    encoding: str
    secret: str


def _decode(text: str, encoding: str) -> bytes:
    if encoding == "HEX":
        return binascii.unhexlify(text)
    return base64.b64decode(text, validate=True)


def _plain_text(entry: _Entry) -> str:
    if not entry.encoding:
        return entry.secret
    return _decode(entry.secret, entry.encoding).decode("utf-8")


def _check(entry: _Entry, password: str) -> bool:
    """Return whether ``password`` matches ``entry``; malformed entries never match."""
    candidate = password.encode("utf-8")
    try:
        if entry.scheme in PLAIN_SCHEMES:
            return hmac.compare_digest(_plain_text(entry).encode("utf-8"), candidate)
        if entry.scheme in CRYPT_SCHEMES:
            return hmac.compare_digest(sha_crypt(password, entry.secret), entry.secret)
        if entry.scheme in ARGON2_SCHEMES:
            try:
                return bool(argon2.PasswordHasher().verify(entry.secret, password))
            except argon2.exceptions.VerificationError:
                return False
        if entry.scheme == SCRAM_SCHEME:
            stored = ScramCredentials.parse(entry.secret)
            derived = ScramCredentials.from_password(
                password, salt=stored.salt, iterations=stored.iterations
            )
            return hmac.compare_digest(derived.stored_key, stored.stored_key)
        algorithm, salted = DIGEST_SCHEMES[entry.scheme]
        raw = _decode(entry.secret, entry.encoding or "B64")
        size = hashlib.new(algorithm).digest_size
        digest, salt = raw[:size], raw[size:]
        if salted != bool(salt):
            return False
        return hmac.compare_digest(hashlib.new(algorithm, candidate + salt).digest(), digest)
    except (ValueError, ScramError, argon2.exceptions.InvalidHashError, UnicodeError):
        return False


def _parse_password(field: str) -> tuple[str, str, str]:
    """Split ``{SCHEME.ENC}secret`` into scheme, encoding and secret."""
    if field.startswith("{") and "}" in field:
        label, secret = field[1:].split("}", 1)
        scheme, _, encoding = label.upper().partition(".")
    else:
        scheme, encoding, secret = "CRYPT", "", field
    if encoding == "BASE64":
        encoding = "B64"
    return scheme, encoding, secret


class PasswdFile:
    """The users of one passwd-file and their stored secrets."""

    def __init__(self, entries: dict[str, _Entry], source: str = "<memory>") -> None:
        self.source = source
        self._entries = entries
        self._scram_cache: dict[str, ScramCredentials] = {}
        self._decoy = self._make_decoy()
        # SCRAM needs the stored key or the plain secret: a user whose secret
        # is a one-way hash such as ARGON2ID can never log in with it.
        self.scram_for_all = bool(entries) and all(
            entry.scheme == SCRAM_SCHEME or entry.scheme in PLAIN_SCHEMES
            for entry in entries.values()
        )

    @classmethod
    def load(cls, path: str | Path) -> PasswdFile:
        """Read a passwd-file; raise ConfigError naming the file and line for any fault."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: passwd-file not found") from None
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"{path}: cannot read the passwd-file: {exc}") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<memory>") -> PasswdFile:
        entries: dict[str, _Entry] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.split(":")
            user = fields[0]
            where = f"{source}:{number}"
            if len(fields) < 2 or not user:
                raise ConfigError(f"{where}: expected user:{{SCHEME}}password[:...]")
            if user in entries:
                raise ConfigError(f"{where}: user {user!r} is listed twice")
            if not fields[1]:
                log.warning("%s: user %r has an empty password and cannot log in", where, user)
                continue
            scheme, encoding, secret = _parse_password(fields[1])
            if scheme not in SUPPORTED_SCHEMES:
                raise ConfigError(
                    f"{where}: user {user!r}: unsupported password scheme {scheme!r}; "
                    f"use one of {', '.join(SUPPORTED_SCHEMES)}"
                )
            if encoding and encoding not in ENCODINGS:
                raise ConfigError(f"{where}: user {user!r}: unknown encoding .{encoding}")
            if scheme in CRYPT_SCHEMES and not secret.startswith(("$6$", "$5$")):
                raise ConfigError(
                    f"{where}: user {user!r}: only $6$ (SHA512-CRYPT) and $5$ (SHA256-CRYPT) "
                    "crypt hashes are supported"
                )
            entries[user] = _Entry(user, scheme, encoding, secret)
        return cls(entries, source)

    def __contains__(self, user: str) -> bool:
        return user in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _make_decoy(self) -> _Entry:
        """Build an entry of the most common scheme that no password matches."""
        if not self._entries:
            return _Entry("", "PLAIN", "", secrets.token_hex(16))
        scheme = Counter(e.scheme for e in self._entries.values()).most_common(1)[0][0]
        model = next(e for e in self._entries.values() if e.scheme == scheme)
        token = secrets.token_hex(16)
        if scheme in CRYPT_SCHEMES:
            parts = model.secret.split("$")
            rounds = parts[2] + "$" if parts[2].startswith("rounds=") else ""
            setting = f"${parts[1]}${rounds}{secrets.token_hex(8)}$"
            return _Entry("", scheme, "", sha_crypt(token, setting))
        if scheme in ARGON2_SCHEMES:
            try:
                parameters = argon2.extract_parameters(model.secret)
                hashed = argon2.PasswordHasher.from_parameters(parameters).hash(token)
                return _Entry("", scheme, "", hashed)
            except argon2.exceptions.InvalidHashError:
                return _Entry("", "PLAIN", "", token)
        if scheme == SCRAM_SCHEME:
            try:
                iterations = ScramCredentials.parse(model.secret).iterations
            except ScramError:
                return _Entry("", "PLAIN", "", token)
            credentials = ScramCredentials.from_password(token, iterations=iterations)
            return _Entry("", scheme, "", credentials.format())
        return _Entry("", "PLAIN", "", token)

    def verify(self, user: str, password: str) -> bool:
        """Return whether ``password`` is right for ``user``; unknown users cost the same."""
        entry = self._entries.get(user)
        matched = _check(entry if entry is not None else self._decoy, password)
        return matched and entry is not None

    def scram_credentials(self, user: str) -> ScramCredentials | None:
        """Return SCRAM-SHA-256 credentials for ``user``, stored or derived from a plain secret."""
        entry = self._entries.get(user)
        if entry is None:
            return None
        if entry.scheme == SCRAM_SCHEME:
            try:
                return ScramCredentials.parse(entry.secret)
            except ScramError:
                log.warning("%s: user %r has malformed SCRAM-SHA-256 data", self.source, user)
                return None
        if entry.scheme in PLAIN_SCHEMES:
            cached = self._scram_cache.get(user)
            if cached is None:
                try:
                    cached = ScramCredentials.from_password(_plain_text(entry))
                except (ValueError, UnicodeError):
                    return None
                self._scram_cache[user] = cached
            return cached
        return None

    def plain_secret(self, user: str) -> str | None:
        """Return the stored plain secret of ``user`` (for APOP), or None."""
        entry = self._entries.get(user)
        if entry is None or entry.scheme not in PLAIN_SCHEMES:
            return None
        try:
            return _plain_text(entry)
        except (ValueError, UnicodeError):
            return None


def hash_password(password: str, scheme: str = "ARGON2ID") -> str:
    """Hash ``password`` into ``{SCHEME}secret`` for a passwd-file line (default ARGON2ID)."""
    scheme = scheme.upper()
    if scheme == "ARGON2ID":
        return "{ARGON2ID}" + argon2.PasswordHasher(type=argon2.Type.ID).hash(password)
    if scheme == "ARGON2I":
        return "{ARGON2I}" + argon2.PasswordHasher(type=argon2.Type.I).hash(password)
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        ident = "6" if scheme == "SHA512-CRYPT" else "5"
        salt = "".join(secrets.choice(CRYPT_ALPHABET) for _ in range(CRYPT_SALT_MAX))
        return "{" + scheme + "}" + sha_crypt(password, f"${ident}${salt}$")
    if scheme == SCRAM_SCHEME:
        return "{SCRAM-SHA-256}" + ScramCredentials.from_password(password).format()
    if scheme in PLAIN_SCHEMES:
        if ":" in password or "\n" in password or password.startswith("{"):
            # The passwd-file splits fields at ":", so store such secrets encoded.
            encoded = base64.b64encode(password.encode("utf-8")).decode("ascii")
            return "{" + scheme + ".B64}" + encoded
        return "{" + scheme + "}" + password
    if scheme in DIGEST_SCHEMES:
        algorithm, salted = DIGEST_SCHEMES[scheme]
        salt_octets = secrets.token_bytes(8) if salted else b""
        digest = hashlib.new(algorithm, password.encode("utf-8") + salt_octets).digest()
        return "{" + scheme + "}" + base64.b64encode(digest + salt_octets).decode("ascii")
    raise ValueError(f"unsupported password scheme {scheme!r}; use one of "
                     f"{', '.join(HASH_SCHEMES)}")
