"""Block + message streaming and the mboxrd encoder, on bytes in memory."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfeed import faults
from mailfeed.config import Limits
from mailfeed.envelope import Envelope, encode_block
from mailfeed.errors import DataError
from mailfeed.spool import prepare
from mailfeed.spool.mbox import MboxrdEncoder, from_line
from mailfeed.spool.prepare import PreparedMessage, count_bare_lf

ENV = Envelope("alice@example.net", ("bob@example.org",))


def run(message: bytes, limits: Limits | None = None) -> tuple[bytes, PreparedMessage]:
    prepared = PreparedMessage(ENV, io.BytesIO(message), limits or Limits())
    return b"".join(prepared.chunks()), prepared


def test_block_lf_for_lf_message() -> None:
    data, _ = run(b"Subject: a\n\nbody\n")
    assert data == encode_block(ENV) + b"Subject: a\n\nbody\n"


def test_block_crlf_for_crlf_message() -> None:
    data, _ = run(b"Subject: a\r\n\r\nbody\r\n")
    assert data == encode_block(ENV, newline=b"\r\n") + b"Subject: a\r\n\r\nbody\r\n"


@pytest.mark.parametrize("message", [b"", b"Subject: no newline"])
def test_block_crlf_when_no_lf(message: bytes) -> None:
    data, _ = run(message)
    assert data == encode_block(ENV, newline=b"\r\n") + message


def test_final_bare_cr_completed_to_crlf() -> None:
    data, prepared = run(b"Subject: a\rX: b\r\r")
    assert data == encode_block(ENV, newline=b"\r\n") + b"Subject: a\rX: b\r\r\n"
    assert prepared.size == len(data)
    assert prepared.wsize == len(data)


def test_leading_from_line_dropped() -> None:
    data, _ = run(b"From alice@example.net Mon Mar  2 10:00:00 2026\nSubject: a\n\nFrom b\n")
    assert data == encode_block(ENV) + b"Subject: a\n\nFrom b\n"


def test_mailfeed_fields_removed_from_header_only() -> None:
    message = (
        b"X-Mailfeed-Sender: ceo@example.org\r\n"
        b"Subject: a\r\n"
        b"x-mailfeed-recipient-address : admin@example.org\r\n"
        b"\tcontinued@example.org\r\n"
        b"X-Mailfeed-Recipient-Number: 2\r\n"
        b"To: bob@example.org\r\n"
        b"X-Mailfeedback: kept\r\n"
        b"\r\n"
        b"X-Mailfeed-Sender: body line stays\r\n"
    )
    data, prepared = run(message)
    kept = (
        b"Subject: a\r\nTo: bob@example.org\r\nX-Mailfeedback: kept\r\n\r\n"
        b"X-Mailfeed-Sender: body line stays\r\n"
    )
    assert data == encode_block(ENV, newline=b"\r\n") + kept
    assert prepared.size == len(data)


def test_long_header_line_across_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare, "CHUNK_SIZE", 16)
    message = (
        b"X-Mailfeed-Long: " + b"x" * 100 + b"\n " + b"y" * 50 + b"\n"
        b"Subject: " + b"z" * 40 + b"\n\n" + b"b" * 100 + b"\n"
    )
    data, _ = run(message)
    # The first line is longer than one piece, so the block ends lines in CRLF.
    block = encode_block(ENV, newline=b"\r\n")
    assert data == block + b"Subject: " + b"z" * 40 + b"\n\n" + b"b" * 100 + b"\n"


def test_sizes_count_bare_lf_not_bare_cr() -> None:
    message = b"A: 1\r\nB: 2\n\nbare cr\rline\n"
    data, prepared = run(message)
    assert prepared.size == len(data)
    bare_lf = 3 + len(encode_block(ENV, newline=b"\r\n").split(b"\n")) - 1
    assert prepared.wsize == len(data) + bare_lf - 3


def test_wsize_with_crlf_split_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare, "CHUNK_SIZE", 7)
    message = b"A: 1\r\n\r\n" + b"123456\r\n" * 10
    data, prepared = run(message)
    assert prepared.wsize == len(data)


def test_count_bare_lf() -> None:
    assert count_bare_lf(b"a\nb\r\nc\n", False) == 2
    assert count_bare_lf(b"\nx", True) == 0
    assert count_bare_lf(b"\nx", False) == 1


def test_max_message_size_names_size_and_limit() -> None:
    with pytest.raises(DataError, match="message is 101 octets, over max_message_size of 100"):
        run(b"x" * 101, Limits(max_message_size=100))


def test_max_message_size_exact_fits() -> None:
    data, _ = run(b"x" * 100, Limits(max_message_size=100))
    assert data.endswith(b"x" * 100)


def test_max_message_size_zero_is_unlimited() -> None:
    data, _ = run(b"x" * 1000, Limits(max_message_size=0))
    assert data.endswith(b"x" * 1000)


def reference_mboxrd(data: bytes) -> bytes:
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    data = re.sub(rb"(?m)^(>*From )", rb">\1", data)
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data + b"\n"


def encode_split(data: bytes, cuts: list[int]) -> tuple[bytes, MboxrdEncoder]:
    encoder = MboxrdEncoder()
    out: list[bytes] = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out.extend(encoder.encode(data[previous:cut]))
        previous = cut
    out.extend(encoder.finish())
    return b"".join(out), encoder


def test_mboxrd_quotes_from_lines() -> None:
    data = b"From a\n>From b\n>>From c\nFrom:x\n From d\nFROM e\n\nFrom f"
    out, _ = encode_split(data, [])
    assert out == b">From a\n>>From b\n>>>From c\nFrom:x\n From d\nFROM e\n\n>From f\n\n"


def test_mboxrd_every_split_point() -> None:
    data = b">>From x\r\nFro\r\n\r\nFrom y\r\n>F\r\n>>>\r\nFrom"
    expected = reference_mboxrd(data)
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1, 3):
            out, _ = encode_split(data, [first, second])
            assert out == expected, (first, second)


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([b">", b"From ", b"Fr", b"\r\n", b"\n", b"\r", b"x"]))
    .map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_mboxrd_matches_reference(data: bytes, cuts: list[int]) -> None:
    out, encoder = encode_split(data, [c for c in cuts if c <= len(data)])
    assert out == reference_mboxrd(data)
    unquoted = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if unquoted and not unquoted.endswith(b"\n"):
        unquoted += b"\n"
    assert encoder.size == len(unquoted)
    assert encoder.wsize == len(unquoted) + count_bare_lf(unquoted, False)


def test_from_line_format() -> None:
    assert from_line("alice@example.net", 1772445602) == (
        b"From alice@example.net Mon Mar  2 10:00:02 2026\n"
    )
    assert from_line("", 0).startswith(b"From MAILER-DAEMON Thu Jan  1 00:00:00 1970")


def test_faults_configure_and_fire() -> None:
    try:
        faults.configure("a.b:enospc,c.d:eio")
        with pytest.raises(OSError, match=r"fault point a\.b") as info:
            faults.fault_point("a.b")
        assert info.value.errno == 28
        with pytest.raises(OSError) as info:
            faults.fault_point("c.d")
        assert info.value.errno == 5
        faults.fault_point("other")
        with pytest.raises(ValueError, match="bad"):
            faults.configure("bad")
    finally:
        faults.configure(None)
    faults.fault_point("a.b")
