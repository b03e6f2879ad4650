"""MessageData: SMTP DATA lines fed from memory, checked byte for byte."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfeed.smtpdata import DataRejection, MessageData, find_bare_newline
from tests.support import open_files_in

LINE_LIMIT = 1000


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


def new_data(
    folder: Path,
    executor: ThreadPoolExecutor,
    *,
    buffer_size: int = 64,
    size_limit: int | None = None,
    line_limit: int = LINE_LIMIT,
) -> MessageData:
    return MessageData(
        spill_dir=folder,
        executor=executor,
        size_limit=size_limit,
        line_length_limit=line_limit,
        buffer_size=buffer_size,
    )


def receive(data: MessageData, wire: bytes, *, reader_limit: int = 2**16) -> bytes:
    """Feed ``wire`` to ``data``; return what the reader contains after the final dot."""

    async def go() -> bytes:
        reader = asyncio.StreamReader(limit=reader_limit)
        reader.feed_data(wire)
        reader.feed_eof()
        await data.receive(reader)
        return await reader.read()

    return asyncio.run(go())


def content_of(data: MessageData, prefix: bytes = b"") -> bytes:
    with data.open_reader(prefix) as stream:
        return stream.read()


def reference(wire: bytes) -> tuple[bytes, int] | None:
    """Return aiosmtpd 1.4's content and the first bare CR/LF offset, or None if unended."""
    lines: list[bytes] = []
    rest = wire
    while True:
        line, separator, rest = rest.partition(b"\r\n")
        if not separator:
            return None
        if line == b".":
            break
        lines.append(line[1:] + b"\r\n" if line.startswith(b".") else line + b"\r\n")
    content = b"".join(lines)
    return content, find_bare_newline(content)


def test_small_message_stays_in_memory(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    data = new_data(tmp_path, executor, buffer_size=1024)
    after = receive(data, b"Subject: a\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
    assert after == b"QUIT\r\n"
    assert not data.spilled
    assert content_of(data) == b"Subject: a\r\n\r\n.dot\r\n"
    assert data.size == len(b"Subject: a\r\n\r\n.dot\r\n")
    assert data.rejection is None


def test_large_message_spills_exact_bytes(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    lines = [b"..%05d line\r\n" % n if n % 3 == 0 else b"%05d line\r\n" % n for n in range(500)]
    expected = b"".join(line[1:] if line.startswith(b"..") else line for line in lines)
    data = new_data(tmp_path, executor, buffer_size=100)
    receive(data, b"".join(lines) + b".\r\n")
    assert data.spilled
    assert data.size == len(expected)
    assert content_of(data, b"Received: x\r\n") == b"Received: x\r\n" + expected
    # Every reader starts again at the first octet.
    assert content_of(data) == expected
    data.close()
    executor.submit(lambda: None).result()
    assert open_files_in(tmp_path) == []


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b".\r\n"]), max_size=40),
    buffer_size=st.integers(min_value=1, max_value=12),
)
def test_matches_aiosmtpd_content(tmp_path: Path, pieces: list[bytes], buffer_size: int) -> None:
    wire = b"".join(pieces) + b"\r\n.\r\n"
    expected = reference(wire)
    assert expected is not None
    content, bare = expected
    with ThreadPoolExecutor(max_workers=1) as pool:
        data = new_data(tmp_path, pool, buffer_size=buffer_size)
        receive(data, wire)
        assert data.rejection is None
        assert data.bare_offset == bare
        assert data.size == len(content)
        if bare < 0:
            assert content_of(data) == content
        else:
            assert data.bare_octet == content[bare]
        data.close()


