"""The fetch engine against a stateful POP3 maildrop and a recording MTA on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailfeed.delivery import target_from_url
from mailfeed.errors import EX_DATAERR, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE
from mailfeed.fetch import EX_NOPERM, Fetcher, RunReport, combine_exit_codes, dsn_sender_for
from mailfeed.fetchconfig import load_fetch_config
from mailfeed.state import MessageStatus, StateStore
from tests.fetch_helpers import MailboxServer, RecordingMta, block_message, write_config

BODY = b"From: alice@example.net\r\nSubject: test\r\n\r\nHello.\r\n"


@pytest.fixture
def mta() -> Iterator[RecordingMta]:
    server = RecordingMta(rcpt_codes={"nobody@example.org": "550 5.1.1 no such user",
                                      "later@example.org": "451 4.3.0 try again"})
    yield server
    server.close()


def run_once(tmp: Path, mailbox: MailboxServer, mta: RecordingMta, *, limits: str = "",
             password: str = "pw-site1-example") -> RunReport:
    path = write_config(tmp / "site.toml", pop3_port=mailbox.port, mta_url=mta.url,
                        state=tmp / "state.sqlite", quarantine=tmp / "quarantine",
                        limits=limits)
    if password != "pw-site1-example":
        path.write_text(path.read_text().replace("pw-site1-example", password))
    config = load_fetch_config(path)
    target = target_from_url(config.delivery)
    with StateStore.open(config.state) as store:
        fetcher = Fetcher(config, store, target,
                          dsn_sender=dsn_sender_for(target, config.dsn_reporting_mta))
        return asyncio.run(fetcher.run())


def test_all_delivered_exit_0(tmp_path: Path, mta: RecordingMta) -> None:
    mailbox = MailboxServer([("u1", block_message("alice@example.net", ["bob@example.org"],
                                                  BODY))])
    try:
        report = run_once(tmp_path, mailbox, mta)
    finally:
        mailbox.close()
    assert report.exit_code == EX_OK
    assert mailbox.uidls() == []
    assert [d.recipients for d in mta.deliveries] == [["bob@example.org"]]
    assert mta.deliveries[0].data == BODY
    assert report.sources[0].deleted == 1


def test_deferred_recipient_kept_exit_75(tmp_path: Path, mta: RecordingMta) -> None:
    message = block_message("alice@example.net", ["bob@example.org", "later@example.org"], BODY)
    mailbox = MailboxServer([("u1", message)])
    try:
        first = run_once(tmp_path, mailbox, mta)
        second = run_once(tmp_path, mailbox, mta)
    finally:
        mailbox.close()
    assert first.exit_code == EX_TEMPFAIL
    assert second.exit_code == EX_TEMPFAIL
    assert mailbox.uidls() == ["u1"]
    # bob got it once; the second session only retried the deferred recipient.
    assert mta.copies("bob@example.org") == 1
    assert first.sources[0].kept_uidls == ["u1"]


def test_deferred_past_lifetime_fails_with_dsn(tmp_path: Path, mta: RecordingMta) -> None:
    message = block_message("alice@example.net", ["later@example.org"], BODY)
    mailbox = MailboxServer([("u1", message)])
    try:
        report = run_once(tmp_path, mailbox, mta)
        again = run_once(tmp_path, mailbox, mta, limits="max_queue_lifetime = 0.001")
    finally:
        mailbox.close()
    assert report.exit_code == EX_TEMPFAIL
    assert again.exit_code == EX_UNAVAILABLE
    assert mailbox.uidls() == []
    dsn = [d for d in mta.deliveries if d.sender == ""]
    assert [d.recipients for d in dsn] == [["alice@example.net"]]


def test_failed_recipient_gets_dsn_exit_69(tmp_path: Path, mta: RecordingMta) -> None:
    message = block_message("alice@example.net", ["bob@example.org", "nobody@example.org"],
                            BODY)
    mailbox = MailboxServer([("u1", message)])
    try:
        report = run_once(tmp_path, mailbox, mta)
    finally:
        mailbox.close()
    assert report.exit_code == EX_UNAVAILABLE
    assert mailbox.uidls() == []
    originals = [d for d in mta.deliveries if d.sender == "alice@example.net"]
    dsns = [d for d in mta.deliveries if d.sender == ""]
    assert [d.recipients for d in originals] == [["bob@example.org"]]
    assert [d.recipients for d in dsns] == [["alice@example.net"]]
    assert b"nobody@example.org" in dsns[0].data
    assert b"delivery-status" in dsns[0].data


def test_null_sender_failure_sends_no_dsn(tmp_path: Path, mta: RecordingMta) -> None:
    message = block_message("", ["nobody@example.org"], BODY)
    mailbox = MailboxServer([("u1", message)])
    try:
        report = run_once(tmp_path, mailbox, mta)
    finally:
        mailbox.close()
    assert mta.deliveries == []
    assert mailbox.uidls() == []
    assert report.exit_code == EX_UNAVAILABLE


def test_oversize_kept_and_logged_once(tmp_path: Path, mta: RecordingMta,
                                       caplog: pytest.LogCaptureFixture) -> None:
    big = block_message("alice@example.net", ["bob@example.org"], BODY + b"x" * 5000 + b"\r\n")
    small = block_message("alice@example.net", ["carol@example.org"], BODY)
    mailbox = MailboxServer([("big", big), ("small", small)])
    try:
        with caplog.at_level("INFO", logger="mailfeed"):
            first = run_once(tmp_path, mailbox, mta, limits="max_message_size = 4000")
            second = run_once(tmp_path, mailbox, mta, limits="max_message_size = 4000")
    finally:
        mailbox.close()
    assert mailbox.uidls() == ["big"]
    assert not any(c == "RETR 1" for c in mailbox.commands)
    assert first.exit_code == EX_DATAERR
    assert second.sources[0].skipped == 1
    lines = [r for r in caplog.text.splitlines() if "max_message_size = 4000" in r]
    assert len(lines) == 1
    assert "big" in lines[0]


def test_max_messages_per_session(tmp_path: Path, mta: RecordingMta) -> None:
    messages = [(f"u{i}", block_message("alice@example.net", [f"r{i}@example.org"], BODY))
                for i in range(5)]
    mailbox = MailboxServer(messages)
    try:
        first = run_once(tmp_path, mailbox, mta, limits="max_messages_per_session = 2")
        assert first.sources[0].retrieved == 2
        assert len(mailbox.uidls()) == 3
        run_once(tmp_path, mailbox, mta, limits="max_messages_per_session = 2")
        run_once(tmp_path, mailbox, mta, limits="max_messages_per_session = 2")
    finally:
        mailbox.close()
    assert mailbox.uidls() == []
    assert sorted(r for d in mta.deliveries for r in d.recipients) == [
        f"r{i}@example.org" for i in range(5)]


def test_rejected_password_exit_77(tmp_path: Path, mta: RecordingMta) -> None:
    mailbox = MailboxServer([("u1", block_message("a@example.net", ["b@example.org"], BODY))])
    try:
        report = run_once(tmp_path, mailbox, mta, password="wrong")
    finally:
        mailbox.close()
    assert report.exit_code == EX_NOPERM
    assert mailbox.uidls() == ["u1"]
    assert not any(c.startswith(("UIDL", "RETR")) for c in mailbox.commands)


def test_all_uidls_change_no_second_delivery(tmp_path: Path, mta: RecordingMta) -> None:
    messages = [(f"old{i}", block_message("alice@example.net", [f"r{i}@example.org"],
                                          BODY + b"%d\r\n" % i)) for i in range(3)]
    mailbox = MailboxServer(messages)
    try:
        report = run_once(tmp_path, mailbox, mta, limits="")
        assert report.exit_code == EX_OK
    finally:
        mailbox.close()
    # Rebuild the mailbox as if QUIT had been lost and then every UIDL changed.
    with StateStore.open(tmp_path / "state.sqlite") as store:
        for i in range(3):
            record = store.get("mx1", f"old{i}")
            assert record is not None
            store.set_status(record.id, MessageStatus.DELE_SENT)
    migrated = MailboxServer([(f"new{i}", data) for i, (_uidl, data) in enumerate(messages)])
    try:
        again = run_once(tmp_path, migrated, mta)
    finally:
        migrated.close()
    assert again.exit_code == EX_OK
    assert migrated.uidls() == []
    for i in range(3):
        assert mta.copies(f"r{i}@example.org") == 1


def test_combine_exit_codes() -> None:
    assert combine_exit_codes([]) == EX_OK
    assert combine_exit_codes([EX_OK, EX_DATAERR]) == EX_DATAERR
    assert combine_exit_codes([EX_DATAERR, EX_TEMPFAIL, EX_UNAVAILABLE]) == EX_TEMPFAIL
    assert combine_exit_codes([EX_TEMPFAIL, EX_NOPERM]) == EX_NOPERM


# -- the Maildir target: DSN and quarantine ----------------------------------------


def run_into_maildir(tmp: Path, mailbox: MailboxServer, root: Path) -> RunReport:
    path = write_config(tmp / "site.toml", pop3_port=mailbox.port, mta_url=f"maildir:{root}",
                        state=tmp / "state.sqlite", quarantine=tmp / "quarantine")
    config = load_fetch_config(path)
    target = target_from_url(config.delivery)
    with StateStore.open(config.state) as store:
        fetcher = Fetcher(config, store, target,
                          dsn_sender=dsn_sender_for(target, config.dsn_reporting_mta))
        return asyncio.run(fetcher.run())


def test_maildir_failed_recipient_dsn_fields(tmp_path: Path) -> None:
    # ".hidden" cannot name a Maildir folder, so that recipient fails.
    message = block_message("alice@example.net", ["bob@example.org", ".hidden@example.org"],
                            BODY)
    mailbox = MailboxServer([("u1", message)])
    root = tmp_path / "mail"
    try:
        report = run_into_maildir(tmp_path, mailbox, root)
    finally:
        mailbox.close()
    assert report.exit_code == EX_UNAVAILABLE
    assert mailbox.uidls() == []
    assert sorted(p.name for p in root.iterdir()) == ["alice@example.net", "bob@example.org"]
    [copy] = (root / "bob@example.org" / "new").iterdir()
    assert copy.read_bytes() == (b"Return-Path: <alice@example.net>\n"
                                 b"Delivered-To: bob@example.org\n"
                                 + BODY.replace(b"\r\n", b"\n"))
    [dsn] = (root / "alice@example.net" / "new").iterdir()
    lines = dsn.read_bytes().split(b"\n")
    assert lines[:2] == [b"Return-Path: <>", b"Delivered-To: alice@example.net"]
    assert b"Return-Path:" not in b"\n".join(lines[2:])
    assert b"Delivered-To:" not in b"\n".join(lines[2:])
    assert b".hidden@example.org" in dsn.read_bytes()
    assert b"delivery-status" in dsn.read_bytes()


def test_maildir_quarantine_copy_unchanged(tmp_path: Path) -> None:
    raw = b"Subject: no block\r\n\r\nbody\r\n"
    mailbox = MailboxServer([("u1", raw)])
    root = tmp_path / "mail"
    try:
        report = run_into_maildir(tmp_path, mailbox, root)
    finally:
        mailbox.close()
    assert report.exit_code == EX_DATAERR
    assert mailbox.uidls() == ["u1"]
    assert not root.exists() or list(root.iterdir()) == []
    [copy] = (tmp_path / "quarantine").rglob("*.eml")
    assert copy.read_bytes() == raw


def test_maildir_batches_deliver_each_once(tmp_path: Path) -> None:
    """Parallel deliveries in batches of 3: every copy once, one state commit per batch."""
    messages = [(f"u{n}", block_message("alice@example.net", ["bob@example.org"],
                                        b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n)))
                for n in range(8)]
    mailbox = MailboxServer(messages)
    root = tmp_path / "mail"
    path = write_config(tmp_path / "site.toml", pop3_port=mailbox.port,
                        mta_url=f"maildir:{root}", state=tmp_path / "state.sqlite",
                        quarantine=tmp_path / "quarantine")
    config = load_fetch_config(path)
    batches: list[int] = []
    try:
        with StateStore.open(config.state) as store:
            record_batch = store.record_batch

            def counting(entries: Any) -> Any:
                batches.append(len(entries))
                return record_batch(entries)

            store.record_batch = counting  # type: ignore[method-assign]
            fetcher = Fetcher(config, store, target_from_url(config.delivery), record_batch=3)
            report = asyncio.run(fetcher.run())
    finally:
        mailbox.close()
    assert report.exit_code == EX_OK
    assert batches == [3, 3, 2]
    assert mailbox.uidls() == []
    bodies = sorted(p.read_bytes().split(b"\n")[-2] for p in (root / "bob@example.org" / "new")
                    .iterdir())
    assert bodies == sorted(b"body %d" % n for n in range(8))
