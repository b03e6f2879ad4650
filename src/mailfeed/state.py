"""The fetcher's durable state: one SQLite file, rows per source and UIDL.

``mailfeed fetch`` records every outcome before it deletes anything.  It
delivers a batch of messages, then :meth:`StateStore.record_batch` writes
their rows, recipients and outcomes in one transaction (group commit), and
only then are DELE commands sent.  Only a message whose recipients are all
final may be deleted on the server.  A crash at any point therefore loses
nothing.  The only redelivery possible is of a recipient whose delivery was
accepted but whose outcome was not yet committed, so only the recipients of
the one batch in progress can get a second copy.

Tables (schema version :data:`SCHEMA_VERSION`, kept in ``PRAGMA user_version``):

``messages``
    one row per (source, UIDL): the SHA-256 digest of the full RETR bytes,
    the size, when it was first seen, its :class:`MessageStatus`, a reason
    (quarantine or skip), and when it vanished from the server.
``recipients``
    one row per (message, recipient): :class:`RecipientOutcome`, the last SMTP
    code and text, whether a DSN is owed (:class:`DsnStatus`), the time of
    the last update.
``retrieval_failures`` (since version 2)
    one row per (source, UIDL) whose RETR broke the session (a stall, a
    dropped connection, the per-message deadline): how many times in a row,
    the last error.  A successful retrieval deletes the row; after
    ``max_retrieve_attempts`` the fetcher leaves the message on the server.

Invariants:

* One process per state file: :meth:`StateStore.open` takes an exclusive
  ``fcntl.flock`` on ``<state>.lock`` and raises :class:`StateLocked` when
  another process has it.
* Every write method commits before it returns (WAL, ``synchronous=FULL``),
  so a returned call is on disk.  The exceptions are :meth:`StateStore.mark_dele_sent`,
  :meth:`StateStore.mark_expunged` and :meth:`StateStore.prune`, which commit
  without an fsync (``synchronous=NORMAL``): losing one of them in a power
  failure only repeats a harmless DELE or keeps a row longer, and the next
  fsynced commit makes them durable too.
* A message whose UIDL vanished from the server is pruned when nothing
  depends on it; a delivered but not expunged one is kept for
  :data:`DEFAULT_RETENTION` seconds, so that a mailbox migration that changes
  every UIDL is recognised by digest instead of delivered twice.
* Lookups go through indexes (source+UIDL, source+digest), so the store stays
  fast with millions of rows.

This module imports nothing of mailfeed.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_RETENTION",
    "FINAL_OUTCOMES",
    "SCHEMA_VERSION",
    "DsnStatus",
    "MessageRecord",
    "MessageStatus",
    "RecipientOutcome",
    "RecipientRecord",
    "RecordEntry",
    "StateError",
    "StateLocked",
    "StateStore",
]

SCHEMA_VERSION = 2
# Seconds a delivered message that vanished without a confirmed expunge is
# kept, so that its digest still matches if it reappears under a new UIDL.
DEFAULT_RETENTION = 90 * 24 * 3600.0
# Milliseconds SQLite waits for a lock held by a reader (a monitoring query).
BUSY_TIMEOUT_MS = 10_000
# Rows per IN (...) query: below SQLite's old limit of 999 host parameters.
QUERY_CHUNK = 500


class StateError(Exception):
    """The state file cannot be opened, read or written."""


class StateLocked(StateError):
    """Another process holds the state file's lock."""


class MessageStatus(StrEnum):
    """The stage a message has reached; see the module docstring."""

    # Recipients recorded, some not final yet (pending or deferred).
    DELIVERING = "delivering"
    # Every recipient delivered or failed (with its DSN sent): may be deleted.
    FINAL = "final"
    # The server acknowledged DELE, but not yet QUIT: not expunged yet.
    DELE_SENT = "dele_sent"
    # The server acknowledged QUIT after DELE: gone from the mailbox.
    EXPUNGED = "expunged"
    # Kept on the server: a copy is in quarantine (bad block, foreign recipient).
    QUARANTINED = "quarantined"
    # Kept on the server: over a limit (size, line length); logged once.
    SKIPPED = "skipped"
    # Recognised by digest under a new UIDL; this old row only waits for pruning.
    MIGRATED = "migrated"


