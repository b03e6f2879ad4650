"""The fetch engine against hostile or broken POP3 servers and local MTAs.

Each test runs real sessions over 127.0.0.1 against a subclass of the
stateful test maildrop that misbehaves in one way, and checks the promises:
every recipient gets exactly one copy, nothing is deleted before its outcome
is recorded, and a bad message never blocks or loses the others.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import pytest

from mailfeed.delivery import RecipientResult, target_from_url
from mailfeed.envelope import Envelope
from mailfeed.errors import EX_DATAERR, EX_OK, EX_TEMPFAIL
from mailfeed.fetch import Fetcher, RunReport, dsn_sender_for
from mailfeed.fetchconfig import load_fetch_config
from mailfeed.state import MessageRecord, MessageStatus, StateStore
from tests.fetch_helpers import (
    MailboxServer,
    RecordingMta,
    _Message,
    block_message,
    stuff,
    write_config,
)
from tests.scripted_pop3 import Pop3Script, ScriptedPop3Server

BODY = b"From: alice@example.net\r\nSubject: hostile\r\n\r\nHello.\r\n"


def message_for(recipient: str, body: bytes = BODY) -> bytes:
    return block_message("alice@example.net", [recipient], body)


@pytest.fixture
def mta() -> Iterator[RecordingMta]:
    server = RecordingMta()
    yield server
    server.close()


def run_once(tmp: Path, mailbox: MailboxServer, mta_url: str, *, limits: str = "",
             quarantine: Path | None = None, timeouts: str = "",
             retry_quarantined: bool = False) -> RunReport:
    path = write_config(tmp / "site.toml", pop3_port=mailbox.port, mta_url=mta_url,
                        state=tmp / "state.sqlite",
                        quarantine=quarantine or tmp / "quarantine", limits=limits,
                        timeouts=timeouts)
    config = load_fetch_config(path)
    target = target_from_url(config.delivery, timeout=5)
    with StateStore.open(config.state) as store:
        fetcher = Fetcher(config, store, target,
                          dsn_sender=dsn_sender_for(target, config.dsn_reporting_mta),
                          retry_quarantined=retry_quarantined)
        return asyncio.run(fetcher.run())


def status_of(tmp: Path, uidl: str) -> MessageStatus | None:
    with StateStore.open(tmp / "state.sqlite") as store:
        record = store.get("mx1", uidl)
    return None if record is None else record.status


def reason_of(tmp: Path, uidl: str) -> str | None:
    with StateStore.open(tmp / "state.sqlite") as store:
        record = store.get("mx1", uidl)
    return None if record is None else record.reason


class ScriptedReplies(MailboxServer):
    """A maildrop that answers chosen commands (``"RETR 1"``, ``"LIST"``) with fixed bytes."""

    def __init__(self, messages: Sequence[tuple[str, bytes]],
                 replies: dict[str, bytes]) -> None:
        self.replies = replies
        super().__init__(list(messages))

    def _transaction(self, verb: str, arg: str, view: Sequence[_Message],
                     marked: set[int]) -> bytes:
        reply = self.replies.get(f"{verb} {arg}".strip())
        if reply is not None:
            return reply
        return super()._transaction(verb, arg, view, marked)


# -- UIDL reuse ---------------------------------------------------------------


def test_reused_uidl_after_expunge_is_delivered(tmp_path: Path, mta: RecordingMta) -> None:
    mailbox = MailboxServer([("u1", message_for("first@example.org"))])
    try:
        first = run_once(tmp_path, mailbox, mta.url)
        assert mailbox.uidls() == []
        # A server may reuse a unique-id once its message is gone (RFC 1939
        # section 7 only forbids reuse while the message exists).
        mailbox.add("u1", message_for("second@example.org"))
        second = run_once(tmp_path, mailbox, mta.url)
    finally:
        mailbox.close()
    assert first.exit_code == EX_OK
    assert second.exit_code == EX_OK
    assert mta.copies("first@example.org") == 1
    assert mta.copies("second@example.org") == 1
    assert mailbox.uidls() == []


def test_expunged_message_back_not_redelivered(tmp_path: Path, mta: RecordingMta) -> None:
    data = message_for("bob@example.org")
    mailbox = MailboxServer([("u1", data)])
    try:
        run_once(tmp_path, mailbox, mta.url)
        # The server acknowledged QUIT but kept the message after all.
        mailbox.add("u1", data)
        again = run_once(tmp_path, mailbox, mta.url)
    finally:
        mailbox.close()
    assert again.exit_code == EX_OK
    assert mta.copies("bob@example.org") == 1
    assert mailbox.uidls() == []


def test_final_uidl_with_new_size_is_retrieved(tmp_path: Path, mta: RecordingMta) -> None:
    mailbox = MailboxServer([("u1", message_for("first@example.org"))])
    try:
        # Deliver, then lose QUIT's effect: the state says FINAL/DELE_SENT.
        run_once(tmp_path, mailbox, mta.url)
        with StateStore.open(tmp_path / "state.sqlite") as store:
            record = store.get("mx1", "u1")
            assert record is not None
            store.set_status(record.id, MessageStatus.DELE_SENT)
        mailbox.add("u1", message_for("second@example.org", BODY + b"longer\r\n"))
        run_once(tmp_path, mailbox, mta.url)
    finally:
        mailbox.close()
    assert mta.copies("second@example.org") == 1
    assert mta.copies("first@example.org") == 1


# -- quarantine that cannot be written -------------------------------------------


def test_quarantine_unwritable_keeps_and_continues(tmp_path: Path, mta: RecordingMta) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the quarantine directory should be\n")
    bad = b"Subject: no block\r\n\r\nbody\r\n"
    mailbox = MailboxServer([("bad", bad), ("good", message_for("bob@example.org"))])
    try:
        report = run_once(tmp_path, mailbox, mta.url, quarantine=blocker)
    finally:
        mailbox.close()
    assert report.exit_code == EX_TEMPFAIL
    assert mta.copies("bob@example.org") == 1
    assert mailbox.uidls() == ["bad"]
    # Not recorded as quarantined, so the next session tries to quarantine it again.
    assert status_of(tmp_path, "bad") is None


# -- RETR failures are classified by kind, not by their text -------------------------


def test_retr_err_mentioning_line_is_temporary(tmp_path: Path, mta: RecordingMta) -> None:
    mailbox = ScriptedReplies([("u1", message_for("bob@example.org"))],
                              {"RETR 1": b"-ERR [SYS/TEMP] message store offline\r\n"})
    try:
        report = run_once(tmp_path, mailbox, mta.url)
    finally:
        mailbox.close()
    assert report.exit_code == EX_TEMPFAIL
    assert report.sources[0].skipped == 0
    assert status_of(tmp_path, "u1") is None
    assert mailbox.uidls() == ["u1"]


def test_unstuffed_dot_reason_names_it(tmp_path: Path, mta: RecordingMta) -> None:
    data = message_for("bob@example.org")
    wire = b"+OK\r\n" + stuff(data) + b".oops\r\n.\r\n"
    mailbox = ScriptedReplies([("u1", data)], {"RETR 1": wire,
                                               "LIST": b"+OK\r\n.\r\n"})
    try:
        report = run_once(tmp_path, mailbox, mta.url)
    finally:
        mailbox.close()
    assert mta.deliveries == []
    assert mailbox.uidls() == ["u1"]
    assert report.exit_code == EX_DATAERR
    reason = reason_of(tmp_path, "u1") or ""
    assert "byte-stuff" in reason
    assert "max_line_length" not in reason


def test_stalled_retr_skipped_after_max_attempts(tmp_path: Path, mta: RecordingMta,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # RETR 2 stops in the middle of its reply, every time: the session breaks at it.
    mailbox = ScriptedReplies(
        [(f"u{n}", message_for(f"rcpt{n}@example.org")) for n in (1, 2, 3)],
        {"RETR 2": b"+OK\r\nX-Mailfeed-Sender: alice@example.net\r\n"},
    )
    mailbox.pipelining = False

    def session(*, retry: bool = False) -> RunReport:
        return run_once(tmp_path, mailbox, mta.url, limits="max_retrieve_attempts = 2",
                        timeouts="message = 0.5", retry_quarantined=retry)

    def given_up() -> list[str]:
        return [r.getMessage() for r in caplog.records if "skipped from now on" in r.getMessage()]

    try:
        first = session()
        assert first.exit_code == EX_TEMPFAIL
        assert "RETR 2 did not end within limits.timeouts.message" in (
            first.sources[0].error or "")
        assert session().exit_code == EX_TEMPFAIL
        [line] = given_up()
        assert "(UIDL u2)" in line
        assert "2 retrievals in a row failed (max_retrieve_attempts = 2)" in line
        third = session()
        assert third.exit_code == EX_DATAERR
        assert third.sources[0].skipped == 1
        assert mailbox.uidls() == ["u2"]
        assert sorted(r for d in mta.deliveries for r in d.recipients) == [
            "rcpt1@example.org", "rcpt3@example.org"]
        assert session().exit_code == EX_DATAERR
        assert len(given_up()) == 1
        # --retry-quarantined clears the count: u2, now message 1, is tried again.
        mailbox.replies = {"RETR 1": mailbox.replies["RETR 2"]}
        assert session(retry=True).exit_code == EX_TEMPFAIL
        with StateStore.open(tmp_path / "state.sqlite") as store:
            assert store.retrieval_failures("mx1")["u2"][0] == 1
    finally:
        mailbox.close()


# -- sizes that lie ----------------------------------------------------------------


@pytest.mark.parametrize("list_reply", [b"+OK\r\n.\r\n", b"+OK\r\n1 300\r\n.\r\n"],
                         ids=["unlisted", "too-small"])
def test_lying_list_size_still_capped(tmp_path: Path, mta: RecordingMta,
                                      list_reply: bytes) -> None:
    big = message_for("bob@example.org", BODY + b"x" * 20_000 + b"\r\n")
    mailbox = ScriptedReplies([("big", big)], {"LIST": list_reply})
    try:
        report = run_once(tmp_path, mailbox, mta.url, limits="max_message_size = 4000")
    finally:
        mailbox.close()
    assert mta.deliveries == []
    assert mailbox.uidls() == ["big"]
    assert report.exit_code == EX_DATAERR
    assert "max_message_size = 4000" in (reason_of(tmp_path, "big") or "")


# -- a large mailbox ---------------------------------------------------------------


class CountingTarget:
    """A maildir target that counts its calls (the engine's deliveries)."""

    def __init__(self, root: Path) -> None:
        self.inner = target_from_url(f"maildir:{root}")
        self.calls = 0

    def deliver(self, envelope: Envelope, message: BinaryIO) -> list[RecipientResult]:
        self.calls += 1
        return self.inner.deliver(envelope, message)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: this test counts operations, not fsyncs."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="mailfeed-test-") as name:
        yield Path(name)


@pytest.mark.slow
def test_many_messages_bounded_flights(fast_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                       ) -> None:
    tmp_path = fast_dir
    count, window = 5000, 64
    messages = [(f"m{i}", message_for(f"r{i % 7}@example.org", b"Subject: %d\r\n\r\n.\r\n" % i))
                for i in range(count)]
    script = Pop3Script.from_messages(messages)
    listed_sets: set[int] = set()
    original = StateStore.find_delivered_by_digest

    def spy(store: StateStore, source: str, digest: str,
            listed: frozenset[str] | set[str]) -> MessageRecord | None:
        listed_sets.add(id(listed))
        return original(store, source, digest, listed)

    monkeypatch.setattr(StateStore, "find_delivered_by_digest", spy)
    statements: list[str] = []

    async def session() -> tuple[RunReport, ScriptedPop3Server]:
        async with ScriptedPop3Server(script) as server:
            path = write_config(tmp_path / "site.toml", pop3_port=server.port,
                                mta_url="smtp://127.0.0.1:9", state=tmp_path / "state.sqlite",
                                quarantine=tmp_path / "quarantine",
                                limits=f"pipelining_window = {window}")
            config = load_fetch_config(path)
            with StateStore.open(config.state) as store:
                store.db.set_trace_callback(statements.append)
                fetcher = Fetcher(config, store, target)
                return await fetcher.run(), server

    target = CountingTarget(tmp_path / "maildir")
    report, server = asyncio.run(session())
    assert report.exit_code == EX_OK
    assert report.sources[0].deleted == count
    assert target.calls == count
    dele_flights = [f for f in server.flights if any(line.startswith("DELE") for line in f)]
    retr_flights = [f for f in server.flights if any(line.startswith("RETR") for line in f)]
    assert max(len(f) for f in dele_flights) <= window
    assert len(dele_flights) <= 2 * (count // window + 1)
    assert max(len(f) for f in retr_flights) <= window
    # A batch goes out whenever half the window has drained.
    assert len(retr_flights) <= 2 * (count // (window // 2) + 1)
    # The UIDL listing is turned into a set once per session, not once per message.
    assert len(listed_sets) == 1
    # State work grows linearly: a bounded number of SQL statements per message.
    assert len(statements) <= 25 * count


# -- listings with rejected lines --------------------------------------------------


def test_rejected_uidl_lines_prune_nothing(tmp_path: Path, mta: RecordingMta) -> None:
    bad = b"Subject: no block\r\n\r\nbody\r\n"
    mailbox = MailboxServer([("u1", bad)])
    try:
        run_once(tmp_path, mailbox, mta.url)
        assert status_of(tmp_path, "u1") == MessageStatus.QUARANTINED
    finally:
        mailbox.close()
    # The same message, but the server now lists its unique-id twice.
    broken = ScriptedReplies([("u1", bad), ("u1", bad)],
                             {"UIDL": b"+OK\r\n1 u1\r\n2 u1\r\n.\r\n"})
    try:
        run_once(tmp_path, broken, mta.url)
    finally:
        broken.close()
    assert status_of(tmp_path, "u1") == MessageStatus.QUARANTINED


# -- local MTA and state file failures ------------------------------------------------


def test_mta_down_defers_everything(tmp_path: Path) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    mailbox = MailboxServer([("u1", message_for("bob@example.org")),
                             ("u2", message_for("carol@example.org"))])
    try:
        report = run_once(tmp_path, mailbox, f"smtp://127.0.0.1:{port}")
    finally:
        mailbox.close()
    assert report.exit_code == EX_TEMPFAIL
    # The first refused delivery ends retrieval for this session.
    assert report.sources[0].deferred == 1
    assert mailbox.uidls() == ["u1", "u2"]
    assert not any(c.startswith("DELE") for c in mailbox.commands)


def test_full_state_file_deletes_nothing(tmp_path: Path, mta: RecordingMta) -> None:
    mailbox = MailboxServer([(f"u{i}", message_for(f"r{i}@example.org", BODY * 50))
                             for i in range(40)])
    original = StateStore.open.__func__  # type: ignore[attr-defined]

    def open_full(cls: type[StateStore], path: Path, **kwargs: object) -> StateStore:
        store: StateStore = original(cls, path, **kwargs)
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        # SQLite then fails writes with SQLITE_FULL, as on a full disk.
        store.db.execute(f"PRAGMA max_page_count = {pages + 1}")
        return store

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(StateStore, "open", classmethod(open_full))
            report = run_once(tmp_path, mailbox, mta.url)
    finally:
        mailbox.close()
    assert report.exit_code == EX_TEMPFAIL
    assert "state file" in (report.sources[0].error or "")
    assert len(mailbox.uidls()) == 40
    assert not any(c.startswith("DELE") for c in mailbox.commands)