@pytest.mark.parametrize(
    ("fake_end", "offset"),
    [(b"\n.\n", 4), (b"\r.\n", 4), (b"\n.\r\n", 4), (b"\r\n.\n", 6)],
)
def test_fake_end_never_ends_data(
    tmp_path: Path, executor: ThreadPoolExecutor, fake_end: bytes, offset: int
) -> None:
    wire = b"body" + fake_end + b"MAIL FROM:<m@example.net>\r\nsmuggled\r\n.\r\nNOOP\r\n"
    data = new_data(tmp_path, executor, buffer_size=2)
    after = receive(data, wire)
    assert after == b"NOOP\r\n"
    assert data.bare_offset == offset
    assert data.rejection is None
    data.close()
    executor.submit(lambda: None).result()
    assert open_files_in(tmp_path) == []


def test_size_limit_counts_unstuffed_octets(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    exact = new_data(tmp_path, executor, size_limit=10)
    receive(exact, b"..abcdef\r\n.\r\n")
    assert exact.rejection is None
    assert content_of(exact) == b".abcdef\r\n"

    over = new_data(tmp_path, executor, size_limit=8)
    after = receive(over, b"..abcdef\r\nmore\r\n.\r\nRSET\r\n")
    assert over.rejection is DataRejection.TOO_BIG
    assert over.size == 15
    assert after == b"RSET\r\n"


def test_too_big_drops_spilled_data(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    data = new_data(tmp_path, executor, buffer_size=16, size_limit=100)
    receive(data, b"0123456789abcdef\r\n" * 20 + b".\r\n")
    assert data.rejection is DataRejection.TOO_BIG
    executor.submit(lambda: None).result()
    assert open_files_in(tmp_path) == []


@pytest.mark.parametrize("reader_limit", [2**16, 32])
def test_long_line_rejected_and_skipped(
    tmp_path: Path, executor: ThreadPoolExecutor, reader_limit: int
) -> None:
    data = new_data(tmp_path, executor, line_limit=40)
    wire = b"ok\r\n" + b"x" * 100 + b"\r\n.\r\n" + b"after\r\n.\r\nNOOP\r\n"
    after = receive(data, wire, reader_limit=reader_limit)
    assert data.rejection is DataRejection.LINE_TOO_LONG
    # The ".\r\n" right after the long line ends the data.
    assert after == b"after\r\n.\r\nNOOP\r\n"


def test_line_at_limit_accepted(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    data = new_data(tmp_path, executor, line_limit=40)
    line = b"y" * 38 + b"\r\n"
    receive(data, line + b".\r\n")
    assert data.rejection is None
    assert content_of(data) == line


def test_line_rejection_beats_bare_newline(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    data = new_data(tmp_path, executor, line_limit=40, size_limit=50)
    receive(data, b"bare\nline\r\n" + b"z" * 60 + b"\r\n.\r\n")
    assert data.bare_offset == 4
    assert data.rejection is DataRejection.LINE_TOO_LONG


def test_first_rejection_wins(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    data = new_data(tmp_path, executor, line_limit=40, size_limit=20)
    receive(data, b"y" * 30 + b"\r\n" + b"z" * 60 + b"\r\n.\r\n")
    assert data.rejection is DataRejection.TOO_BIG


def test_write_failure_rejects(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    data = new_data(tmp_path / "missing", executor, buffer_size=4)
    after = receive(data, b"first line\r\nsecond\r\n.\r\nQUIT\r\n")
    assert data.rejection is DataRejection.WRITE_FAILED
    assert after == b"QUIT\r\n"


def test_close_waits_for_running_job(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    data = new_data(tmp_path, executor, buffer_size=4)
    receive(data, b"spilled line\r\n.\r\n")
    assert len(open_files_in(tmp_path)) == 1
    started = threading.Event()
    release = threading.Event()

    def job() -> bytes:
        started.set()
        release.wait(timeout=10)
        return content_of(data)

    async def run_and_cancel() -> None:
        task = asyncio.create_task(data.run(executor, job))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_and_cancel())
    data.close()
    # The job still reads the file, so it stays open until the job ends.
    assert len(open_files_in(tmp_path)) == 1
    release.set()
    executor.submit(lambda: None).result()
    assert open_files_in(tmp_path) == []
