"""Stream the block and a message, as a spool stores them.

:class:`PreparedMessage` reads the message from a binary stream and yields
the block followed by the message in chunks of at most :data:`CHUNK_SIZE`
octets, so memory stays flat for any message size.  On the way it:

* drops a leading mbox ``From `` line (an MTA may pass one);
* removes every ``X-Mailfeed-*`` field, with its continuation lines, from the
  message's header section (up to the first empty line), so a sender cannot
  plant a second block; lines in the body are left alone;
* enforces ``Limits.max_message_size`` on the octets read from the stream;
* counts S, the octets yielded, and W, the octets with every bare LF counted
  as CRLF.  A bare CR counts as one octet, as in Dovecot's ``W=`` value.

The block's lines end like the message's first line: LF when that line ends
in a bare LF, CRLF otherwise (CRLF also when the first line is longer than
one chunk, ends in a bare CR, or the message is empty).  Apart from the
removals above, the message bytes pass through unchanged.

A line ends at LF only, as in the block reader: a bare CR is content.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO

from mailfeed.config import Limits
from mailfeed.envelope import Envelope, encode_block
from mailfeed.errors import DataError

__all__ = ["CHUNK_SIZE", "PreparedMessage", "count_bare_lf"]

CHUNK_SIZE = 64 * 1024
FIELD_PREFIX = b"x-mailfeed-"
MBOX_FROM = b"From "


def count_bare_lf(chunk: bytes, prev_cr: bool) -> int:
    """Count the LFs in ``chunk`` not preceded by CR; ``prev_cr``: the octet before was CR."""
    bare = chunk.count(b"\n") - chunk.count(b"\r\n")
    if prev_cr and chunk[:1] == b"\n":
        bare -= 1
    return bare


def _is_mailfeed_field(line: bytes) -> bool:
    """Return True when ``line`` starts an ``X-Mailfeed-*`` header field."""
    if line[: len(FIELD_PREFIX)].lower() != FIELD_PREFIX:
        return False
    colon = line.find(b":")
    if colon < 0:
        return False
    # RFC 5322 section 4.5.3 (obsolete syntax) allows white space before the colon.
    name = line[:colon].rstrip(b" \t")
    return all(0x21 <= c <= 0x7E for c in name)


class PreparedMessage:
    """The block plus one message as a stream of chunks.

    Iterate :meth:`chunks` once.  When it is exhausted, :attr:`size` (S) and
    :attr:`wsize` (W) hold the final counts.  It raises DataError when the
    message is over ``limits.max_message_size`` (after reading the rest of the
    input, so the error names the whole size).
    """

    def __init__(
        self,
        envelope: Envelope,
        message: BinaryIO,
        limits: Limits,
        *,
        extensions: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.envelope = envelope
        self.message = message
        self.limits = limits
        self.extensions = tuple(extensions)
        self.size = 0
        self.wsize = 0
        self.newline = b"\r\n"
        self._read = 0
        self._prev_cr = False

    def _input(self, data: bytes) -> bytes:
        self._read += len(data)
        limit = self.limits.max_message_size
        if limit and self._read > limit:
            self._drain_and_fail(limit)
        return data

    def _drain_and_fail(self, limit: int) -> None:
        while True:
            data = self.message.read(CHUNK_SIZE)
            if not data:
                break
            self._read += len(data)
        raise DataError(
            f"message is {self._read} octets, over max_message_size of {limit} octets"
        )

    def _output(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        self.wsize += len(chunk) + count_bare_lf(chunk, self._prev_cr)
        self._prev_cr = chunk[-1:] == b"\r"
        return chunk

    def _readline(self) -> bytes:
        return self._input(self.message.readline(CHUNK_SIZE))

    def chunks(self) -> Iterator[bytes]:
        """Yield the block, then the message, in chunks."""
        first = self._readline()
        if first.startswith(MBOX_FROM):
            line = first
            while line and not line.endswith(b"\n"):
                line = self._readline()
            first = self._readline()

        if first.endswith(b"\n") and not first.endswith(b"\r\n"):
            self.newline = b"\n"
        yield self._output(
            encode_block(self.envelope, newline=self.newline, extensions=self.extensions)
        )

        yield from self._header_section(first)
        while True:
            data = self._input(self.message.read(CHUNK_SIZE))
            if not data:
                break
            yield self._output(data)
        if self._prev_cr:
            # A final bare CR is a line end in the delivered form anyway.
            # Completing it to CRLF keeps a POP3 server from appending a
            # CRLF after it, which would add an empty line.
            yield self._output(b"\n")

    def _header_section(self, first: bytes) -> Iterator[bytes]:
        """Yield the header section without X-Mailfeed fields, and the empty line after it."""
        piece = first
        at_line_start = True
        dropping = False
        while piece:
            if at_line_start:
                if piece in (b"\n", b"\r\n"):
                    yield self._output(piece)
                    return
                if piece[:1] not in (b" ", b"\t"):
                    dropping = _is_mailfeed_field(piece)
            if not dropping:
                yield self._output(piece)
            at_line_start = piece.endswith(b"\n")
            piece = self._readline()
