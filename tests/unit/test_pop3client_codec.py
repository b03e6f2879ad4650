"""POP3 client parsing fed bytes in memory: status lines, listings, bodies."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfeed import pop3client
from mailfeed.pop3client import (
    Pop3ProtocolError,
    Pop3Timeout,
    Timeouts,
    mask_secrets,
    parse_list_listing,
    parse_uidl_listing,
)
from tests.scripted_pop3 import stuff

UID_70 = "u012345678901234567890123456789012345678901234567890123456789abcdefghi"
UID_71 = UID_70 + "j"


# -- status lines ---------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "ok", "text", "code"),
    [
        (b"+OK\r\n", True, "", None),
        (b"+OK Logged in.\r\n", True, "Logged in.", None),
        (b"-ERR\r\n", False, "", None),
        (b"-ERR [IN-USE] mailbox locked\r\n", False, "[IN-USE] mailbox locked", "IN-USE"),
        (b"-ERR [SYS/TEMP] try later\r\n", False, "[SYS/TEMP] try later", "SYS/TEMP"),
        (b"-ERR [AUTH] bad password\r\n", False, "[AUTH] bad password", "AUTH"),
    ],
)
def test_status_valid_lines(line: bytes, ok: bool, text: str, code: str | None) -> None:
    status = pop3client._parse_status(line, "PASS")
    assert status.ok is ok
    assert status.text == text
    assert status.code == code


@pytest.mark.parametrize(
    "line",
    [b"+ERR internal error while opening the mailbox\r\n", b"+OKAY\r\n", b"+\r\n", b"OK\r\n", b""],
)
def test_status_invalid_lines_raise(line: bytes) -> None:
    with pytest.raises(Pop3ProtocolError) as caught:
        pop3client._parse_status(line, "PASS")
    assert "PASS" in str(caught.value)


def test_status_error_quotes_line() -> None:
    with pytest.raises(Pop3ProtocolError, match=re.escape("'+ERR internal error")):
        pop3client._parse_status(b"+ERR internal error\r\n", "PASS")


# -- listings -------------------------------------------------------------


def test_uidl_h03_defects_and_good_entries() -> None:
    lines = [
        f"1 {UID_71}".encode(),
        b"2",
        b"x3 not-a-message-number",
        b"4 dup-0004",
        b"5 dup-0004",
        b"6 ok-0006",
        f"7 {UID_70}".encode(),
    ]
    listing = parse_uidl_listing(lines)
    assert listing.entries == {6: "ok-0006", 7: UID_70}
    reasons = [reason for _, reason in listing.defects]
    assert "message 1: unique-id longer than 70 octets (71)" in reasons
    assert "message 2: no unique-id" in reasons
    assert any(r.startswith("UIDL line 'x3 not-a-message-number' unparseable") for r in reasons)
    assert reasons.count("messages 4 and 5: duplicate unique-id dup-0004") == 2
    assert len(listing.defects) == 5


def test_uidl_duplicate_number_drops_both() -> None:
    listing = parse_uidl_listing([b"1 a", b"1 b", b"2 c"])
    assert listing.entries == {2: "c"}
    assert [raw for raw, _ in listing.defects] == ["1 a", "1 b"]


def test_uidl_bad_octets_and_extra_text() -> None:
    listing = parse_uidl_listing([b"1 caf\xe9", b"2 a b", b"0 zero", b"", b"3 ok"])
    assert listing.entries == {3: "ok"}
    reasons = [reason for _, reason in listing.defects]
    assert reasons[0] == "message 1: unique-id contains octets outside 0x21-0x7E"
    assert reasons[1] == "message 2: unexpected text after the unique-id"
    assert "unparseable" in reasons[2]
    assert reasons[3] == "empty UIDL line"


@given(st.lists(st.binary(max_size=90), max_size=20))
def test_uidl_never_raises(lines: list[bytes]) -> None:
    listing = parse_uidl_listing([line.replace(b"\n", b"") for line in lines])
    assert len(listing.entries) + len(listing.defects) <= len(lines)


def test_list_parse_sizes_and_defects() -> None:
    sizes, defects = parse_list_listing([b"1 100", b"2 x", b"3 5", b"3 6", b"4 7"])
    assert sizes == {1: 100, 4: 7}
    assert len(defects) == 3


# -- secrets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "masked"),
    [
        ("PASS pw-site1-example", "PASS ********"),
        ("APOP site1 c4c9334bac560ecc979e58001b3e22fb", "APOP site1 ********"),
        ("AUTH PLAIN AHNpdGUxAHB3", "AUTH PLAIN ********"),
        ("AUTH SCRAM-SHA-256", "AUTH SCRAM-SHA-256"),
        ("USER site1", "USER site1"),
        ("RETR 1", "RETR 1"),
    ],
)
def test_mask_secrets_commands(line: str, masked: str) -> None:
    assert mask_secrets(line) == masked


def test_mask_secrets_sasl_response() -> None:
    assert mask_secrets("Yz1iaXdzLHI9", sasl_response=True) == "********"
    assert mask_secrets("*", sasl_response=True) == "*"


# -- APOP timestamp ---------------------------------------------------------


@pytest.mark.parametrize(
    ("greeting", "timestamp"),
    [
        ("POP3 ready <1896.697170952@dbc.mtview.ca.us>", "<1896.697170952@dbc.mtview.ca.us>"),
        ("ready <a@[192.0.2.1]>", "<a@[192.0.2.1]>"),
        ("ready <no-at-sign>", None),
        ("ready <a b@example.net>", None),
        ("ready <a..b@example.net>", None),
        ("ready", None),
    ],
)
def test_apop_timestamp_must_be_msg_id(greeting: str, timestamp: str | None) -> None:
    assert pop3client._apop_timestamp(greeting) == timestamp


# -- bodies -----------------------------------------------------------------


def _client(limit: int, data_timeout: float = 5.0) -> tuple[pop3client.Pop3Client, object]:
    protocol = pop3client._StreamProtocol()
    client = pop3client.Pop3Client(
        pop3client._Connection(protocol, limit),
        peer="memory",
        session_id="unit",
        timeouts=Timeouts(data=data_timeout),
        loopback=True,
        allow_plaintext=False,
        tls_active=False,
        trace=None,
    )
    return client, protocol


def read_body(
    data: bytes, *, limit: int = 1024, chunk: int = 0, data_timeout: float = 5.0
) -> tuple[bytes, pop3client._BodyOutcome, bytes]:
    """Feed ``data`` (in chunks when ``chunk`` > 0) and read one body from it.

    Returns the unstuffed octets, the outcome and what is left in the buffer.
    """

    async def run() -> tuple[bytes, pop3client._BodyOutcome, bytes]:
        client, protocol = _client(limit, data_timeout)
        assert isinstance(protocol, pop3client._StreamProtocol)
        out: list[bytes] = []

        async def feed() -> None:
            step = chunk or len(data) or 1
            for start in range(0, len(data), step):
                protocol.data_received(data[start : start + step])
                await asyncio.sleep(0)

        feeder = asyncio.create_task(feed())
        outcome = await client._read_body(out.append)
        await feeder
        return b"".join(out), outcome, bytes(protocol.buffer)

    return asyncio.run(run())


def test_body_unstuffs_dot_lines_exactly() -> None:
    wire = b"a\r\n..\r\n...three\r\n..hidden\r\n.\r\nNEXT"
    content, outcome, rest = read_body(wire)
    assert content == b"a\r\n.\r\n..three\r\n.hidden\r\n"
    assert outcome.size == len(content)
    assert outcome.defect is None
    assert rest == b"NEXT"


def test_body_unstuffed_dot_line_is_defect() -> None:
    _content, outcome, rest = read_body(b"a\r\n.\nb\r\n.\r\n")
    assert outcome.defect is not None
    assert "single '.'" in outcome.defect
    assert rest == b""


def test_body_long_line_discarded_in_sync() -> None:
    wire = b"short\r\n" + b"x" * 5000 + b"\r\nafter\r\n.\r\n+OK next\r\n"
    _content, outcome, rest = read_body(wire, limit=1024, chunk=700)
    assert outcome.defect is not None
    assert "a line of 5002 octets exceeds max_line_length=1024" in outcome.defect
    assert rest == b"+OK next\r\n"


def test_body_line_at_limit_accepted() -> None:
    line = b"y" * 1022 + b"\r\n"
    content, outcome, _ = read_body(line + b".\r\n", limit=1024, chunk=100)
    assert outcome.defect is None
    assert content == line


def test_body_dot_cr_terminator_times_out() -> None:
    with pytest.raises(Pop3Timeout) as caught:
        read_body(b"line\r\n.\r", data_timeout=0.2)
    assert caught.value.phase == "data"
    assert "CR without LF" in str(caught.value)


def test_body_eof_before_terminator() -> None:
    async def run() -> None:
        client, protocol = _client(1024)
        assert isinstance(protocol, pop3client._StreamProtocol)
        protocol.data_received(b"partial\r\n")
        protocol.eof_received()
        await client._read_body(lambda data: None)

    with pytest.raises(Pop3ProtocolError, match="closed the connection"):
        asyncio.run(run())


_LINE = st.builds(
    lambda text, end: text + end,
    st.one_of(
        st.sampled_from([b"", b".", b"..", b".x", b". ", b"From x", b"\r"]),
        st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    ),
    st.sampled_from([b"\r\n", b"\n"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_LINE, max_size=30), st.integers(min_value=1, max_value=64))
def test_body_stuff_then_parse_round_trip(lines: list[bytes], chunk: int) -> None:
    body = b"".join(lines)
    content, outcome, rest = read_body(stuff(body), limit=4096, chunk=chunk)
    assert outcome.defect is None
    assert content == body
    assert outcome.size == len(body)
    assert rest == b""
