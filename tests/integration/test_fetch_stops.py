"""The fetch engine's error paths: stops, an unreachable target, lost DSNs, released copies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailfeed.delivery import target_from_url
from mailfeed.errors import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE
from mailfeed.fetch import MAX_SUMMARY_UIDLS, Fetcher, RunReport, SourceReport, dsn_sender_for
from mailfeed.fetchconfig import load_fetch_config
from mailfeed.state import StateStore
from tests.fetch_helpers import MailboxServer, RecordingMta, block_message, write_config

BODY = b"From: alice@example.net\r\nSubject: test\r\n\r\nHello.\r\n"
# Port 1 on 127.0.0.1 has no listener here, so connections to it are refused.
DOWN_MTA = "smtp://127.0.0.1:1"


def make_fetcher(tmp: Path, mailbox: MailboxServer, mta_url: str, store: StateStore, *,
                 limits: str = "", local_domains: tuple[str, ...] = ("example.org",),
                 retry_quarantined: bool = False) -> Fetcher:
    path = write_config(tmp / "site.toml", pop3_port=mailbox.port, mta_url=mta_url,
                        state=tmp / "state.sqlite", quarantine=tmp / "quarantine",
                        limits=limits, local_domains=local_domains)
    config = load_fetch_config(path)
    target = target_from_url(config.delivery, timeout=5)
    return Fetcher(config, store, target,
                   dsn_sender=dsn_sender_for(target, config.dsn_reporting_mta),
                   retry_quarantined=retry_quarantined)


def run_once(tmp: Path, mailbox: MailboxServer, mta_url: str, **options: object) -> RunReport:
    with StateStore.open(tmp / "state.sqlite") as store:
        fetcher = make_fetcher(tmp, mailbox, mta_url, store, **options)  # type: ignore[arg-type]
        return asyncio.run(fetcher.run())


def messages(count: int) -> list[tuple[str, bytes]]:
    return [(f"u{i}", block_message("alice@example.net", [f"r{i}@example.org"], BODY))
            for i in range(count)]


def test_non_ascii_sender_without_smtputf8_deferred(tmp_path: Path) -> None:
    mta = RecordingMta(smtputf8=False)
    mailbox = MailboxServer([("u1", block_message("josé@example.net", ["bob@example.org"],
                                                  BODY))])
    try:
        report = run_once(tmp_path, mailbox, mta.url)
    finally:
        mailbox.close()
        mta.close()
    assert report.exit_code == EX_TEMPFAIL
    assert mailbox.uidls() == ["u1"]
    assert mta.deliveries == []
    assert report.sources[0].deferred == 1
    assert not (tmp_path / "quarantine").exists()


def test_lost_dsn_quarantines_copy(tmp_path: Path) -> None:
    # The recipient fails for good, and so does the DSN to the sender.
    mta = RecordingMta(rcpt_codes={"nobody@example.org": "550 5.1.1 no such user",
                                   "alice@example.net": "550 5.1.1 no such sender"})
    message = block_message("alice@example.net", ["nobody@example.org"], BODY)
    mailbox = MailboxServer([("u1", message)])
    try:
        report = run_once(tmp_path, mailbox, mta.url)
    finally:
        mailbox.close()
        mta.close()
    assert report.exit_code == EX_UNAVAILABLE
    assert mailbox.uidls() == []
    copies = list((tmp_path / "quarantine" / "mx1").glob("*.eml"))
    assert len(copies) == 1
    assert copies[0].read_bytes() == message
    reason = copies[0].with_suffix(".reason").read_text()
    assert "uidl: u1" in reason
    assert "DSN to <alice@example.net> failed for good" in reason
    assert "550 5.1.1 no such user" in reason


def test_stop_mid_session_exit_75(tmp_path: Path) -> None:
    mta = RecordingMta()
    mailbox = MailboxServer(messages(3))
    try:
        with StateStore.open(tmp_path / "state.sqlite") as store:
            fetcher = make_fetcher(tmp_path, mailbox, mta.url, store,
                                   limits="pipelining_window = 1")

            def stop_after_first(report: SourceReport, planned: int, octets: int) -> None:
                fetcher.stop_requested = True

            fetcher.progress = stop_after_first
            report = asyncio.run(fetcher.run())
    finally:
        mailbox.close()
        mta.close()
    assert report.exit_code == EX_TEMPFAIL
    assert report.sources[0].deleted == 1
    assert mailbox.uidls() == ["u1", "u2"]
    assert mailbox.commands[-1] == "QUIT"


def test_stop_before_run_no_session(tmp_path: Path) -> None:
    mailbox = MailboxServer(messages(1))
    try:
        with StateStore.open(tmp_path / "state.sqlite") as store:
            fetcher = make_fetcher(tmp_path, mailbox, DOWN_MTA, store)
            fetcher.stop_requested = True
            report = asyncio.run(fetcher.run())
            # A stop that arrives while connecting: no login either.
            single = asyncio.run(fetcher.run_source(fetcher.config.sources[0]))
    finally:
        mailbox.close()
    assert report.exit_code == EX_TEMPFAIL
    assert single.exit_code == EX_TEMPFAIL
    assert mailbox.sessions == 1
    assert not any(c.startswith(("USER", "PASS", "APOP", "AUTH")) for c in mailbox.commands)
    assert mailbox.uidls() == ["u0"]


def test_target_down_stops_retrieval(tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    mailbox = MailboxServer(messages(6))
    try:
        with caplog.at_level("ERROR", logger="mailfeed.fetch"):
            report = run_once(tmp_path, mailbox, DOWN_MTA, limits="pipelining_window = 1")
    finally:
        mailbox.close()
    assert report.exit_code == EX_TEMPFAIL
    assert report.sources[0].retrieved == 1
    assert len(mailbox.uidls()) == 6
    retrs = [c for c in mailbox.commands if c.startswith("RETR")]
    assert len(retrs) <= 2
    assert mailbox.commands[-1] == "QUIT"
    assert "cannot be reached" in caplog.text
    assert "delivery target down" in (report.sources[0].error or "")


def test_summary_caps_deferred_uidls() -> None:
    report = SourceReport("mx1", kept_uidls=[f"uidl{i}" for i in range(509)])
    line = report.summary()
    assert f"uidl{MAX_SUMMARY_UIDLS - 1} and {509 - MAX_SUMMARY_UIDLS} more" in line
    assert f"uidl{MAX_SUMMARY_UIDLS} " not in line
    assert len(line) < 400


def test_released_copy_moved_after_delivery(tmp_path: Path) -> None:
    mta = RecordingMta()
    message = block_message("alice@example.net", ["bob@example.net"], BODY)
    mailbox = MailboxServer([("u1", message)])
    try:
        first = run_once(tmp_path, mailbox, mta.url)
        folder = tmp_path / "quarantine" / "mx1"
        assert len(list(folder.glob("*.eml"))) == 1
        second = run_once(tmp_path, mailbox, mta.url,
                          local_domains=("example.org", "example.net"), retry_quarantined=True)
    finally:
        mailbox.close()
        mta.close()
    assert first.sources[0].quarantined == 1
    assert second.exit_code == EX_OK
    assert mta.copies("bob@example.net") == 1
    assert list(folder.glob("*.eml")) == []
    assert list(folder.glob("*.reason")) == []
    released = list((folder / "released").iterdir())
    assert sorted(path.suffix for path in released) == [".eml", ".reason"]
