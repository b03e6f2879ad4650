"""SMTP target against a real aiosmtpd server on 127.0.0.1: exact bytes and outcomes."""

from __future__ import annotations

import io
import json
from typing import BinaryIO

import pytest

from mailfeed.delivery import Outcome, RecipientResult, SmtpTarget, target_from_url
from mailfeed.envelope import Envelope, read_block
from mailfeed.errors import ConfigError
from tests.integration.mta import RecordingHandler, ServerThread, scripted_server
from tests.support import case_bytes, case_json


def stored(name: str) -> tuple[Envelope, BinaryIO]:
    """Return the envelope and the stream after the block of a stored case message."""
    stream = io.BytesIO(case_bytes(name))
    block = read_block(stream, max_recipients=2000)
    return block.envelope, stream


def deliver(server: ServerThread, envelope: Envelope, message: BinaryIO) -> list[RecipientResult]:
    target = target_from_url(f"smtp://127.0.0.1:{server.port}", timeout=10, helo="site.test")
    return target.deliver(envelope, message)


@pytest.mark.parametrize(
    ("stored_name", "expected_name"),
    [
        ("H05.retr-1.eml", "H05.eml"),
        ("H05b.spool.eml", "H05b.expected-delivered.eml"),
        ("H22.retr-1.eml", "H22.eml"),
        ("H23.retr-1.eml", "H23.eml"),
        ("H11.retr-1.eml", "H11.eml"),
        ("H08.retr-1.eml", "H08.eml"),
    ],
)
def test_smtp_delivers_exact_bytes(stored_name: str, expected_name: str) -> None:
    envelope, message = stored(stored_name)
    case = stored_name.split(".")[0]
    expected_envelope = case_json(f"{case}.envelope.json")
    handler = RecordingHandler()
    with ServerThread(handler) as server:
        results = deliver(server, envelope, message)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * len(envelope.recipients)
    assert [r.recipient for r in results] == expected_envelope["recipients"]
    assert len(handler.transactions) == 1
    txn = handler.transactions[0]
    assert txn.sender == expected_envelope["sender"]
    assert txn.recipients == expected_envelope["recipients"]
    assert txn.content == case_bytes(expected_name)


def test_smtp_8bit_uses_body_8bitmime() -> None:
    envelope, message = stored("H22.retr-1.eml")
    handler = RecordingHandler()
    with ServerThread(handler) as server:
        deliver(server, envelope, message)
    options = handler.transactions[0].mail_options
    assert "BODY=8BITMIME" in options
    assert any(o.startswith("SIZE=") for o in options)


def test_smtp_7bit_has_no_body_parameter() -> None:
    envelope, message = stored("H05.retr-1.eml")
    handler = RecordingHandler()
    with ServerThread(handler) as server:
        deliver(server, envelope, message)
    options = handler.transactions[0].mail_options
    assert not any(o.startswith("BODY=") for o in options)
    size = int(next(o for o in options if o.startswith("SIZE="))[5:])
    assert size == len(case_bytes("H05.eml"))


def test_smtp_null_sender_is_empty_path() -> None:
    envelope, message = stored("H11.retr-1.eml")
    assert envelope.sender == ""
    script = [
        ("EHLO", "250 scripted.test"),
        ("MAIL FROM:<>", "250 ok"),
        ("RCPT TO:<list-bounces@example.org>", "250 ok"),
        ("DATA", "354 go"),
        ("*DATA", "250 queued"),
    ]
    with scripted_server(script) as (port, received):
        results = SmtpTarget("127.0.0.1", port, timeout=10).deliver(envelope, message)
    assert results[0].outcome is Outcome.DELIVERED
    assert received[1] == b"MAIL FROM:<>\r\n"


def test_smtp_1200_recipients_two_transactions() -> None:
    envelope, message = stored("H08b.retr-1.eml")
    expected = case_json("H08b.envelope.json")["recipients"]
    assert len(envelope.recipients) == 1200
    handler = RecordingHandler(recipient_limit=1000)
    with ServerThread(handler) as server:
        results = deliver(server, envelope, message)
    assert all(r.outcome is Outcome.DELIVERED for r in results)
    assert [r.recipient for r in results] == expected
    assert len(handler.transactions) >= 2
    assert len(handler.transactions[0].recipients) == 1000
    got = [rcpt for txn in handler.transactions for rcpt in txn.recipients]
    assert sorted(got) == sorted(expected)
    assert len(set(got)) == len(got)
    for txn in handler.transactions:
        assert txn.content == case_bytes("H08b.eml")
        assert txn.sender == "alice@example.net"


