"""Receive SMTP message data into a bounded buffer and an unnamed temporary file.

aiosmtpd 1.4 collects every DATA line in a list until the final ``.``, so a
session keeps the whole message in memory.  :class:`MessageData` replaces that
list: it keeps at most ``buffer_size`` octets in memory and writes the rest,
chunk by chunk, to a temporary file in the spool root.  The file is created
with :func:`tempfile.TemporaryFile`, which on Linux opens it with
``O_TMPFILE``, so it has no name and the kernel frees it when it is closed,
even when the process is killed.

Per line, :meth:`MessageData.receive` applies the receiver rules of RFC 5321:

* DATA ends only at a line that is exactly ``.<CRLF>`` (section 4.1.1.4).
  Lines end at CRLF only, so ``<LF>.<LF>``, ``<CR>.<LF>`` and ``<LF>.<CRLF>``
  inside a line never end the message.
* A leading ``.`` is removed from every other line (transparency, section
  4.5.2).
* The offset of the first bare CR or bare LF (section 2.3.8) is recorded, and
  nothing more is written after it, because the caller rejects such data.
* A line longer than ``line_length_limit`` octets (CRLF included) or data of
  more than ``size_limit`` octets after transparency removal (the message size of
  RFC 1870 section 5) is recorded as a rejection, the data read so far is
  dropped, and reading goes on to the final ``.``, so the reply comes after
  it (section 4.2.5) and the session stays in step.

Invariants: a session keeps at most ``buffer_size`` octets plus one line of
message data in memory, besides its stream reader's buffer (asyncio pauses
reading above twice the reader's limit, which aiosmtpd sets to the line
length limit).  File writes and reads run in worker threads, never in the event
loop.  The file is closed only after the last thread job that uses it ends,
so a job never sees a closed or reused file descriptor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import io
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "DATA_BUFFER_SIZE",
    "DataRejection",
    "MessageData",
    "find_bare_newline",
]

log = logging.getLogger(__name__)

# Octets of message data a session keeps in memory before it writes them to
# the temporary file.  A message up to this size never touches the disk.
DATA_BUFFER_SIZE = 256 * 1024
END_OF_DATA = b".\r\n"
CRLF = b"\r\n"

T = TypeVar("T")


class DataRejection(enum.Enum):
    """The reason the data of one DATA command is rejected."""

    LINE_TOO_LONG = "line too long"
    TOO_BIG = "message too big"
    WRITE_FAILED = "temporary file write failed"


def find_bare_newline(data: bytes) -> int:
    """Return the offset of the first bare CR or bare LF in ``data``, or -1."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return -1
    for offset, octet in enumerate(data):
        if octet == 0x0D and data[offset + 1 : offset + 2] != b"\n":
            return offset
        if octet == 0x0A and (offset == 0 or data[offset - 1] != 0x0D):
            return offset
    return -1  # pragma: no cover - the counts above differ only with a bare one