# Statuses of a message that was delivered (fully or partly) but whose
# deletion is not confirmed: the candidates for a digest match.
DELIVERED_NOT_EXPUNGED = (MessageStatus.DELIVERING, MessageStatus.FINAL, MessageStatus.DELE_SENT)
# Statuses whose row may go as soon as the UIDL vanished from the server.
PRUNE_AT_ONCE = (
    MessageStatus.EXPUNGED,
    MessageStatus.QUARANTINED,
    MessageStatus.SKIPPED,
    MessageStatus.MIGRATED,
)


class RecipientOutcome(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


FINAL_OUTCOMES = frozenset({RecipientOutcome.DELIVERED, RecipientOutcome.FAILED})


class DsnStatus(StrEnum):
    """The state of the DSN owed to the sender for a failed recipient."""

    NONE = "none"
    PENDING = "pending"
    SENT = "sent"
    # Not sent: null sender, or the DSN itself failed permanently.
    DROPPED = "dropped"


@dataclass(frozen=True)
class MessageRecord:
    id: int
    source: str
    uidl: str
    digest: str | None
    size: int | None
    first_seen: float
    status: MessageStatus
    reason: str | None


@dataclass(frozen=True)
class RecipientRecord:
    recipient: str
    outcome: RecipientOutcome
    code: int | None
    text: str | None
    updated_at: float
    dsn: DsnStatus = DsnStatus.NONE


# (recipient, outcome, SMTP code, SMTP text) of one delivery.
OutcomeRow = tuple[str, RecipientOutcome, int | None, str | None]


@dataclass(frozen=True)
class RecordEntry:
    """One message of a group commit (see :meth:`StateStore.record_batch`).

    ``recipients`` are all of the block's recipients (added as pending when
    not known yet); ``outcomes`` are (recipient, outcome, code, text) of the
    deliveries just made; ``status`` becomes the message's status unless it
    is already FINAL or DELE_SENT.
    """

    source: str
    uidl: str
    digest: str
    size: int
    recipients: Sequence[str]
    outcomes: Sequence[OutcomeRow]
    status: MessageStatus


_SCHEMA_V1 = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    uidl TEXT NOT NULL,
    digest TEXT,
    size INTEGER,
    first_seen REAL NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    vanished_at REAL,
    updated_at REAL NOT NULL,
    UNIQUE (source, uidl)
);
CREATE INDEX messages_digest ON messages (source, digest);
CREATE INDEX messages_status ON messages (source, status);
CREATE TABLE recipients (
    message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    recipient TEXT NOT NULL,
    outcome TEXT NOT NULL,
    code INTEGER,
    text TEXT,
    dsn TEXT NOT NULL DEFAULT 'none',
    updated_at REAL NOT NULL,
    PRIMARY KEY (message_id, recipient)
) WITHOUT ROWID;
"""

_SCHEMA_V2 = """
CREATE TABLE retrieval_failures (
    source TEXT NOT NULL,
    uidl TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (source, uidl)
) WITHOUT ROWID;
"""

# Schema migrations: MIGRATIONS[n] takes a file from version n to n + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: lambda db: _run_script(db, _SCHEMA_V1),
    1: lambda db: _run_script(db, _SCHEMA_V2),
}


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction first: run one by one.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)

_MESSAGE_COLUMNS = "id, source, uidl, digest, size, first_seen, status, reason"


def _message(row: tuple[Any, ...]) -> MessageRecord:
    return MessageRecord(
        id=int(row[0]),
        source=str(row[1]),
        uidl=str(row[2]),
        digest=None if row[3] is None else str(row[3]),
        size=None if row[4] is None else int(row[4]),
        first_seen=float(row[5]),
        status=MessageStatus(row[6]),
        reason=None if row[7] is None else str(row[7]),
    )


def _chunks(items: Sequence[str], size: int = QUERY_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class StateStore:
    """The state file of one fetcher, opened under its exclusive lock."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock_fd: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.db = db
        self._lock_fd = lock_fd
        self.clock = clock

    # -- opening and closing -------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
             ) -> StateStore:
        """Lock and open the state file, creating or upgrading its schema.

        Raise StateLocked if another process holds ``<path>.lock`` and
        StateError if the file cannot be used.
        """
        state_path = Path(path)
        lock_path = state_path.with_name(state_path.name + ".lock")
        try:
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(lock_fd)
            os.close(lock_fd)
            raise StateLocked(
                f"another mailfeed fetch{holder} is using state file {state_path} "
                f"(lock {lock_path} is held); wait for it to finish"
            ) from None
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            db = sqlite3.connect(state_path, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            _migrate(db, state_path)
        except sqlite3.Error as exc:
            os.close(lock_fd)
            raise StateError(f"cannot open state file {state_path}: {exc}") from None
        except StateError:
            os.close(lock_fd)
            raise
        return cls(state_path, db, lock_fd, clock)

    def close(self) -> None:
        """Close the database and release the lock."""
        self.db.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups --------------------------------------------------------------

    def get(self, source: str, uidl: str) -> MessageRecord | None:
        row = self.db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE source = ? AND uidl = ?",
            (source, uidl),
        ).fetchone()
        return None if row is None else _message(row)

    def get_many(self, source: str, uidls: Sequence[str]) -> dict[str, MessageRecord]:
        """Return the known records among ``uidls``, by UIDL."""
        found: dict[str, MessageRecord] = {}
        for chunk in _chunks(uidls):
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE source = ? AND uidl IN ({marks})",
                (source, *chunk),
            )
            for row in rows:
                record = _message(row)
                found[record.uidl] = record
        return found

    def find_delivered_by_digest(self, source: str, digest: str,
                                 listed: frozenset[str] | set[str]) -> MessageRecord | None:
        """Return a delivered, not expunged record with this digest whose UIDL is not listed.

        A message still listed under its own UIDL is a different copy on the
        server, so it never matches.
        """
        statuses = tuple(str(s) for s in DELIVERED_NOT_EXPUNGED)
        rows = self.db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE source = ? AND digest = ? "
            f"AND status IN (?, ?, ?) ORDER BY id",
            (source, digest, *statuses),
        )
        for row in rows:
            record = _message(row)
            if record.uidl not in listed:
                return record
        return None

    def find_by_digest(self, source: str, digest: str) -> MessageRecord | None:
        row = self.db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE source = ? AND digest = ? "
            "ORDER BY id LIMIT 1",
            (source, digest),
        ).fetchone()
        return None if row is None else _message(row)

    def recipients(self, message_id: int) -> list[RecipientRecord]:
        rows = self.db.execute(
            "SELECT recipient, outcome, code, text, updated_at, dsn FROM recipients "
            "WHERE message_id = ? ORDER BY position",
            (message_id,),
        )
        return [
            RecipientRecord(str(r[0]), RecipientOutcome(r[1]), r[2], r[3], float(r[4]),
                            DsnStatus(r[5]))
            for r in rows
        ]

    def dsn_owed(self, message_id: int) -> list[RecipientRecord]:
        """Return the failed recipients whose DSN has not been handed over yet."""
        return [r for r in self.recipients(message_id) if r.dsn == DsnStatus.PENDING]

    def retrieval_failures(self, source: str) -> dict[str, tuple[int, str]]:
        """Return (failed attempts in a row, last error) by UIDL for ``source``."""
        rows = self.db.execute(
            "SELECT uidl, attempts, error FROM retrieval_failures WHERE source = ?", (source,)
        )
        return {str(uidl): (int(attempts), str(error)) for uidl, attempts, error in rows}

    def count(self, source: str | None = None) -> int:
        if source is None:
            row = self.db.execute("SELECT count(*) FROM messages").fetchone()
        else:
            row = self.db.execute(
                "SELECT count(*) FROM messages WHERE source = ?", (source,)
            ).fetchone()
        return int(row[0])

    # -- writes (each commits before it returns) -------------------------------

    def begin_message(self, source: str, uidl: str, digest: str, size: int,
                      recipients: Sequence[str]) -> MessageRecord:
        """Record a retrieved message and its recipients (pending unless known).

        Recipients already recorded keep their outcome; a FINAL or DELE_SENT
        status is kept, any other becomes DELIVERING.  Returns the record.
        """
        entry = RecordEntry(source, uidl, digest, size, recipients, (),
                            MessageStatus.DELIVERING)
        with self._transaction():
            return self._record_entry(entry, self.clock())

    def record_batch(self, entries: Sequence[RecordEntry]) -> list[MessageRecord]:
        """Record several messages with their outcomes in one transaction (one fsync).

        For each entry this is :meth:`begin_message` and
        :meth:`record_outcomes` together, with ``entry.status`` as the new
        status.  Returns the records, in the order of ``entries``.
        """
        if not entries:
            return []
        now = self.clock()
        with self._transaction():
            return [self._record_entry(entry, now) for entry in entries]

    def _record_entry(self, entry: RecordEntry, now: float) -> MessageRecord:
        kept = (str(MessageStatus.FINAL), str(MessageStatus.DELE_SENT))
        row = self.db.execute(
            "INSERT INTO messages (source, uidl, digest, size, first_seen, status, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (source, uidl) DO UPDATE SET digest = excluded.digest, "
            "size = excluded.size, updated_at = excluded.updated_at, vanished_at = NULL, "
            "status = CASE WHEN status IN (?, ?) THEN status ELSE excluded.status END "
            f"RETURNING {_MESSAGE_COLUMNS}",
            (entry.source, entry.uidl, entry.digest, entry.size, now, str(entry.status), now,
             *kept),
        ).fetchone()
        record = _message(row)
        self.db.executemany(
            "INSERT OR IGNORE INTO recipients (message_id, position, recipient, outcome, "
            "updated_at) VALUES (?, ?, ?, ?, ?)",
            [
                (record.id, position, rcpt, str(RecipientOutcome.PENDING), now)
                for position, rcpt in enumerate(entry.recipients)
            ],
        )
        if entry.outcomes:
            self._update_outcomes(record.id, entry.outcomes, now)
        return record

    def record_outcomes(self, message_id: int,
                        outcomes: Iterable[tuple[str, RecipientOutcome, int | None, str | None]],
                        ) -> None:
        """Store each recipient's outcome (recipient, outcome, code, text) durably.

        A FAILED outcome also marks the recipient's DSN as pending.
        """
        with self._transaction():
            self._update_outcomes(message_id, list(outcomes), self.clock())

    def _update_outcomes(self, message_id: int, outcomes: Iterable[OutcomeRow],
                         now: float) -> None:
        pending, none = str(DsnStatus.PENDING), str(DsnStatus.NONE)
        self.db.executemany(
            "UPDATE recipients SET outcome = ?, code = ?, text = ?, updated_at = ?, "
            "dsn = ? WHERE message_id = ? AND recipient = ?",
            [
                (str(outcome), code, text, now,
                 pending if outcome == RecipientOutcome.FAILED else none, message_id, rcpt)
                for rcpt, outcome, code, text in outcomes
            ],
        )

    def set_recipient_dsn(self, message_id: int, recipients: Sequence[str],
                          dsn: DsnStatus) -> None:
        with self._transaction():
            self.db.executemany(
                "UPDATE recipients SET dsn = ?, updated_at = ? "
                "WHERE message_id = ? AND recipient = ?",
                [(str(dsn), self.clock(), message_id, rcpt) for rcpt in recipients],
            )

    def set_status(self, message_id: int, status: MessageStatus, *,
                   reason: str | None = None) -> None:
        now = self.clock()
        with self._transaction():
            self.db.execute(
                "UPDATE messages SET status = ?, reason = coalesce(?, reason), "
                "updated_at = ? WHERE id = ?",
                (str(status), reason, now, message_id),
            )

    def mark_kept(self, source: str, uidl: str, status: MessageStatus, reason: str, *,
                  digest: str | None = None, size: int | None = None) -> bool:
        """Record a message kept on the server (quarantined or skipped).

        Return True if this is news (the row did not have this status yet),
        so the caller logs it once.
        """
        now = self.clock()
        with self._transaction():
            before = self.db.execute(
                "SELECT status FROM messages WHERE source = ? AND uidl = ?", (source, uidl)
            ).fetchone()
            self.db.execute(
                "INSERT INTO messages (source, uidl, digest, size, first_seen, status, reason, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (source, uidl) DO UPDATE SET status = excluded.status, "
                "reason = excluded.reason, digest = coalesce(excluded.digest, digest), "
                "size = coalesce(excluded.size, size), updated_at = excluded.updated_at, "
                "vanished_at = NULL",
                (source, uidl, digest, size, now, str(status), reason, now),
            )
        return before is None or before[0] != str(status)

    def adopt(self, old: MessageRecord, new_uidl: str, digest: str, size: int) -> MessageRecord:
        """Move a record to the new UIDL that its message now has on the server.

        The recipients and their outcomes move with it; the old row becomes
        MIGRATED and is pruned once its UIDL is gone.
        """
        now = self.clock()
        status = old.status
        if status == MessageStatus.DELE_SENT:
            # The DELE was for the old UIDL: the new one still has to be deleted.
            status = MessageStatus.FINAL
        with self._transaction():
            self.db.execute(
                "INSERT INTO messages (source, uidl, digest, size, first_seen, status, reason, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (source, uidl) DO UPDATE SET digest = excluded.digest, "
                "size = excluded.size, status = excluded.status, "
                "updated_at = excluded.updated_at, vanished_at = NULL",
                (old.source, new_uidl, digest, size, old.first_seen, str(status), old.reason,
                 now),
            )
            new_id = self._id(old.source, new_uidl)
            self.db.execute(
                "INSERT OR REPLACE INTO recipients (message_id, position, recipient, outcome, "
                "code, text, dsn, updated_at) SELECT ?, position, recipient, outcome, code, "
                "text, dsn, updated_at FROM recipients WHERE message_id = ?",
                (new_id, old.id),
            )
            self.db.execute(
                "UPDATE messages SET status = ?, reason = ?, updated_at = ? WHERE id = ?",
                (str(MessageStatus.MIGRATED), f"now UIDL {new_uidl}", now, old.id),
            )
        record = self.get(old.source, new_uidl)
        assert record is not None
        return record

    def add_retrieval_failure(self, source: str, uidl: str, error: str) -> int:
        """Count one more failed RETR of ``uidl``; return the attempts in a row so far."""
        with self._transaction():
            self.db.execute(
                "INSERT INTO retrieval_failures (source, uidl, attempts, error, updated_at) "
                "VALUES (?, ?, 1, ?, ?) ON CONFLICT (source, uidl) DO UPDATE SET "
                "attempts = attempts + 1, error = excluded.error, "
                "updated_at = excluded.updated_at",
                (source, uidl, error, self.clock()),
            )
            row = self.db.execute(
                "SELECT attempts FROM retrieval_failures WHERE source = ? AND uidl = ?",
                (source, uidl),
            ).fetchone()
        return int(row[0])

    def clear_retrieval_failures(self, source: str, uidl: str | None = None) -> None:
        """Forget the failed RETRs of ``uidl``, or of every UIDL of ``source``."""
        with self._transaction():
            if uidl is None:
                self.db.execute("DELETE FROM retrieval_failures WHERE source = ?", (source,))
            else:
                self.db.execute(
                    "DELETE FROM retrieval_failures WHERE source = ? AND uidl = ?",
                    (source, uidl),
                )

    def forget(self, message_id: int) -> None:
        """Delete a message row and its recipients (its UIDL now names another message)."""
        with self._transaction():
            self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def mark_dele_sent(self, message_ids: Sequence[int]) -> None:
        """Mark messages whose DELE the server accepted; committed without an fsync."""
        self._set_many(message_ids, MessageStatus.DELE_SENT)

    def mark_expunged(self, message_ids: Sequence[int]) -> None:
        """Mark messages whose deletion QUIT confirmed; committed without an fsync."""
        self._set_many(message_ids, MessageStatus.EXPUNGED)

    def prune(self, source: str, listed: Iterable[str], *,
              retention: float = DEFAULT_RETENTION) -> int:
        """Forget messages whose UIDL is no longer on the server; return how many.

        Call only with a complete UIDL listing of the source.  Rows that a
        digest match may still need (delivered, deletion not confirmed) are
        kept for ``retention`` seconds after they were first found missing.
        """
        now = self.clock()
        with self._transaction(durable=False):
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS listed (uidl TEXT PRIMARY KEY)")
            self.db.execute("DELETE FROM temp.listed")
            # One statement for the whole listing: executemany costs a statement
            # step per UIDL, which dominated pruning a mailbox of 100,000 messages.
            self.db.execute(
                "INSERT OR IGNORE INTO temp.listed (uidl) SELECT value FROM json_each(?)",
                (json.dumps(list(listed)),),
            )
            gone = "source = ? AND uidl NOT IN (SELECT uidl FROM temp.listed)"
            at_once = tuple(str(s) for s in PRUNE_AT_ONCE)
            marks = ",".join("?" * len(at_once))
            removed = self.db.execute(
                f"DELETE FROM messages WHERE {gone} AND (status IN ({marks}) "
                "OR (vanished_at IS NOT NULL AND vanished_at < ?))",
                (source, *at_once, now - retention),
            ).rowcount
            self.db.execute(
                f"UPDATE messages SET vanished_at = ? WHERE {gone} AND vanished_at IS NULL",
                (now, source),
            )
            self.db.execute(
                "UPDATE messages SET vanished_at = NULL WHERE source = ? AND vanished_at IS "
                "NOT NULL AND uidl IN (SELECT uidl FROM temp.listed)",
                (source,),
            )
            self.db.execute(
                "DELETE FROM retrieval_failures WHERE source = ? AND uidl NOT IN "
                "(SELECT uidl FROM temp.listed)",
                (source,),
            )
            self.db.execute("DELETE FROM temp.listed")
        return int(removed)

    # -- helpers ----------------------------------------------------------------

    def _id(self, source: str, uidl: str) -> int:
        row = self.db.execute(
            "SELECT id FROM messages WHERE source = ? AND uidl = ?", (source, uidl)
        ).fetchone()
        return int(row[0])

    def _set_many(self, message_ids: Sequence[int], status: MessageStatus) -> None:
        now = self.clock()
        with self._transaction(durable=False):
            self.db.executemany(
                "UPDATE messages SET status = ?, updated_at = ? WHERE id = ?",
                [(str(status), now, message_id) for message_id in message_ids],
            )

    def _transaction(self, *, durable: bool = True) -> _Transaction:
        return _Transaction(self.db, self.path, durable)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error.

    A transaction that is not ``durable`` commits with ``synchronous=NORMAL``
    (no fsync of the WAL; the next durable commit syncs it along).
    """

    def __init__(self, db: sqlite3.Connection, path: Path, durable: bool = True) -> None:
        self.db = db
        self.path = path
        self.durable = durable

    def __enter__(self) -> None:
        try:
            if not self.durable:
                self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if not self.durable:
                self.db.execute("PRAGMA synchronous = FULL")
            raise StateError(f"cannot write state file {self.path}: {exc}") from None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        try:
            self._finish(exc_type, exc)
        finally:
            if not self.durable:
                self.db.execute("PRAGMA synchronous = FULL")

    def _finish(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error as error:
                self._rollback()
                raise StateError(f"cannot commit to state file {self.path}: {error}") from None
        self._rollback()
        if isinstance(exc, sqlite3.Error):
            raise StateError(f"cannot write state file {self.path}: {exc}") from None

    def _rollback(self) -> None:
        # SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR),
        # and a second ROLLBACK would raise instead of reporting the first error.
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state file {path} has schema version {version}, newer than this mailfeed "
            f"(version {SCHEMA_VERSION}): upgrade mailfeed or use another state file"
        )
    while version < SCHEMA_VERSION:
        db.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](db)
            version += 1
            db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