def test_smtp_rcpt_codes_per_recipient() -> None:
    envelope = Envelope("alice@example.net", ("a@example.org", "b@example.org", "c@example.org"))
    handler = RecordingHandler(rcpt_replies={
        "b@example.org": "450 4.2.1 mailbox busy",
        "c@example.org": "550 5.1.1 no such user",
    })
    with ServerThread(handler) as server:
        results = deliver(server, envelope, io.BytesIO(b"Subject: x\r\n\r\nbody\r\n"))
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DEFERRED, Outcome.FAILED]
    assert results[1].code == 450
    assert results[2].code == 550
    assert "no such user" in results[2].text
    assert handler.transactions[0].recipients == ["a@example.org"]


@pytest.mark.parametrize(("reply", "outcome"), [
    ("451 4.3.0 try later", Outcome.DEFERRED),
    ("554 5.6.0 rejected", Outcome.FAILED),
])
def test_smtp_data_reply_applies_to_all(reply: str, outcome: Outcome) -> None:
    envelope = Envelope("alice@example.net", ("a@example.org", "b@example.org"))
    handler = RecordingHandler(data_reply=reply)
    with ServerThread(handler) as server:
        results = deliver(server, envelope, io.BytesIO(b"Subject: x\r\n\r\nbody\r\n"))
    assert [r.outcome for r in results] == [outcome, outcome]
    assert all(r.code == int(reply[:3]) for r in results)


def test_smtp_rejected_mail_from() -> None:
    envelope = Envelope("alice@example.net", ("a@example.org",))
    script = [("EHLO", "250 scripted.test"), ("MAIL", "553 5.7.1 sender rejected"),
              ("RSET", "250 ok")]
    with scripted_server(script) as (port, _):
        results = SmtpTarget("127.0.0.1", port, timeout=10).deliver(envelope, io.BytesIO(b"x\r\n"))
    assert results[0].outcome is Outcome.FAILED
    assert results[0].code == 553


@pytest.mark.parametrize("drop_after", ["EHLO", "MAIL", "RCPT", "DATA", "*DATA"])
def test_smtp_dropped_connection_defers(drop_after: str) -> None:
    envelope = Envelope("alice@example.net", ("a@example.org", "b@example.org"))
    full = [("EHLO", "250 scripted.test"), ("MAIL", "250 ok"), ("RCPT", "250 ok"),
            ("RCPT", "250 ok"), ("DATA", "354 go"), ("*DATA", "250 queued")]
    cut = next(i for i, step in enumerate(full) if step[0] == drop_after)
    script = [*full[:cut], (drop_after, "!close")]
    with scripted_server(script) as (port, _):
        results = SmtpTarget("127.0.0.1", port, timeout=10).deliver(
            envelope, io.BytesIO(b"Subject: x\r\n\r\nbody\r\n"))
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]
    assert "127.0.0.1" in results[0].text
    # Only a server that never completed its greeting counts as unreachable.
    assert results[0].unreachable is (drop_after == "EHLO")


def test_smtp_refused_connection_defers() -> None:
    envelope = Envelope("alice@example.net", ("a@example.org",))
    with scripted_server([]) as (port, _):
        pass  # the listener is closed now, so the port refuses connections
    results = SmtpTarget("127.0.0.1", port, timeout=5).deliver(envelope, io.BytesIO(b"x\r\n"))
    assert results[0].outcome is Outcome.DEFERRED
    assert results[0].unreachable is True


def test_smtp_smtputf8_address() -> None:
    envelope = Envelope("alice@example.net", ("jürgen@example.org", "bob@example.org"))
    handler = RecordingHandler()
    with ServerThread(handler, smtputf8=True) as server:
        results = deliver(server, envelope, io.BytesIO(b"Subject: x\r\n\r\nbody\r\n"))
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    txn = handler.transactions[0]
    assert "SMTPUTF8" in txn.mail_options
    assert txn.recipients == ["jürgen@example.org", "bob@example.org"]


