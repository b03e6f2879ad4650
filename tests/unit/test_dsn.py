"""DSN builder: parsed back with the email package and checked against RFC 3464."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message

import pytest

from mailfeed.delivery import Outcome, RecipientResult
from mailfeed.dsn import build_dsn, dsn_envelope, should_send_dsn
from mailfeed.envelope import Envelope

ENVELOPE = Envelope("alice@example.net", ("bob@example.org", "carol@example.org"))
HEADERS = (b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\n"
           b"Subject: hello\r\nMessage-ID: <m1@example.net>\r\n\r\n")
FAILED = [
    RecipientResult("bob@example.org", Outcome.FAILED, 550,
                    "5.1.1 <bob@example.org>: no such user"),
    RecipientResult("carol@example.org", Outcome.FAILED, 69, "/usr/sbin/sendmail exited 69"),
]


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def build() -> EmailMessage:
    data = build_dsn(ENVELOPE, FAILED, HEADERS, reporting_mta="site.example.org",
                     arrival=datetime(2026, 3, 2, 10, 5, tzinfo=UTC))
    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    return parse(data)


def test_dsn_top_level_headers() -> None:
    message = build()
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@site.example.org"
    assert message["To"] == "alice@example.net"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"]
    assert message["Date"]


def test_dsn_three_parts_in_order() -> None:
    parts = list(build().iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    text = parts[0].get_content()
    assert "bob@example.org" in text
    assert "no such user" in text


def delivery_status_blocks(message: EmailMessage) -> list[Message]:
    part = list(message.iter_parts())[1]
    payload = part.get_payload()
    assert isinstance(payload, list)
    return payload


def test_dsn_per_message_fields() -> None:
    first = delivery_status_blocks(build())[0]
    assert first["Reporting-MTA"] == "dns; site.example.org"
    assert first["Arrival-Date"] == "Mon, 02 Mar 2026 10:05:00 +0000"


def test_dsn_per_recipient_fields() -> None:
    blocks = delivery_status_blocks(build())[1:]
    assert len(blocks) == 2
    bob, carol = blocks
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: no such user"
    assert carol["Final-Recipient"] == "rfc822; carol@example.org"
    assert carol["Status"] == "5.0.0"
    assert carol["Diagnostic-Code"] == "x-unix; /usr/sbin/sendmail exited 69"


def test_dsn_quotes_original_headers() -> None:
    part = list(build().iter_parts())[2]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.replace(b"\r\n", b"\n") == HEADERS.replace(b"\r\n", b"\n")


def test_dsn_8bit_headers_kept_exactly() -> None:
    headers = b"Subject: caf\xe9 \xff\r\n\r\n"
    data = build_dsn(ENVELOPE, FAILED[:1], headers, reporting_mta="site.example.org")
    part = list(parse(data).iter_parts())[2]
    assert part.get_payload(decode=True) == headers


def test_dsn_envelope_and_null_sender() -> None:
    assert dsn_envelope(ENVELOPE) == Envelope("", ("alice@example.net",))
    null = Envelope("", ("bob@example.org",))
    assert should_send_dsn(ENVELOPE)
    assert not should_send_dsn(null)
    with pytest.raises(ValueError, match="null sender"):
        build_dsn(null, FAILED, HEADERS, reporting_mta="site.example.org")
    with pytest.raises(ValueError, match="null sender"):
        dsn_envelope(null)


def test_dsn_rejects_non_failed_results() -> None:
    deferred = RecipientResult("bob@example.org", Outcome.DEFERRED, 451, "later")
    with pytest.raises(ValueError, match="deferred"):
        build_dsn(ENVELOPE, [deferred], HEADERS, reporting_mta="site.example.org")
    with pytest.raises(ValueError, match="at least one"):
        build_dsn(ENVELOPE, [], HEADERS, reporting_mta="site.example.org")
