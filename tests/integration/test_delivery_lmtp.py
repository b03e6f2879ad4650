"""LMTP target: aiosmtpd's LMTP server, a scripted server, TCP and unix socket."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from mailfeed.delivery import LmtpTarget, Outcome, target_from_url
from mailfeed.envelope import Envelope, read_block
from tests.integration.mta import RecordingHandler, ServerThread, scripted_server
from tests.support import case_bytes

THREE = Envelope("alice@example.net", ("a@example.org", "b@example.org", "c@example.org"))
BODY = b"Subject: x\r\n\r\n.dot line\r\nbody\r\n"


def test_lmtp_tcp_exact_bytes() -> None:
    stream = io.BytesIO(case_bytes("H05.retr-1.eml"))
    envelope = read_block(stream).envelope
    handler = RecordingHandler()
    with ServerThread(handler, lmtp=True) as server:
        target = target_from_url(f"lmtp://127.0.0.1:{server.port}", timeout=10)
        results = target.deliver(envelope, stream)
    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    assert handler.transactions[0].content == case_bytes("H05.eml")


def test_lmtp_reply_per_recipient_from_aiosmtpd() -> None:
    handler = RecordingHandler(lmtp_data_replies={
        "b@example.org": "452 4.2.2 mailbox full",
        "c@example.org": "550 5.1.1 no such user",
    })
    with ServerThread(handler, lmtp=True) as server:
        results = LmtpTarget("127.0.0.1", server.port, timeout=10).deliver(
            THREE, io.BytesIO(BODY))
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DEFERRED, Outcome.FAILED]
    assert [r.code for r in results] == [250, 452, 550]


def test_lmtp_scripted_three_outcomes() -> None:
    script = [
        ("LHLO", "250-scripted.test\r\n250 PIPELINING"),
        ("MAIL FROM:<alice@example.net>", "250 ok"),
        ("RCPT TO:<a@example.org>", "250 ok"),
        ("RCPT TO:<b@example.org>", "250 ok"),
        ("RCPT TO:<c@example.org>", "250 ok"),
        ("DATA", "354 go"),
        ("*DATA", "250 2.0.0 a ok\r\n452 4.2.2 b over quota\r\n550 5.1.1 c unknown"),
    ]
    with scripted_server(script) as (port, received):
        results = LmtpTarget("127.0.0.1", port, timeout=10).deliver(THREE, io.BytesIO(BODY))
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DEFERRED, Outcome.FAILED]
    assert "over quota" in results[1].text
    assert "c unknown" in results[2].text
    assert received[-3:] == [b"..dot line\r\n", b"body\r\n", b".\r\n"]


def test_lmtp_missing_replies_defer() -> None:
    script = [
        ("LHLO", "250 scripted.test"),
        ("MAIL", "250 ok"), ("RCPT", "250 ok"), ("RCPT", "250 ok"), ("RCPT", "250 ok"),
        ("DATA", "354 go"),
        ("*DATA", "250 2.0.0 a ok"),
        ("!close", ""),
    ]
    with scripted_server(script) as (port, _):
        results = LmtpTarget("127.0.0.1", port, timeout=3).deliver(THREE, io.BytesIO(BODY))
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DEFERRED, Outcome.DEFERRED]


def test_lmtp_unix_socket() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "lmtp.sock")
        handler = RecordingHandler()
        with ServerThread(handler, lmtp=True, unix_path=path):
            target = target_from_url(f"lmtp:{path}", timeout=10)
            results = target.deliver(THREE, io.BytesIO(BODY))
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 3
    assert handler.transactions[0].recipients == list(THREE.recipients)
    assert handler.transactions[0].content == b"Subject: x\r\n\r\n.dot line\r\nbody\r\n"


def test_lmtp_missing_socket_defers() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = target_from_url(f"lmtp:{tmp}/absent.sock", timeout=3)
        results = target.deliver(THREE, io.BytesIO(BODY))
    assert [r.outcome for r in results] == [Outcome.DEFERRED] * 3
    assert "absent.sock" in results[0].text
