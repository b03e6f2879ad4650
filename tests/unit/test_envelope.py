"""Block codec: exact bytes written, every defect with its line, round trips."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfeed.envelope import (
    DEFAULT_MAX_RECIPIENTS,
    MAX_ADDRESS_OCTETS,
    MAX_BLOCK_LINE,
    BlockDefect,
    Envelope,
    InvalidAddress,
    encode_block,
    parse_block,
    read_block,
)
from tests.support import case_bytes, case_json

BLOCK_LF = (
    b"X-Mailfeed-Sender: alice@example.net\n"
    b"X-Mailfeed-Recipient-Number: 2\n"
    b"X-Mailfeed-Recipient-Address: bob@example.org\n"
    b"X-Mailfeed-Recipient-Address: carol@example.org\n"
)
ENV = Envelope("alice@example.net", ("bob@example.org", "carol@example.org"))
BODY = b"Subject: hi\r\n\r\nBody.\r\n"


def test_encode_exact_bytes_lf() -> None:
    assert encode_block(ENV) == BLOCK_LF


def test_encode_exact_bytes_crlf() -> None:
    assert encode_block(ENV, newline=b"\r\n") == BLOCK_LF.replace(b"\n", b"\r\n")


def test_encode_null_sender() -> None:
    block = encode_block(Envelope("", ("list-bounces@example.org",)))
    assert block.startswith(b"X-Mailfeed-Sender: <>\n")


def test_encode_extension_fields() -> None:
    block = encode_block(ENV, extensions=[("X-Mailfeed-Message-Id", "m1")])
    assert block == BLOCK_LF + b"X-Mailfeed-Message-Id: m1\n"


def test_encode_unknown_extension_rejected() -> None:
    with pytest.raises(ValueError, match="X-Mailfeed-Other"):
        encode_block(ENV, extensions=[("X-Mailfeed-Other", "x")])


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_parse_both_line_ends(newline: bytes) -> None:
    data = BLOCK_LF.replace(b"\n", newline) + BODY
    block = parse_block(data)
    assert block.envelope == ENV
    assert block.length == len(BLOCK_LF.replace(b"\n", newline))
    assert data[block.length :] == BODY


def test_read_block_leaves_stream_at_message() -> None:
    stream = io.BytesIO(BLOCK_LF + BODY)
    read_block(stream)
    assert stream.read() == BODY


def test_parse_angle_brackets_and_null() -> None:
    data = (
        b"X-Mailfeed-Sender: <>\r\n"
        b"X-Mailfeed-Recipient-Number: 1\r\n"
        b"X-Mailfeed-Recipient-Address: <bob@example.org>\r\n" + BODY
    )
    block = parse_block(data)
    assert block.envelope == Envelope("", ("bob@example.org",))


def test_parse_case_insensitive_names() -> None:
    data = BLOCK_LF.replace(b"X-Mailfeed-", b"x-MAILFEED-") + BODY
    assert parse_block(data).envelope == ENV


def test_parse_utf8_and_quoted_local_part() -> None:
    rcpts = ("\u00fc\u00f1\u00ee@example.org", '"john smith"@example.org')
    env = Envelope('"a\\"b"@example.net', rcpts)
    block = encode_block(env)
    assert b'"john smith"@example.org' in block
    assert parse_block(block + BODY).envelope == env


H07_LINES = {1: 1, 2: 1, 3: 5, 4: 2, 5: 3, 6: 2}


@pytest.mark.parametrize("number", sorted(H07_LINES))
def test_h07_defect_reason_and_line(number: int) -> None:
    reasons = case_json("H07.expected.json")["log_must_name"]
    data = case_bytes(f"H07.retr-{number}.eml")
    with pytest.raises(BlockDefect) as info:
        parse_block(data)
    assert info.value.reason == reasons[f"h07-uid-{number}"]
    assert info.value.line == H07_LINES[number]


def test_h07_valid_message() -> None:
    block = parse_block(case_bytes("H07.retr-7.eml"))
    assert block.envelope == Envelope("alice@example.net", ("bob@example.org",))
    assert case_bytes("H07.retr-7.eml")[block.length :] == case_bytes("H07.eml")


def test_h07_return_path_allowed_above() -> None:
    data = case_bytes("H07.retr-6.eml")
    block = parse_block(data, allowed_above=frozenset({"return-path"}))
    assert block.envelope.recipients == ("bob@example.org",)
    assert data[block.length :] == case_bytes("H07.eml")


@pytest.mark.parametrize(
    ("data", "line", "reason"),
    [
        (b"X-Mailfeed-Sender:\n", 1, "empty sender"),
        (
            b"X-Mailfeed-Sender: a@b\nX-Mailfeed-Recipient-Number: 0\n",
            2,
            "recipient number is 0",
        ),
        (
            b"X-Mailfeed-Sender: a@b\nSubject: x\n",
            2,
            "X-Mailfeed-Recipient-Number missing after X-Mailfeed-Sender",
        ),
        (
            b"X-Mailfeed-Sender: a@b\nX-Mailfeed-Recipient-Number: -1\n",
            2,
            "recipient number is not decimal",
        ),
        (
            b"X-Mailfeed-Sender: a@b\nX-Mailfeed-Recipient-Number: 1\n"
            b"X-Mailfeed-Recipient-Address: \xff@b\n",
            3,
            "address is not valid UTF-8",
        ),
        (
            b"X-Mailfeed-Sender: a@b\nX-Mailfeed-Recipient-Number: 2\n"
            b"X-Mailfeed-Recipient-Address: c@d\n\nbody\n",
            4,
            "1 address lines, 2 announced",
        ),
        (
            b"X-Mailfeed-Sender: a@b\nX-Mailfeed-Recipient-Number: 1\n"
            b"X-Mailfeed-Recipient-Address: c@d\nX-Mailfeed-Message-Id: a\x01b\n",
            4,
            "invalid x-mailfeed-message-id: control character '\\x01'",
        ),
        (b"Subject: x\n\nX-Mailfeed-Sender: a@b\n", 1, "no block"),
        (b"Subject: x\nX-Mailfeed-Sender: a@b\n", 2, "block is not at the very top"),
    ],
)
def test_defect_reasons(data: bytes, line: int, reason: str) -> None:
    with pytest.raises(BlockDefect) as info:
        parse_block(data)
    assert info.value.reason == reason
    assert info.value.line == line


def test_defect_control_character_in_address() -> None:
    data = (
        b"X-Mailfeed-Sender: a@b\nX-Mailfeed-Recipient-Number: 1\n"
        b"X-Mailfeed-Recipient-Address: c\x07@d\n"
    )
    with pytest.raises(BlockDefect) as info:
        parse_block(data)
    assert info.value.line == 3
    assert "control character" in info.value.reason


def test_defect_line_too_long() -> None:
    data = b"X-Mailfeed-Sender: " + b"a" * MAX_BLOCK_LINE + b"\n"
    with pytest.raises(BlockDefect) as info:
        parse_block(data)
    assert info.value.line == 1
    assert info.value.reason == f"block line longer than {MAX_BLOCK_LINE} octets"


def test_address_limit_256_octets() -> None:
    local = "a" * (MAX_ADDRESS_OCTETS - len("@example.org"))
    at_limit = local + "@example.org"
    assert len(at_limit.encode()) == MAX_ADDRESS_OCTETS
    Envelope("", (at_limit,))
    with pytest.raises(InvalidAddress, match="over the limit of 256"):
        Envelope("", ("a" + at_limit,))
    data = encode_block(Envelope("", (at_limit,))).replace(local.encode(), b"a" + local.encode())
    with pytest.raises(BlockDefect) as info:
        parse_block(data)
    assert info.value.line == 3


def test_address_limit_counts_utf8_octets() -> None:
    address = "\u00e9" * 122 + "@example.org"  # 244 + 12 = 256 octets
    Envelope("", (address,))
    with pytest.raises(InvalidAddress):
        Envelope("", ("\u00e9" + address,))


def test_max_recipients_default_and_raised() -> None:
    data = case_bytes("H08b.retr-1.eml")
    expected = case_json("H08b.envelope.json")
    with pytest.raises(BlockDefect) as info:
        parse_block(data)
    assert info.value.line == 2
    limit = DEFAULT_MAX_RECIPIENTS
    assert info.value.reason == f"recipient number 1200 is over the limit of {limit}"
    block = parse_block(data, max_recipients=1200)
    assert list(block.envelope.recipients) == expected["recipients"]
    assert data[block.length :] == case_bytes("H08b.eml")


def test_h09_lines_below_block_are_content() -> None:
    data = case_bytes("H09.retr-1.eml")
    block = parse_block(data)
    assert block.envelope == Envelope("mallory@example.net", ("sales@example.org",))
    rest = data[block.length :]
    assert rest.startswith(b"X-Mailfeed-Recipient-Address: postmaster@example.org\r\n")


def test_h11_null_sender_block() -> None:
    block = parse_block(case_bytes("H11.retr-1.eml"))
    assert block.envelope.sender == ""


@pytest.mark.parametrize(
    "address", ["", " a@b", "a@b ", "<a@b>", "a@b>", "a\n@b", "a\r@b", "a\x7f@b"]
)
def test_invalid_recipient_rejected(address: str) -> None:
    with pytest.raises(InvalidAddress):
        Envelope("", (address,))


def test_envelope_needs_a_recipient() -> None:
    with pytest.raises(InvalidAddress):
        Envelope("a@b", ())


addresses = (
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc")),
        min_size=1,
        max_size=80,
    )
    .filter(lambda a: a[0] not in " \t<" and a[-1] not in " \t>")
    .filter(lambda a: len(a.encode()) <= MAX_ADDRESS_OCTETS)
)
# A body may not start with an X-Mailfeed field (the writer removes those) or
# with white space (the reader takes that for a folded block field).
bodies = st.binary(max_size=300).filter(
    lambda b: not b[:11].lower().startswith(b"x-mailfeed-") and b[:1] not in (b" ", b"\t")
)


@settings(max_examples=300, deadline=None)
@given(
    sender=st.one_of(st.just(""), addresses),
    rcpts=st.lists(addresses, min_size=1, max_size=5),
    body=bodies,
    newline=st.sampled_from([b"\n", b"\r\n"]),
)
def test_round_trip(sender: str, rcpts: list[str], body: bytes, newline: bytes) -> None:
    env = Envelope(sender, tuple(rcpts))
    block = encode_block(env, newline=newline)
    parsed = parse_block(block + body)
    assert parsed.envelope == env
    assert parsed.length == len(block)


BLOCK = encode_block(Envelope("a@example.net", ("b@example.org",)))


@pytest.mark.parametrize(
    "message",
    [
        b"Received: " + b"x" * (2 * MAX_BLOCK_LINE) + b"\n\nbody\n",
        b"Subject: cr only\r" + b"y" * (2 * MAX_BLOCK_LINE) + b"\r",
    ],
)
def test_long_first_message_line_is_content(message: bytes) -> None:
    stream = io.BytesIO(BLOCK + message)
    block = read_block(stream)
    assert block.length == len(BLOCK)
    assert stream.read() == message


def test_long_extension_line_is_defect() -> None:
    data = BLOCK + b"X-Mailfeed-Message-Id: " + b"m" * MAX_BLOCK_LINE + b"\n\nbody\n"
    with pytest.raises(BlockDefect) as info:
        parse_block(data)
    assert info.value.line == 4
    assert info.value.reason == f"block line longer than {MAX_BLOCK_LINE} octets"


@pytest.mark.parametrize("fold", [b" ", b"\t"])
def test_folded_last_recipient_is_defect(fold: bytes) -> None:
    data = (
        b"X-Mailfeed-Sender: a@b\nX-Mailfeed-Recipient-Number: 1\n"
        b'X-Mailfeed-Recipient-Address: "first\n' + fold + b'last"@example.org\n'
        b"Subject: x\n\nbody\n"
    )
    with pytest.raises(BlockDefect) as info:
        parse_block(data)
    assert info.value.line == 4
    assert "not folded" in info.value.reason


def test_folded_extension_is_defect() -> None:
    data = BLOCK + b"X-Mailfeed-Message-Id: <a@b>\n <c@d>\nSubject: x\n\n"
    with pytest.raises(BlockDefect) as info:
        parse_block(data)
    assert info.value.line == 5


@pytest.mark.parametrize("address", ["\udcff@example.org", "a\x85@example.org", "a\x9f@b"])
def test_address_not_utf8_or_c1_rejected(address: str) -> None:
    with pytest.raises(InvalidAddress):
        Envelope(address, ("b@example.org",))
    with pytest.raises(InvalidAddress):
        Envelope("", (address,))


def test_repeated_recipient_kept_once() -> None:
    env = Envelope("a@b", ("x@example.org", "y@example.org", "x@example.org", "X@example.org"))
    assert env.recipients == ("x@example.org", "y@example.org", "X@example.org")
    assert b"X-Mailfeed-Recipient-Number: 3\n" in encode_block(env)


def test_repeated_recipient_in_block_read_once() -> None:
    data = (
        b"X-Mailfeed-Sender: a@b\nX-Mailfeed-Recipient-Number: 2\n"
        b"X-Mailfeed-Recipient-Address: x@example.org\n"
        b"X-Mailfeed-Recipient-Address: <x@example.org>\n\nbody\n"
    )
    assert parse_block(data).envelope.recipients == ("x@example.org",)
