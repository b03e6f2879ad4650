"""Line-end conversion of the delivery targets, fed bytes in memory."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfeed.delivery import convert as convert_module
from mailfeed.delivery import iter_converted


def convert(data: bytes, *, crlf: bool, stuff: bool) -> bytes:
    return b"".join(iter_converted(io.BytesIO(data), crlf=crlf, stuff=stuff))


def reference(data: bytes, *, crlf: bool, stuff: bool) -> bytes:
    """Convert the whole input at once, line by line."""
    if not data:
        return b""
    newline = b"\r\n" if crlf else b"\n"
    lines = re.split(rb"\r\n|\r|\n", data)
    if lines[-1] == b"":
        lines.pop()
    if stuff:
        lines = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + newline for line in lines)


@pytest.mark.parametrize(("data", "expected"), [
    (b"a\nb", b"a\r\nb\r\n"),
    (b"a\rb\r", b"a\r\nb\r\n"),
    (b"a\r\n\r\n", b"a\r\n\r\n"),
    (b".\n..\n.x", b"..\r\n...\r\n..x\r\n"),
    (b"", b""),
    (b"\r", b"\r\n"),
])
def test_smtp_form_examples(data: bytes, expected: bytes) -> None:
    assert convert(data, crlf=True, stuff=True) == expected


@pytest.mark.parametrize(("data", "expected"), [
    (b"a\r\nb", b"a\nb\n"),
    (b"a\rb\r\n", b"a\nb\n"),
    (b".\r\n", b".\n"),
    (b"\r\r\n\n", b"\n\n\n"),
])
def test_lf_form_examples(data: bytes, expected: bytes) -> None:
    assert convert(data, crlf=False, stuff=False) == expected


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=7),
       st.booleans(), st.booleans())
def test_chunked_equals_whole(data: bytes, chunk: int, crlf: bool, stuff: bool) -> None:
    original = convert_module.CHUNK_SIZE
    convert_module.CHUNK_SIZE = chunk
    try:
        got = convert(data, crlf=crlf, stuff=stuff)
    finally:
        convert_module.CHUNK_SIZE = original
    assert got == reference(data, crlf=crlf, stuff=stuff)


# Inputs dense in CR, LF and dots, so chunk edges often split a CRLF.
LINE_END_HEAVY = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a"]), max_size=200).map(b"".join)


@given(LINE_END_HEAVY, st.integers(min_value=1, max_value=5))
def test_chunk_boundaries_line_ends(data: bytes, chunk: int) -> None:
    original = convert_module.CHUNK_SIZE
    convert_module.CHUNK_SIZE = chunk
    try:
        got = convert(data, crlf=True, stuff=True)
    finally:
        convert_module.CHUNK_SIZE = original
    assert got == reference(data, crlf=True, stuff=True)