def test_smtp_utf8_address_without_smtputf8_defers() -> None:
    envelope = Envelope("alice@example.net", ("jürgen@example.org", "bob@example.org"))
    handler = RecordingHandler()
    with ServerThread(handler, smtputf8=False) as server:
        results = deliver(server, envelope, io.BytesIO(b"Subject: x\r\n\r\nbody\r\n"))
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DELIVERED]
    assert "enable SMTPUTF8 on the local MTA" in results[0].text
    assert results[0].text.startswith("4.6.7 ")
    assert handler.transactions[0].recipients == ["bob@example.org"]
    assert "SMTPUTF8" not in handler.transactions[0].mail_options


def test_smtp_utf8_sender_without_smtputf8_defers() -> None:
    envelope = Envelope("josé@example.net", ("bob@example.org",))
    handler = RecordingHandler()
    with ServerThread(handler, smtputf8=False) as server:
        results = deliver(server, envelope, io.BytesIO(b"Subject: x\r\n\r\nbody\r\n"))
    assert [r.outcome for r in results] == [Outcome.DEFERRED]
    assert results[0].code == 451
    assert "enable SMTPUTF8 on the local MTA" in results[0].text
    assert handler.transactions == []


def test_smtp_envelope_recorded_as_json_roundtrip() -> None:
    # The recorded recipients of H08 keep the "+" address unchanged.
    envelope, message = stored("H08.retr-1.eml")
    handler = RecordingHandler()
    with ServerThread(handler) as server:
        deliver(server, envelope, message)
    assert json.dumps(handler.transactions[0].recipients) == json.dumps(
        case_json("H08.envelope.json")["recipients"])


def test_smtp_timeout_defers() -> None:
    envelope = Envelope("alice@example.net", ("a@example.org",))
    script = [("EHLO", "250 scripted.test"), ("MAIL", "250 ok"), ("RCPT", "!stall")]
    with scripted_server(script) as (port, _):
        results = SmtpTarget("127.0.0.1", port, timeout=0.5).deliver(
            envelope, io.BytesIO(b"x\r\n"))
    assert results[0].outcome is Outcome.DEFERRED
    assert "timed out" in results[0].text


def test_smtp_452_first_recipient_defers_all() -> None:
    envelope = Envelope("alice@example.net", ("a@example.org", "b@example.org"))
    handler = RecordingHandler(recipient_limit=0)
    with ServerThread(handler) as server:
        results = deliver(server, envelope, io.BytesIO(b"x\r\n"))
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]
    assert [r.code for r in results] == [452, 452]
    assert handler.transactions == []


def test_smtp_reply_line_over_max_line_defers() -> None:
    envelope = Envelope("alice@example.net", ("a@example.org",))
    script = [("EHLO", "250 " + "x" * 200)]
    with scripted_server(script) as (port, _):
        target = target_from_url(f"smtp://127.0.0.1:{port}", timeout=5, max_line=100)
        results = target.deliver(envelope, io.BytesIO(b"x\r\n"))
    assert results[0].outcome is Outcome.DEFERRED
    assert "longer than 100 octets" in results[0].text


@pytest.mark.parametrize("url", ["smtp:/x", "smtp://", "smtp://h:99999", "lmtp:relative",
                                 "maildir:relative", "pop3://h:1", "sendmail:", "smtp://h:0"])
def test_target_url_invalid(url: str) -> None:
    with pytest.raises(ConfigError, match="invalid delivery target"):
        target_from_url(url)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("250-a\r\n" * 5 + "250 end", "reply longer than 3 lines"),
        ("2500 ok", "malformed reply line '2500 ok'"),
        ("250-ok\r\n550 no", "malformed reply line '550 no'"),
    ],
)
def test_smtp_malformed_rcpt_reply_defers(reply: str, reason: str) -> None:
    envelope = Envelope("alice@example.net", ("a@example.org",))
    script = [("EHLO", "250 scripted.test"), ("MAIL", "250 ok"), ("RCPT", reply)]
    with scripted_server(script) as (port, _):
        target = target_from_url(f"smtp://127.0.0.1:{port}", timeout=5, max_reply_lines=3)
        results = target.deliver(envelope, io.BytesIO(b"x\r\n"))
    assert results[0].outcome is Outcome.DEFERRED
    assert reason in results[0].text
