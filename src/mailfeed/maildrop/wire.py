"""The POP3 wire form of stored messages, and its size.

A message goes out with every bare LF sent as CRLF; CRLF and bare CR are
sent as stored.  A non-empty message whose last line has no line end gets
one CRLF appended, and that CRLF counts in its size, so LIST, STAT and the
octets RETR sends (before dot-stuffing) always agree.  An empty message is
sent as zero octets.  :class:`WireConverter` produces this form and
:func:`wire_size_of` counts it; both use the same rules.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

QUOTED_FROM_RE = re.compile(rb"^>(>*From )", re.MULTILINE)
# A partial line that may still become a quoted From line once more data arrives.
PARTIAL_QUOTED_FROM_RE = re.compile(rb">+(?:F(?:r(?:o(?:m)?)?)?)?")


class WireConverter:
    """Turn stored message bytes into the POP3 wire form, chunk by chunk.

    Bare LF becomes CRLF; CRLF and bare CR pass unchanged.  With ``unquote``
    (mboxrd), one ``>`` is removed from lines matching ``^>+From ``.
    :meth:`finish` appends CRLF when the output is non-empty and does not end
    with CRLF.  Output chunks never end between a CR and its LF.
    """

    def __init__(self, *, unquote: bool = False) -> None:
        self._unquote = unquote
        self._pending_cr = False
        self._tail = b""
        # mboxrd state: an incomplete line held back and whether the input is mid-line.
        self._carry = b""
        self._mid_line = False

    def feed(self, data: bytes) -> bytes:
        if self._unquote:
            data = self._unquote_chunk(data)
        return self._convert(data)

    def finish(self) -> bytes:
        data = self._carry
        self._carry = b""
        out = self._convert(data)
        if self._pending_cr:
            out += b"\r"
            self._pending_cr = False
            self._tail = (self._tail + b"\r")[-2:]
        if self._tail and self._tail != b"\r\n":
            out += b"\r\n"
            self._tail = b"\r\n"
        return out

    def _convert(self, data: bytes) -> bytes:
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        out = data.replace(b"\n", b"\r\n")
        if out:
            self._tail = (self._tail + out)[-2:]
        return out

    def _unquote_chunk(self, data: bytes) -> bytes:
        data = self._carry + data
        self._carry = b""
        head = b""
        if self._mid_line:
            newline = data.find(b"\n")
            if newline < 0:
                return data
            head, data = data[: newline + 1], data[newline + 1 :]
            self._mid_line = False
        last_newline = data.rfind(b"\n")
        body, tail = data[: last_newline + 1], data[last_newline + 1 :]
        body = QUOTED_FROM_RE.sub(rb"\1", body)
        if tail and PARTIAL_QUOTED_FROM_RE.fullmatch(tail):
            self._carry = tail
            tail = b""
        elif tail:
            tail = QUOTED_FROM_RE.sub(rb"\1", tail)
            self._mid_line = True
        return head + body + tail


def wire_size_of(stored: bytes, *, unquote: bool = False) -> int:
    """Return the octets :class:`WireConverter` produces for ``stored``."""
    if unquote:
        stored = QUOTED_FROM_RE.sub(rb"\1", stored)
    size = len(stored) + stored.count(b"\n") - stored.count(b"\r\n")
    if stored and not stored.endswith(b"\n"):
        size += 2
    return size


class MessageReader:
    """The wire form of one message, read from its file in chunks.

    Iterate for chunks (line ends converted, not dot-stuffed), or call
    :meth:`read_chunk` until it returns ``b""``.  Close it when done.
    """

    def __init__(
        self, fd: int, start: int, end: int | None, *, unquote: bool, chunk_octets: int
    ) -> None:
        self._fd = fd
        self._start = start
        self._offset = start
        self._end = end
        self._chunk_octets = chunk_octets
        self._converter = WireConverter(unquote=unquote)
        self._done = False

    @property
    def done(self) -> bool:
        """True once :meth:`read_chunk` has returned the last chunk."""
        return self._done

    @property
    def octets_read(self) -> int:
        """Octets of the file read so far."""
        return self._offset - self._start

    def read_chunk(self, max_octets: int = 0) -> bytes:
        """Return the next non-empty wire chunk, or ``b""`` at the end.

        ``max_octets`` (when positive) caps each read from the file, so that a
        caller can bound the time one call blocks; the call reads again only
        when a read gave no output (a lone CR or a held-back mboxrd line).
        """
        while not self._done:
            want = self._chunk_octets
            if max_octets > 0:
                want = min(want, max_octets)
            if self._end is not None:
                want = min(want, self._end - self._offset)
            data = os.pread(self._fd, want, self._offset) if want > 0 else b""
            if not data:
                self._done = True
                return self._converter.finish()
            self._offset += len(data)
            out = self._converter.feed(data)
            # Detect the end now (a short read is usually the end of the
            # file), so that the caller needs no further call, nor thread hop.
            if (self._end is not None and self._offset >= self._end) or (
                len(data) < want and not os.pread(self._fd, 1, self._offset)
            ):
                self._done = True
                out += self._converter.finish()
            if out:
                return out
        return b""

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read_chunk():
            yield chunk

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MessageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
