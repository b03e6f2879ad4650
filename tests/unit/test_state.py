"""Tests for mailfeed.state: records, lock, migration by digest, pruning, scale."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mailfeed.state import (
    SCHEMA_VERSION,
    DsnStatus,
    MessageStatus,
    RecipientOutcome,
    RecordEntry,
    StateError,
    StateLocked,
    StateStore,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> StateStore:
    with StateStore.open(tmp_path / "state.db", clock=clock) as opened:
        yield opened  # type: ignore[misc]


def test_pragmas_and_schema(store: StateStore) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_begin_and_record_outcomes(store: StateStore) -> None:
    record = store.begin_message("s1", "u1", "d1", 10, ["a@x", "b@x"])
    assert record.status == MessageStatus.DELIVERING
    assert [r.outcome for r in store.recipients(record.id)] == [RecipientOutcome.PENDING] * 2
    store.record_outcomes(record.id, [("a@x", RecipientOutcome.DELIVERED, 250, "ok"),
                                      ("b@x", RecipientOutcome.DEFERRED, 451, "later")])
    rows = store.recipients(record.id)
    assert [(r.recipient, r.outcome, r.code) for r in rows] == [
        ("a@x", RecipientOutcome.DELIVERED, 250), ("b@x", RecipientOutcome.DEFERRED, 451)]
    again = store.begin_message("s1", "u1", "d1", 10, ["a@x", "b@x"])
    assert again.id == record.id
    assert store.recipients(record.id)[0].outcome == RecipientOutcome.DELIVERED


def test_outcomes_survive_reopen(tmp_path: Path) -> None:
    with StateStore.open(tmp_path / "s.db") as store:
        record = store.begin_message("s1", "u1", "d1", 10, ["a@x"])
        store.record_outcomes(record.id, [("a@x", RecipientOutcome.DELIVERED, 250, "ok")])
        store.set_status(record.id, MessageStatus.FINAL)
    with StateStore.open(tmp_path / "s.db") as store:
        again = store.get("s1", "u1")
        assert again is not None
        assert again.status == MessageStatus.FINAL
        assert store.recipients(again.id)[0].outcome == RecipientOutcome.DELIVERED


def test_second_open_is_locked(tmp_path: Path) -> None:
    with StateStore.open(tmp_path / "s.db"):
        with pytest.raises(StateLocked, match="another mailfeed fetch"):
            StateStore.open(tmp_path / "s.db")
        code = (
            "import sys; from mailfeed.state import StateStore, StateLocked\n"
            "try:\n    StateStore.open(sys.argv[1])\n"
            "except StateLocked as exc:\n    print(exc); sys.exit(75)\n"
        )
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.db")],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 75
        assert "lock" in done.stdout
    # Released on close: a new open succeeds.
    StateStore.open(tmp_path / "s.db").close()


def test_schema_1_upgraded_keeps_rows(tmp_path: Path) -> None:
    from mailfeed.state import _SCHEMA_V1, _run_script

    path = tmp_path / "s.db"
    db = sqlite3.connect(path, isolation_level=None)
    _run_script(db, _SCHEMA_V1)
    db.execute("INSERT INTO messages (source, uidl, digest, size, first_seen, status, "
               "updated_at) VALUES ('s1', 'u1', 'd1', 10, 1.0, 'final', 1.0)")
    db.execute("PRAGMA user_version = 1")
    db.close()
    with StateStore.open(path) as store:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == 2
        record = store.get("s1", "u1")
        assert record is not None and record.status == MessageStatus.FINAL
        assert store.retrieval_failures("s1") == {}
        assert store.add_retrieval_failure("s1", "u1", "stalled") == 1
        assert store.add_retrieval_failure("s1", "u1", "reset") == 2
    with StateStore.open(path) as store:
        assert store.retrieval_failures("s1") == {"u1": (2, "reset")}


def test_retrieval_failures_cleared_and_pruned(store: StateStore) -> None:
    for uidl in ("u1", "u2", "u3"):
        store.add_retrieval_failure("s1", uidl, "stalled")
    store.add_retrieval_failure("s2", "u1", "stalled")
    store.clear_retrieval_failures("s1", "u1")
    assert sorted(store.retrieval_failures("s1")) == ["u2", "u3"]
    store.prune("s1", ["u3"])
    assert sorted(store.retrieval_failures("s1")) == ["u3"]
    store.clear_retrieval_failures("s1")
    assert store.retrieval_failures("s1") == {}
    assert store.retrieval_failures("s2") == {"u1": (1, "stalled")}


def test_newer_schema_rejected(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer than this mailfeed"):
        StateStore.open(tmp_path / "s.db")


def test_mark_kept_reports_news_once(store: StateStore) -> None:
    assert store.mark_kept("s1", "u1", MessageStatus.SKIPPED, "too big", size=5)
    assert not store.mark_kept("s1", "u1", MessageStatus.SKIPPED, "too big", size=5)
    assert store.mark_kept("s1", "u1", MessageStatus.QUARANTINED, "no block")


def test_digest_match_only_for_unlisted_delivered(store: StateStore) -> None:
    record = store.begin_message("s1", "old1", "dig", 10, ["a@x"])
    store.record_outcomes(record.id, [("a@x", RecipientOutcome.DELIVERED, 250, "ok")])
    store.set_status(record.id, MessageStatus.DELE_SENT)
    # Still listed under its own UIDL: another copy, no match.
    assert store.find_delivered_by_digest("s1", "dig", {"old1", "new1"}) is None
    # Other source: no match.
    assert store.find_delivered_by_digest("s2", "dig", {"new1"}) is None
    match = store.find_delivered_by_digest("s1", "dig", {"new1"})
    assert match is not None
    assert match.uidl == "old1"
    adopted = store.adopt(match, "new1", "dig", 10)
    assert adopted.status == MessageStatus.FINAL
    assert store.recipients(adopted.id)[0].outcome == RecipientOutcome.DELIVERED
    old = store.get("s1", "old1")
    assert old is not None
    assert old.status == MessageStatus.MIGRATED
    # Once expunged the old content no longer matches.
    store.mark_expunged([adopted.id])
    assert store.find_delivered_by_digest("s1", "dig", {"other"}) is None


def test_prune(store: StateStore, clock: Clock) -> None:
    gone = store.begin_message("s1", "gone", "d1", 1, ["a@x"])
    store.mark_expunged([gone.id])
    delivered = store.begin_message("s1", "delivered", "d2", 1, ["a@x"])
    store.set_status(delivered.id, MessageStatus.FINAL)
    store.mark_kept("s1", "skipped", MessageStatus.SKIPPED, "big")
    store.begin_message("s1", "listed", "d3", 1, ["a@x"])
    store.begin_message("s2", "other-source", "d4", 1, ["a@x"])
    assert store.prune("s1", ["listed"], retention=100) == 2
    assert store.get("s1", "gone") is None
    assert store.get("s1", "skipped") is None
    # Delivered but not expunged: kept for the retention period.
    assert store.get("s1", "delivered") is not None
    clock.now += 50
    assert store.prune("s1", ["listed"], retention=100) == 0
    clock.now += 51
    assert store.prune("s1", ["listed"], retention=100) == 1
    assert store.get("s1", "delivered") is None
    assert store.get("s1", "listed") is not None
    assert store.get("s2", "other-source") is not None


def test_many_rows_still_answer(tmp_path: Path) -> None:
    with StateStore.open(tmp_path / "big.db") as store:
        now = 1.0
        rows = [("s1", f"uid-{i:07d}", f"{i:064x}", 100, now, "expunged", now)
                for i in range(100_000)]
        store.db.execute("BEGIN")
        store.db.executemany(
            "INSERT INTO messages (source, uidl, digest, size, first_seen, status, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        store.db.execute("COMMIT")
        wanted = [f"uid-{i:07d}" for i in range(0, 100_000, 97)]
        found = store.get_many("s1", wanted)
        assert len(found) == len(wanted)
        assert store.find_by_digest("s1", f"{99_999:064x}") is not None
        plan = store.db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE source = ? AND digest = ?",
            ("s1", "x")).fetchall()
        assert "messages_digest" in str(plan)
        assert store.prune("s1", wanted) == 100_000 - len(wanted)
        assert store.count("s1") == len(wanted)


def test_failed_recipient_owes_dsn(store: StateStore) -> None:
    record = store.begin_message("s1", "u1", "d1", 10, ["a@x", "b@x"])
    store.record_outcomes(record.id, [("a@x", RecipientOutcome.FAILED, 550, "no such user"),
                                      ("b@x", RecipientOutcome.DELIVERED, 250, "ok")])
    assert [r.recipient for r in store.dsn_owed(record.id)] == ["a@x"]
    store.set_recipient_dsn(record.id, ["a@x"], DsnStatus.SENT)
    assert store.dsn_owed(record.id) == []
    assert store.recipients(record.id)[0].dsn == DsnStatus.SENT


def test_record_batch_is_one_transaction(store: StateStore) -> None:
    done = store.begin_message("s1", "old", "d0", 5, ["a@x"])
    store.set_status(done.id, MessageStatus.FINAL)
    commits: list[str] = []
    store.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    records = store.record_batch([
        RecordEntry("s1", "u1", "d1", 10, ["a@x", "b@x"],
                    [("a@x", RecipientOutcome.DELIVERED, 250, "ok"),
                     ("b@x", RecipientOutcome.FAILED, 550, "no")], MessageStatus.DELIVERING),
        RecordEntry("s1", "u2", "d2", 20, ["c@x"],
                    [("c@x", RecipientOutcome.DELIVERED, 250, "ok")], MessageStatus.FINAL),
        RecordEntry("s1", "old", "d0", 5, ["a@x"], [], MessageStatus.DELIVERING),
    ])
    store.db.set_trace_callback(None)
    assert commits == ["COMMIT"]
    assert [(r.uidl, r.status) for r in records] == [
        ("u1", MessageStatus.DELIVERING), ("u2", MessageStatus.FINAL),
        ("old", MessageStatus.FINAL)]
    assert [(r.recipient, r.outcome, r.dsn) for r in store.recipients(records[0].id)] == [
        ("a@x", RecipientOutcome.DELIVERED, DsnStatus.NONE),
        ("b@x", RecipientOutcome.FAILED, DsnStatus.PENDING)]
    assert store.get("s1", "u2") == records[1]


def test_status_marks_commit_without_fsync_then_restore_full(store: StateStore) -> None:
    record = store.begin_message("s1", "u1", "d1", 10, ["a@x"])
    seen: list[str] = []
    store.db.set_trace_callback(seen.append)
    store.mark_dele_sent([record.id])
    store.db.set_trace_callback(None)
    assert seen[0] == "PRAGMA synchronous = NORMAL"
    assert seen[-1] == "PRAGMA synchronous = FULL"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert store.get("s1", "u1").status == MessageStatus.DELE_SENT  # type: ignore[union-attr]