class PrefixedReader(io.RawIOBase):
    """A read-only stream of ``prefix`` followed by the rest of ``source``.

    Closing it leaves ``source`` open.
    """

    def __init__(self, prefix: bytes, source: BinaryIO) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        target = memoryview(buffer).cast("B")
        if self._prefix:
            count = min(len(target), len(self._prefix))
            target[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            return count
        data = self._source.read(len(target))
        target[: len(data)] = data
        return len(data)


class MessageData:
    """The data of one DATA command: a bounded memory buffer, then a temporary file.

    ``spill_dir`` receives the temporary file; ``executor`` runs its writes.
    ``size_limit`` of None or 0 means no limit.
    """

    def __init__(
        self,
        *,
        spill_dir: Path,
        executor: concurrent.futures.Executor,
        size_limit: int | None,
        line_length_limit: int,
        buffer_size: int = DATA_BUFFER_SIZE,
        session_id: str = "-",
    ) -> None:
        self.spill_dir = spill_dir
        self.executor = executor
        self.size_limit = size_limit or None
        self.line_length_limit = line_length_limit
        self.buffer_size = buffer_size
        self.session_id = session_id
        # Octets after transparency removal, counted also after a rejection.
        self.size = 0
        self.rejection: DataRejection | None = None
        self.bare_offset = -1
        self.bare_octet = 0
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self._job: concurrent.futures.Future[Any] | None = None

    @property
    def spilled(self) -> bool:
        """True when the data went to a temporary file."""
        return self._file is not None

    async def run(
        self, executor: concurrent.futures.Executor, func: Callable[..., T], *args: Any
    ) -> T:
        """Run ``func(*args)`` in ``executor``; the file stays open until it ends.

        When the awaiting task is cancelled, a job not started yet is
        cancelled and one already running finishes before :meth:`close`
        takes effect.
        """
        if self._job is not None and not self._job.done():
            raise RuntimeError("a thread job on this message data is still running")
        job = executor.submit(func, *args)
        self._job = job
        return await asyncio.wrap_future(job)

    async def receive(self, reader: asyncio.StreamReader) -> None:
        """Read lines up to and including the final ``.<CRLF>``.

        Raises asyncio.IncompleteReadError when the stream ends first.
        """
        at_line_start = True
        while True:
            try:
                line = await reader.readuntil(CRLF)
            except asyncio.LimitOverrunError as exc:
                # A part of a line too long for the reader's buffer: drop it
                # and keep reading until the line ends.
                await reader.readexactly(exc.consumed)
                self.reject(DataRejection.LINE_TOO_LONG)
                at_line_start = False
                continue
            if at_line_start and line == END_OF_DATA:
                break
            if not at_line_start or len(line) > self.line_length_limit:
                self.reject(DataRejection.LINE_TOO_LONG)
            at_line_start = True
            await self.add_line(line)
        await self.flush()

    async def add_line(self, line: bytes) -> None:
        """Add one CRLF-terminated line as received, before transparency removal."""
        if line[:1] == b".":
            line = line[1:]
        self.size += len(line)
        if self.size_limit is not None and self.size > self.size_limit:
            self.reject(DataRejection.TOO_BIG)
        if self.rejection is not None or self.bare_offset >= 0:
            return
        bare = find_bare_newline(line)
        if bare >= 0:
            self.bare_offset = self.size - len(line) + bare
            self.bare_octet = line[bare]
            self._discard()
            return
        self._buffer += line
        if len(self._buffer) >= self.buffer_size:
            await self.flush()

    def reject(self, reason: DataRejection) -> None:
        """Record the first rejection and drop the data kept so far."""
        if self.rejection is None:
            self.rejection = reason
            self._discard()

    async def flush(self) -> None:
        """Write the buffer to the temporary file, creating it first if needed.

        Does nothing while the whole data still fits in the buffer.  A write
        failure is logged and becomes :attr:`DataRejection.WRITE_FAILED`.
        """
        if self.rejection is not None or self.bare_offset >= 0:
            return
        if self._file is None and len(self._buffer) < self.buffer_size:
            return
        chunk = bytes(self._buffer)
        self._buffer.clear()
        try:
            await self.run(self.executor, self._write, chunk)
        except OSError as exc:
            log.error(
                "session=%s cannot write message data to a temporary file in %s: %s",
                self.session_id, self.spill_dir, exc,
            )
            self.reject(DataRejection.WRITE_FAILED)

    def _write(self, chunk: bytes) -> None:
        # Runs in a worker thread.
        if self._file is None:
            # close() closes it, once no thread job uses it.
            self._file = tempfile.TemporaryFile(  # noqa: SIM115
                dir=self.spill_dir, prefix=".mailfeed-data-"
            )
        self._file.write(chunk)

    def open_reader(self, prefix: bytes) -> BinaryIO:
        """Return a stream of ``prefix`` then the data, from its first octet.

        Call it from a thread job (see :meth:`run`) after :meth:`receive`.
        Each call starts again at the first octet.
        """
        source: BinaryIO
        if self._file is not None:
            self._file.flush()
            self._file.seek(0)
            source = self._file
        else:
            source = io.BytesIO(self._buffer)
        return io.BufferedReader(PrefixedReader(prefix, source))

    def _discard(self) -> None:
        self._buffer = bytearray()
        self.close()

    def close(self) -> None:
        """Close and so remove the temporary file once no thread job uses it."""
        job = self._job
        if job is not None and not job.done():
            job.add_done_callback(lambda _job: self._close_file())
        else:
            self._close_file()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()
