"""The envelope block: the SMTP envelope written at the top of a message.

POP3 carries messages but not their SMTP envelope, so the MX host writes the
envelope into header lines at the very top of each message (the MAILFEED
format of 1996)::

    X-Mailfeed-Sender: <envelope sender, "<>" for the null sender>
    X-Mailfeed-Recipient-Number: <N, decimal>
    X-Mailfeed-Recipient-Address: <recipient>      (exactly N lines)

and then the original message, unchanged.

Invariants of this codec:

* The writer emits exactly that block; optional extension fields (see
  :data:`EXTENSION_FIELDS`) follow the recipient lines only when asked for.
* The reader looks at the first line only.  It never searches further down
  for a block and never guesses: any deviation is a :class:`BlockDefect` with
  a 1-based line number and a plain reason.  Lines below the block that look
  like block fields are message content.
* Field names are case-insensitive; the value follows the colon and optional
  white space; lines end in LF or CRLF.
* Addresses are valid UTF-8 without control characters (C0, DEL or C1) and
  are at most :data:`MAX_ADDRESS_OCTETS` octets (RFC 5321 section
  4.5.3.1.3).  UTF-8 (RFC 6531) and quoted local parts are allowed.  An
  address in angle brackets is accepted on read and written bare.  So every
  envelope the writer accepts, the reader reads back.
* An envelope lists each recipient once: a repeated address (the same
  string) is kept at its first place, so it is delivered once.  Addresses
  that differ only in case stay apart, because a local part is
  case-sensitive (RFC 5321 section 2.4).
* Block fields are never folded: a line starting with white space right
  after the block is a defect, not message content.  A line after the block
  that is longer than the block line limit is message content, unless it
  starts with an extension field.

This module knows nothing of files, sockets or spools: it works on bytes and
on binary streams.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = [
    "DEFAULT_MAX_RECIPIENTS",
    "FIELD_COUNT",
    "FIELD_RECIPIENT",
    "FIELD_SENDER",
    "MAX_ADDRESS_OCTETS",
    "MAX_BLOCK_LINE",
    "Block",
    "BlockDefect",
    "Envelope",
    "InvalidAddress",
    "encode_block",
    "parse_block",
    "read_block",
    "validate_address",
]

FIELD_SENDER = "X-Mailfeed-Sender"
FIELD_COUNT = "X-Mailfeed-Recipient-Number"
FIELD_RECIPIENT = "X-Mailfeed-Recipient-Address"
FIELD_PREFIX = b"x-mailfeed-"

# RFC 5321 section 4.5.3.1.3: a reverse-path or forward-path is at most 256
# octets including the angle brackets; we apply it to the bare address.
MAX_ADDRESS_OCTETS = 256
DEFAULT_MAX_RECIPIENTS = 1000
# A block line is a field name, a colon, white space and one address: this
# bound leaves room for generous white space and extension fields.
MAX_BLOCK_LINE = 2048
# How far the reader looks, only to explain a missing block, for a block
# field lower in the header section ("block is not at the very top").
DIAGNOSE_LINES = 200

NULL_SENDER_TEXT = "<>"


class InvalidAddress(ValueError):
    """An envelope address that may not be written into a block."""


class BlockDefect(ValueError):
    """A missing, incomplete or malformed block.

    ``line`` is the 1-based line number where the defect was found and
    ``reason`` a short plain-text reason such as "no block".
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


class Envelope:
    """An SMTP envelope: the sender ("" is the null sender) and recipients.

    Immutable, compared and hashed by value.  A plain class, not a
    dataclass: ``dataclasses`` imports ``inspect``, a cost that
    mailfeed-fwd would pay once per message.
    """

    __slots__ = ("recipients", "sender")

    sender: str
    recipients: tuple[str, ...]

    def __init__(self, sender: str, recipients: tuple[str, ...]) -> None:
        validate_address(sender, allow_null=True)
        if not recipients:
            raise InvalidAddress("an envelope needs at least one recipient")
        for rcpt in recipients:
            validate_address(rcpt)
        object.__setattr__(self, "sender", sender)
        # One delivery per recipient: drop exact repeats, keeping the order.
        object.__setattr__(self, "recipients", tuple(dict.fromkeys(recipients)))

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Envelope)
        return (self.sender, self.recipients) == (other.sender, other.recipients)

    def __hash__(self) -> int:
        return hash((self.sender, self.recipients))

    def __repr__(self) -> str:
        return f"Envelope(sender={self.sender!r}, recipients={self.recipients!r})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of an Envelope")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of an Envelope")

    def __reduce__(self) -> tuple[type[Envelope], tuple[str, tuple[str, ...]]]:
        return (Envelope, (self.sender, self.recipients))


class Block:
    """A parsed block: its envelope, its size in octets and any extensions.

    ``length`` is the number of octets the block occupies at the start of the
    message (including any allowed trace lines above it), so the message
    proper starts at that offset.  Immutable, compared by value.
    """

    __slots__ = ("envelope", "extensions", "length")

    envelope: Envelope
    length: int
    extensions: Mapping[str, str]

    def __init__(
        self, envelope: Envelope, length: int, extensions: Mapping[str, str] | None = None
    ) -> None:
        object.__setattr__(self, "envelope", envelope)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "extensions", {} if extensions is None else extensions)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Block)
        return (self.envelope, self.length, self.extensions) == (
            other.envelope, other.length, other.extensions)

    def __hash__(self) -> int:
        # As a frozen dataclass: hashing fails on the extensions dict.
        return hash((self.envelope, self.length, self.extensions))

    def __repr__(self) -> str:
        return (f"Block(envelope={self.envelope!r}, length={self.length!r}, "
                f"extensions={self.extensions!r})")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a Block")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a Block")


def _find_control(text: str) -> str | None:
    """Return the first C0, DEL or C1 control character in ``text``, if any."""
    for ch in text:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return ch
    return None


def validate_address(address: str, *, allow_null: bool = False) -> str:
    """Check an envelope address and return it; raise InvalidAddress if bad."""
    if address == "":
        if allow_null:
            return address
        raise InvalidAddress("empty recipient address")
    control = _find_control(address)
    if control is not None:
        raise InvalidAddress(f"address {address!r} contains control character {control!r}")
    try:
        octets = len(address.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates: bytes that were not UTF-8 on the command line.
        raise InvalidAddress(f"address {address!r} is not valid UTF-8") from None
    if octets > MAX_ADDRESS_OCTETS:
        raise InvalidAddress(
            f"address {address[:40]!r}... is {octets} octets, over the limit of "
            f"{MAX_ADDRESS_OCTETS}"
        )
    if address.startswith("<") or address.endswith(">"):
        raise InvalidAddress(f"address {address!r} has angle brackets")
    if address[0] in " \t" or address[-1] in " \t":
        raise InvalidAddress(f"address {address!r} has leading or trailing white space")
    return address


def normalise_address(value: str) -> str:
    """Strip one pair of angle brackets from an address as read from a block."""
    if value == NULL_SENDER_TEXT:
        return ""
    if len(value) >= 2 and value[0] == "<" and value[-1] == ">":
        return value[1:-1]
    return value


def encode_block(
    envelope: Envelope,
    *,
    newline: bytes = b"\n",
    extensions: Iterable[tuple[str, str]] = (),
) -> bytes:
    """Return the block for an envelope, each line ending in ``newline``.

    With no extensions this is exactly the 1996 MAILFEED block.
    """
    sender = envelope.sender or NULL_SENDER_TEXT
    lines = [
        f"{FIELD_SENDER}: {sender}",
        f"{FIELD_COUNT}: {len(envelope.recipients)}",
    ]
    lines.extend(f"{FIELD_RECIPIENT}: {rcpt}" for rcpt in envelope.recipients)
    for name, value in extensions:
        if name.lower() not in EXTENSION_FIELDS:
            raise ValueError(f"unknown block extension field {name!r}")
        lines.append(f"{name}: {value}")
    return b"".join(line.encode("utf-8", "surrogateescape") + newline for line in lines)


def _check_extension_value(value: str) -> str:
    control = _find_control(value)
    if control is not None:
        raise ValueError(f"control character {control!r}")
    return value


# Optional fields that may follow the recipient lines, by lower-case name.
# Adding an extension is one entry here: a name and a value check.
EXTENSION_FIELDS: dict[str, Callable[[str], str]] = {
    "x-mailfeed-message-id": _check_extension_value,
    "x-mailfeed-signature": _check_extension_value,
}


def _split_field(line: bytes) -> tuple[bytes, bytes] | None:
    """Split a header line into lower-case name and value, without line end."""
    body = line.rstrip(b"\r\n") if line.endswith(b"\n") else line
    colon = body.find(b":")
    if colon <= 0:
        return None
    name = body[:colon]
    if any(c <= 0x20 or c >= 0x7F for c in name):
        return None
    return name.lower(), body[colon + 1 :].strip(b" \t")


def _decode_value(raw: bytes, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BlockDefect(line_no, "address is not valid UTF-8") from None


class _LineReader:
    """Read lines from a binary stream with a length cap, counting octets."""

    def __init__(self, stream: BinaryIO, max_line: int) -> None:
        self.stream = stream
        self.max_line = max_line
        self.line_no = 0
        self.offset = 0

    def next(self, *, limit: bool = True) -> bytes:
        """Return the next line; with ``limit``, raise BlockDefect if it is too long.

        Without ``limit`` a too-long line comes back cut at ``max_line + 1``
        octets, so the caller can tell it from a line that fits.
        """
        line = self.stream.readline(self.max_line + 1)
        if limit and len(line) > self.max_line:
            raise _too_long(self.line_no + 1, self.max_line)
        self.line_no += 1
        self.offset += len(line)
        return line


def _too_long(line_no: int, max_line: int) -> BlockDefect:
    return BlockDefect(line_no, f"block line longer than {max_line} octets")


def _diagnose_missing(reader: _LineReader, first: bytes) -> BlockDefect:
    """Explain why the first line is not a block line."""
    line_no = reader.line_no
    line = first
    for _ in range(DIAGNOSE_LINES):
        if line in (b"\n", b"\r\n", b""):
            break
        parts = _split_field(line)
        if parts and parts[0] == FIELD_SENDER.lower().encode():
            return BlockDefect(line_no, "block is not at the very top")
        try:
            line = reader.next()
        except BlockDefect:
            break
        line_no = reader.line_no
    return BlockDefect(1, "no block")


def read_block(
    stream: BinaryIO,
    *,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    allowed_above: frozenset[str] = frozenset(),
    max_line: int = MAX_BLOCK_LINE,
) -> Block:
    """Read the block from the start of a binary stream.

    The stream is left positioned after the block (and after any extension
    fields), at the first octet of the original message.  ``allowed_above``
    names trace fields (lower case, such as ``"return-path"``) that may stand
    above the block, as a local delivery agent on the MX may add them; they
    are skipped with their continuation lines and counted in the block length.
    Raise BlockDefect on any deviation.
    """
    reader = _LineReader(stream, max_line)
    first = reader.next()
    if first == b"":
        raise BlockDefect(1, "empty message")

    line = first
    if allowed_above:
        while True:
            parts = _split_field(line)
            if parts is None or parts[0].decode("ascii") not in allowed_above:
                break
            line = reader.next()
            while line[:1] in (b" ", b"\t"):
                line = reader.next()

    parts = _split_field(line)
    if parts is None or parts[0] != FIELD_SENDER.lower().encode():
        raise _diagnose_missing(reader, line)
    sender_line = reader.line_no
    sender_text = _decode_value(parts[1], sender_line)
    if sender_text == "":
        raise BlockDefect(sender_line, "empty sender")
    sender = normalise_address(sender_text)

    line = reader.next()
    parts = _split_field(line)
    if parts is None or parts[0] != FIELD_COUNT.lower().encode():
        raise BlockDefect(reader.line_no, f"{FIELD_COUNT} missing after {FIELD_SENDER}")
    count_text = parts[1]
    if not count_text or not count_text.isdigit() or not count_text.isascii():
        raise BlockDefect(reader.line_no, "recipient number is not decimal")
    count = int(count_text)
    if count < 1:
        raise BlockDefect(reader.line_no, "recipient number is 0")
    if count > max_recipients:
        raise BlockDefect(
            reader.line_no,
            f"recipient number {count} is over the limit of {max_recipients}",
        )

    recipients: list[str] = []
    rcpt_name = FIELD_RECIPIENT.lower().encode()
    for _ in range(count):
        line = reader.next()
        parts = _split_field(line)
        if parts is None or parts[0] != rcpt_name:
            raise BlockDefect(
                reader.line_no, f"{len(recipients)} address lines, {count} announced"
            )
        value = normalise_address(_decode_value(parts[1], reader.line_no))
        if value == "":
            raise BlockDefect(reader.line_no, "empty recipient address")
        try:
            recipients.append(validate_address(value))
        except InvalidAddress as exc:
            raise BlockDefect(reader.line_no, str(exc)) from None

    extensions: dict[str, str] = {}
    block_end = reader.offset
    while True:
        # This line may be the message's first line, which has no length limit.
        line = reader.next(limit=False)
        parts = _split_field(line)
        if parts is None:
            if line[:1] in (b" ", b"\t"):
                raise BlockDefect(
                    reader.line_no, "continuation line after the block (fields are not folded)"
                )
            break
        name = parts[0].decode("ascii")
        check = EXTENSION_FIELDS.get(name)
        if check is None or name in extensions:
            break
        if len(line) > max_line:
            raise _too_long(reader.line_no, max_line)
        try:
            extensions[name] = check(_decode_value(parts[1], reader.line_no))
        except ValueError as exc:
            raise BlockDefect(reader.line_no, f"invalid {name}: {exc}") from None
        block_end = reader.offset

    try:
        sender = validate_address(sender, allow_null=True)
    except InvalidAddress as exc:
        raise BlockDefect(sender_line, str(exc)) from None
    stream.seek(stream.tell() - (reader.offset - block_end))
    return Block(Envelope(sender, tuple(recipients)), block_end, extensions)


def parse_block(
    data: bytes,
    *,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    allowed_above: frozenset[str] = frozenset(),
) -> Block:
    """Parse the block at the start of ``data``; see :func:`read_block`."""
    return read_block(
        io.BytesIO(data), max_recipients=max_recipients, allowed_above=allowed_above
    )
