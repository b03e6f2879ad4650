"""The fetch engine: drain POP3 mailboxes into the local MTA, exactly once.

For each configured source one session runs::

    connect (TLS rules) -> CAPA -> login (USER+PASS: one flight with PIPELINING)
      -> UIDL + LIST (one flight)
      -> queue DELE for what the state records as fully handled (no RETR)
      -> RETR the rest (pipelined, one flight up to pipelining_window), and
         for each message as it arrives:
           digest -> block -> local domains -> deliver to pending and deferred
           recipients (Maildir: file fsynced) -> add to the batch
      -> per batch of up to record_batch messages (group commit):
           target sync (Maildir: one fsync per new/ folder)
           -> ONE transaction: message rows, recipients, outcomes, status
           -> DSN for new failures -> final? queue DELE : keep on the server
      -> every DELE + QUIT (one flight) -> only then: expunged, prune

Invariants:

* Outcomes are committed (fsynced) before any DELE is sent, and a message
  is logged as deleted only after the server acknowledged QUIT (RFC 1939
  section 6: deletions happen on entering the UPDATE state).  The DELE and
  expunge marks are committed without an fsync: a lost mark only repeats a
  harmless DELE.
* A recipient recorded as delivered or failed is never delivered again.
  The only duplicates possible are deliveries that the target accepted in
  the batch in progress while the process died before the batch's group
  commit (fault points ``fetch.after_deliver``, ``fetch.before_record``): at
  most ``record_batch`` messages.
* A message is deleted only when every recipient is final (delivered, or
  failed with its DSN handed over or not needed).  A message with a missing
  or defective block, or with a recipient outside ``local_domains``, is
  quarantined once and never deleted.
* A message whose UIDL is unknown but whose SHA-256 digest of the full RETR
  bytes matches a delivered, not expunged record (a mailbox migration) takes
  over that record instead of being delivered again.
* One source's failure never stops the others.
* A message whose RETR broke the session (a stall, a dropped connection, the
  per-message deadline ``limits.timeouts.message``) ``max_retrieve_attempts``
  times in a row is left on the server and skipped by later sessions (logged
  once, exit 65), so it cannot stop the rest of the mailbox from draining;
  ``--retry-quarantined`` clears the count.

Fault points (see :mod:`mailfeed.faults`), in the order a message meets them:
``fetch.after_retr``, ``fetch.after_deliver``, ``fetch.before_record``,
``fetch.after_record``, ``fetch.after_dsn``, ``fetch.after_dele``,
``fetch.after_quit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import logging
import ssl
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from mailfeed import pop3client
from mailfeed.delivery import Outcome, RecipientResult, Target
from mailfeed.delivery.base import BatchingTarget
from mailfeed.dsn import MAX_HEADER_OCTETS, build_dsn, dsn_envelope
from mailfeed.envelope import Block, BlockDefect, Envelope, read_block
from mailfeed.errors import EX_DATAERR, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE
from mailfeed.faults import fault_point
from mailfeed.fetchconfig import FetchConfig, SourceConfig
from mailfeed.quarantine import Quarantine
from mailfeed.state import (
    FINAL_OUTCOMES,
    DsnStatus,
    MessageRecord,
    MessageStatus,
    OutcomeRow,
    RecipientOutcome,
    RecipientRecord,
    RecordEntry,
    StateError,
    StateStore,
)

__all__ = [
    "EX_NOPERM",
    "DsnSender",
    "Fetcher",
    "ProgressCallback",
    "RunReport",
    "SourceReport",
    "combine_exit_codes",
    "dsn_sender_for",
]

log = logging.getLogger(__name__)

# sysexits.h: EX_NOPERM, for credentials the server rejected for good.
EX_NOPERM = 77
# Order in which per-source exit codes win for the whole run.  Rejected
# credentials come first and anything a later run may clear second.  Then
# come recipients that failed for good (their DSN was handed over), and last
# messages kept on the server because of their content or a limit.
EXIT_PRIORITY = (EX_NOPERM, EX_TEMPFAIL, EX_UNAVAILABLE, EX_DATAERR, EX_OK)
# RFC 2449 section 8 / RFC 3206 response codes after which a retry may work.
TEMPORARY_AUTH_CODES = frozenset({"SYS/TEMP", "IN-USE", "LOGIN-DELAY"})
HASH_CHUNK = 64 * 1024
# Deferred UIDLs named in the summary line; the rest are counted.  Each one
# is also in its own log line.
MAX_SUMMARY_UIDLS = 10
# Most deliveries running at once (threads) for a target that supports
# batches; below the default thread pool size of 2-core machines (6).
PARALLEL_DELIVERIES = 4
# Most messages delivered before their outcomes are recorded in one SQLite
# transaction (group commit); it bounds the duplicates after a crash.
DEFAULT_RECORD_BATCH = 64
# Statuses after which the next step is DELE: the message was fully handled.
HANDLED = (MessageStatus.FINAL, MessageStatus.DELE_SENT)
# Statuses whose row belongs to one content only: a listed UIDL with other
# content under it is a new message that reuses the UIDL.
CONTENT_BOUND = (MessageStatus.FINAL, MessageStatus.DELE_SENT, MessageStatus.EXPUNGED,
                 MessageStatus.QUARANTINED)

_TO_STATE = {
    Outcome.DELIVERED: RecipientOutcome.DELIVERED,
    Outcome.DEFERRED: RecipientOutcome.DEFERRED,
    Outcome.FAILED: RecipientOutcome.FAILED,
}

DsnSender = Callable[[Envelope, Sequence[RecipientRecord], BinaryIO], Outcome]
"""Send a DSN to the envelope's sender for the failed recipients.

Called with the original envelope, the failed recipients' records and the
original message (positioned after the block).  Returns how the DSN itself
fared: DELIVERED (handed over), DEFERRED (try again later) or FAILED.
"""

ProgressCallback = Callable[["SourceReport", int, int], None]
"""Called after each retrieved message with the report, the number of
messages and the octets planned for retrieval in this session."""


@dataclass
class SourceReport:
    """Counts of one session, its sysexits status and the UIDLs it kept deferred."""

    source: str
    retrieved: int = 0
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    quarantined: int = 0
    skipped: int = 0
    deleted: int = 0
    octets: int = 0
    seconds: float = 0.0
    exit_code: int = EX_OK
    error: str | None = None
    kept_uidls: list[str] = field(default_factory=list)

    def raise_exit(self, code: int) -> None:
        self.exit_code = combine_exit_codes([self.exit_code, code])

    def summary(self) -> str:
        line = (
            f"source {self.source}: retrieved {self.retrieved}, delivered {self.delivered}, "
            f"deferred {self.deferred}, failed {self.failed}, quarantined {self.quarantined}, "
            f"skipped {self.skipped}, deleted {self.deleted}, {self.octets} octets, "
            f"{self.seconds:.1f} s, exit {self.exit_code}"
        )
        if self.kept_uidls:
            shown = " ".join(self.kept_uidls[:MAX_SUMMARY_UIDLS])
            rest = len(self.kept_uidls) - MAX_SUMMARY_UIDLS
            line += f", deferred UIDLs: {shown}" + (f" and {rest} more" if rest > 0 else "")
        if self.error:
            line += f", error: {self.error}"
        return line


@dataclass
class RunReport:
    sources: list[SourceReport] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return combine_exit_codes([report.exit_code for report in self.sources])


def combine_exit_codes(codes: Sequence[int]) -> int:
    """Return the code that wins among several sources' codes (EXIT_PRIORITY)."""
    worst = EX_OK
    for code in codes:
        rank = EXIT_PRIORITY.index(code) if code in EXIT_PRIORITY else 0
        if rank < (EXIT_PRIORITY.index(worst) if worst in EXIT_PRIORITY else 0):
            worst = code
    return worst


def exit_code_for_session_error(exc: BaseException) -> int:
    """Map an error that ended a session to its sysexits code."""
    if isinstance(exc, pop3client.Pop3AuthError) and exc.code not in TEMPORARY_AUTH_CODES:
        return EX_NOPERM if exc.code in ("AUTH", "SYS/PERM") else EX_TEMPFAIL
    return EX_TEMPFAIL


def unique_recipients(recipients: Sequence[str]) -> list[str]:
    """Drop repeated recipients (the domain compared without case), keeping order."""
    seen: set[tuple[str, str]] = set()
    result: list[str] = []
    for rcpt in recipients:
        local, _at, domain = rcpt.rpartition("@")
        key = (local, domain.lower())
        if key not in seen:
            seen.add(key)
            result.append(rcpt)
    return result


def file_digest(message: BinaryIO) -> str:
    """Return the SHA-256 hex digest of the whole file."""
    message.seek(0)
    digest = hashlib.sha256()
    while chunk := message.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def read_header_section(message: BinaryIO, limit: int = MAX_HEADER_OCTETS) -> bytes:
    """Read the header section from the current position, up to ``limit`` octets."""
    lines: list[bytes] = []
    total = 0
    while total < limit:
        line = message.readline(limit - total)
        if line in (b"", b"\n", b"\r\n"):
            break
        lines.append(line)
        total += len(line)
    return b"".join(lines)


def dsn_sender_for(target: Target, reporting_mta: str) -> DsnSender:
    """Return a DsnSender that builds an RFC 3464 DSN and delivers it through ``target``."""

    def send(envelope: Envelope, failed: Sequence[RecipientRecord], message: BinaryIO,
             ) -> Outcome:
        results = [
            RecipientResult(row.recipient, Outcome.FAILED, row.code or 550, row.text or "")
            for row in failed
        ]
        report = build_dsn(envelope, results, read_header_section(message),
                           reporting_mta=reporting_mta)
        outcome = target.deliver(dsn_envelope(envelope), io.BytesIO(report))
        return outcome[0].outcome if outcome else Outcome.DEFERRED

    return send


class _CappedSink:
    """A temporary file for one RETR that refuses to grow past ``limit`` octets (0: no limit).

    LIST sizes may lie or be missing, so max_message_size is also enforced
    while the message streams in, so the temporary file never exceeds the limit.
    """

    def __init__(self, limit: int) -> None:
        self.file: BinaryIO = tempfile.TemporaryFile(prefix="mailfeed-fetch-")  # noqa: SIM115
        self.limit = limit
        self.written = 0
        self.over_limit = False

    def write(self, data: bytes) -> int:
        if self.limit and self.written + len(data) > self.limit:
            self.over_limit = True
            raise OSError(errno.EFBIG, f"the message exceeds max_message_size = {self.limit}")
        self.written += len(data)
        return self.file.write(data)


def ssl_context_for(source: SourceConfig) -> ssl.SSLContext | None:
    if source.tls is pop3client.TlsMode.NONE:
        return None
    cafile = None if source.ca_file is None else str(source.ca_file)
    if source.verify:
        return pop3client.client_ssl_context(cafile)
    log.warning("source %s: TLS certificate verification is off (verify = false)", source.name)
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class _Delivered:
    """A message delivered in the current batch, waiting for the group commit."""

    msgnum: int
    uidl: str
    digest: str
    size: int
    block: Block
    recipients: list[str]
    # The recipient rows recorded before this session's delivery.
    rows: list[RecipientRecord]
    outcomes: list[OutcomeRow]
    sink: _CappedSink
    # The delivery still running (concurrent deliveries), or None when done.
    task: asyncio.Future[None] | None = None

    def entry(self, source: str) -> RecordEntry:
        final = not self.deferred() and not self.dsn_owed()
        status = MessageStatus.FINAL if final else MessageStatus.DELIVERING
        return RecordEntry(source, self.uidl, self.digest, self.size, self.recipients,
                           self.outcomes, status)

    def deferred(self) -> list[tuple[str, int | None, str | None]]:
        """Return (recipient, code, text) of each recipient not final after the outcomes."""
        latest: dict[str, tuple[RecipientOutcome, int | None, str | None]] = {
            row.recipient: (row.outcome, row.code, row.text) for row in self.rows
        }
        for rcpt in self.recipients:
            latest.setdefault(rcpt, (RecipientOutcome.PENDING, None, None))
        for rcpt, outcome, code, text in self.outcomes:
            latest[rcpt] = (outcome, code, text)
        return [(rcpt, code, text) for rcpt, (outcome, code, text) in latest.items()
                if outcome not in FINAL_OUTCOMES]

    def dsn_owed(self) -> bool:
        """True when a failed recipient's DSN is not handed over yet, by the rows and outcomes."""
        return (any(row.dsn == DsnStatus.PENDING for row in self.rows)
                or any(outcome == RecipientOutcome.FAILED for _r, outcome, _c, _t in self.outcomes))

    def defer_delivered(self, text: str) -> None:
        """Turn DELIVERED outcomes into DEFERRED: the target could not make them durable."""
        self.outcomes = [
            (rcpt, RecipientOutcome.DEFERRED, 451, text)
            if outcome == RecipientOutcome.DELIVERED else (rcpt, outcome, code, text_)
            for rcpt, outcome, code, text_ in self.outcomes
        ]


class Fetcher:
    """Runs sessions for the sources of one site configuration."""

    def __init__(
        self,
        config: FetchConfig,
        store: StateStore,
        target: Target,
        *,
        dsn_sender: DsnSender | None = None,
        trace: bool = False,
        progress: ProgressCallback | None = None,
        retry_quarantined: bool = False,
        clock: Callable[[], float] = time.time,
        record_batch: int = DEFAULT_RECORD_BATCH,
    ) -> None:
        if record_batch < 1:
            raise ValueError(f"record_batch={record_batch} is invalid: it must be at least 1")
        self.record_batch = record_batch
        self.config = config
        self.store = store
        self.target = target
        self.dsn_sender = dsn_sender
        self.quarantine = Quarantine(config.quarantine)
        self.trace = trace
        self.progress = progress
        self.retry_quarantined = retry_quarantined
        self.clock = clock
        # Set (by a SIGTERM handler) to finish the current message, then QUIT.
        self.stop_requested = False
        self._sessions = 0

    async def run(self) -> RunReport:
        """Run one session per source, one after the other."""
        report = RunReport()
        for source in self.config.sources:
            if self.stop_requested:
                # Not drained: exit 75, so that a caller knows mail may be waiting.
                log.info("source %s: stop requested: session not started", source.name)
                skipped = SourceReport(source.name, error="stopped before the session started")
                skipped.raise_exit(EX_TEMPFAIL)
                report.sources.append(skipped)
                continue
            report.sources.append(await self.run_source(source))
        return report

    async def run_source(self, source: SourceConfig) -> SourceReport:
        """Run one session for ``source``; any error ends only this session and is logged."""
        self._sessions += 1
        session = _Session(self, source, f"{source.name}#{self._sessions}")
        started = time.monotonic()
        try:
            await session.run()
        except StateError as exc:
            session.fail(exc, "state file error")
        except (pop3client.Pop3Error, OSError) as exc:
            session.fail(exc, "session failed")
        except Exception as exc:  # one source's bug must not stop the other sources
            log.exception("%s: unexpected error; messages stay on the server", session.sid)
            session.fail(exc, "session failed")
        finally:
            await session.close()
            session.report.seconds = time.monotonic() - started
        return session.report


class _Session:
    """One POP3 session of one source: the per-message decisions."""

    def __init__(self, fetcher: Fetcher, source: SourceConfig, session_id: str) -> None:
        self.fetcher = fetcher
        self.config = fetcher.config
        self.limits = fetcher.config.limits
        self.store = fetcher.store
        self.source = source
        self.sid = session_id
        self.peer = f"{source.host}:{source.port}"
        self.report = SourceReport(source.name)
        self.client: pop3client.Pop3Client | None = None
        self.entries: dict[int, str] = {}
        self.sizes: dict[int, int] = {}
        self.listed: frozenset[str] = frozenset()
        self.records: dict[str, MessageRecord] = {}
        self.sinks: dict[int, _CappedSink] = {}
        # Messages to delete: message number -> state row id.
        self.to_delete: dict[int, int] = {}
        self.dele_acked: list[tuple[int, str]] = []
        # UIDL -> (RETRs in a row that broke a session, the last error).
        self.failures: dict[str, tuple[int, str]] = {}
        # Why the delivery target could not be reached, once a delivery found
        # it down: no further message is retrieved in this session then.
        self.target_down: str | None = None
        self.delivery_slots = asyncio.Semaphore(PARALLEL_DELIVERIES)
        # UIDLs retried out of quarantine in this session.
        self.from_quarantine: set[str] = set()

    # -- logging -----------------------------------------------------------------

    def _trace(self, direction: str, line: str) -> None:
        log.debug("%s %s %s: %s", self.sid, self.peer, direction, line.rstrip("\r\n"))

    def fail(self, exc: BaseException, what: str) -> None:
        self.report.error = str(exc)
        self.report.raise_exit(exit_code_for_session_error(exc))
        log.error("%s %s: %s: %s", self.sid, self.peer, what, exc)

    # -- the session ---------------------------------------------------------

    async def run(self) -> None:
        """Run the session step by step; each step is durable before the next starts."""
        listing = await self._connect_and_list()
        if listing is None:
            await self._delete_and_quit()
            return
        to_retrieve = self._plan()
        if to_retrieve and self._stopped(len(to_retrieve)):
            to_retrieve = []
        if to_retrieve:
            # Per message: RETR -> block -> deliver -> record the outcomes.
            await self._retrieve(to_retrieve)
        await self._delete_and_quit()
        self._prune(listing)

    def _stopped(self, left: int) -> bool:
        """Return True when a stop was requested, marking the session as cut short."""
        if not self.fetcher.stop_requested:
            return False
        log.info("%s: stop requested: %d messages left on the server for the next session",
                 self.sid, left)
        self.report.raise_exit(EX_TEMPFAIL)
        self.report.error = self.report.error or "stopped before the mailbox was drained"
        return True

    async def _connect_and_list(self) -> pop3client.UidlListing | None:
        """Connect, log in, read UIDL and LIST, and load the state of the listed UIDLs.

        Return None, without logging in, when a stop was requested meanwhile.
        """
        source = self.source
        log.info("%s %s: connecting (tls %s)", self.sid, self.peer, source.tls.value)
        self.client = await pop3client.connect(
            source.host,
            source.port,
            tls=source.tls,
            ssl_context=ssl_context_for(source),
            timeouts=self.limits.timeouts,
            max_line_length=self.limits.max_line_length,
            allow_plaintext=source.allow_plaintext,
            trace=self._trace if self.fetcher.trace else None,
            session_id=self.sid,
        )
        if self.fetcher.stop_requested:
            log.info("%s %s: stop requested: not logging in", self.sid, self.peer)
            self.report.raise_exit(EX_TEMPFAIL)
            self.report.error = "stopped before login"
            return None
        await self.client.login(source.user, source.password)
        listing, self.sizes = await self.client.uidl_and_list()
        for raw, reason in listing.defects:
            log.warning("%s %s: UIDL entry skipped, message left alone: %s (line %r)",
                        self.sid, self.peer, reason, raw)
        self.entries = dict(sorted(listing.entries.items()))
        self.listed = frozenset(self.entries.values())
        self.records = self.store.get_many(source.name, list(self.entries.values()))
        if self.fetcher.retry_quarantined:
            self.store.clear_retrieval_failures(source.name)
        self.failures = self.store.retrieval_failures(source.name)
        return listing

    def _prune(self, listing: pop3client.UidlListing) -> None:
        """After QUIT: forget the rows of messages no longer on the server."""
        if listing.defects:
            # A UIDL on a rejected line is still on the server: forgetting it
            # would lose its quarantine mark or its delivered state.
            log.info("%s: %d UIDL lines rejected: nothing pruned this session", self.sid,
                     len(listing.defects))
            return
        removed = self.store.prune(self.source.name, self.listed,
                                   retention=self.limits.state_retention)
        if removed:
            log.info("%s: forgot %d messages no longer on the server", self.sid, removed)

    def _plan(self) -> list[int]:
        """Sort listed messages into DELE-only, RETR and left alone; return the RETRs."""
        to_retrieve: list[int] = []
        max_size = self.limits.max_message_size
        for msgnum, uidl in self.entries.items():
            record = self.records.get(uidl)
            size = self.sizes.get(msgnum)
            # A new LIST size under a known UIDL means new content: RETR decides by digest.
            same_size = record is None or size is None or record.size in (None, size)
            status = None if record is None else record.status
            if record is not None and status in HANDLED and same_size:
                # Every recipient is final: the last session did not reach QUIT.
                self.to_delete[msgnum] = record.id
                continue
            if (status == MessageStatus.QUARANTINED and same_size
                    and not self.fetcher.retry_quarantined):
                self.report.quarantined += 1
                self.report.raise_exit(EX_DATAERR)
                continue
            if self.failures.get(uidl, (0, ""))[0] >= self.limits.max_retrieve_attempts:
                self.report.skipped += 1
                self.report.raise_exit(EX_DATAERR)
                continue
            if max_size and size is not None and size > max_size:
                reason = f"size {size} octets is over max_message_size = {max_size}"
                self._keep(msgnum, uidl, MessageStatus.SKIPPED, reason, size=size)
                continue
            to_retrieve.append(msgnum)
        cap = self.limits.max_messages_per_session
        if cap and len(to_retrieve) > cap:
            log.info("%s: %d messages to retrieve, max_messages_per_session = %d: "
                     "the rest waits for the next session", self.sid, len(to_retrieve), cap)
            to_retrieve = to_retrieve[:cap]
        return to_retrieve

    async def _retrieve(self, msgnums: list[int]) -> None:
        """RETR ``msgnums`` and deliver them, recording outcomes in group commits.

        Delivered messages are collected into a batch of at most
        ``record_batch`` messages; :meth:`_record` then makes the target's
        results durable and records the whole batch in one transaction.  The
        batch is also recorded when the session ends early (stop, error).
        """
        assert self.client is not None
        planned_octets = sum(self.sizes.get(n, 0) for n in msgnums)
        handled = 0
        target = self.fetcher.target
        if isinstance(target, BatchingTarget):
            target.begin_batch()
        results = self.client.retrieve(
            msgnums,
            open_sink=self._open_sink,
            expected_sizes={n: self.sizes[n] for n in msgnums if n in self.sizes},
            window=self.limits.pipelining_window,
        )
        batch: list[_Delivered] = []
        try:
            async with contextlib.aclosing(results):  # type: ignore[type-var]
                async for result in results:
                    sink = self.sinks.pop(result.msgnum, None)
                    delivered: _Delivered | None = None
                    try:
                        delivered = await self._handle(result, sink)
                    finally:
                        if delivered is not None:
                            batch.append(delivered)
                        elif sink is not None:
                            sink.file.close()
                    handled += 1
                    if self.fetcher.progress is not None:
                        self.fetcher.progress(self.report, len(msgnums), planned_octets)
                    if len(batch) >= self.fetcher.record_batch:
                        done, batch = batch, []
                        await self._record(done)
                    if handled < len(msgnums) and (
                        self.target_down or self._stopped(len(msgnums) - handled)
                    ):
                        break
        finally:
            done, batch = batch, []
            await self._record(done)
        if self.target_down:
            log.error("%s: the delivery target %s cannot be reached (%s): no further "
                      "messages retrieved this session; %d left on the server",
                      self.sid, self.config.delivery, self.target_down, len(msgnums) - handled)
            self.report.raise_exit(EX_TEMPFAIL)
            self.report.error = self.report.error or f"delivery target down: {self.target_down}"

    def _open_sink(self, msgnum: int) -> _CappedSink:
        sink = _CappedSink(self.limits.max_message_size)
        self.sinks[msgnum] = sink
        return sink

    async def _handle(self, result: pop3client.RetrResult, capped: _CappedSink | None,
                      ) -> _Delivered | None:
        """One retrieved message: check it and deliver it; return it for :meth:`_record`.

        Returns None for a message that is not delivered (a failed RETR, a
        quarantined or skipped one); its state is already recorded.
        """
        msgnum = result.msgnum
        uidl = self.entries[msgnum]
        if not result.ok or capped is None:
            self._retrieval_failed(msgnum, uidl, result, capped)
            return None
        sink = capped.file
        digest = self._accept_retrieved(msgnum, uidl, result, sink)
        checked = self._check_block(msgnum, uidl, digest, sink, result.size)
        if checked is None:
            return None
        block, recipients = checked
        record = self.store.get(self.source.name, uidl)
        if record is not None and record.status == MessageStatus.QUARANTINED:
            # Delivered now (--retry-quarantined): its quarantined copy is
            # moved out of the way once the message is queued for DELE.
            self.from_quarantine.add(uidl)
        rows = [] if record is None else self.store.recipients(record.id)
        known = {row.recipient for row in rows}
        todo = [row.recipient for row in rows
                if row.outcome in (RecipientOutcome.PENDING, RecipientOutcome.DEFERRED)]
        todo += [rcpt for rcpt in recipients if rcpt not in known]
        delivered = _Delivered(msgnum, uidl, digest, result.size, block, recipients, rows,
                               [], capped)
        if todo:
            first_seen = self.fetcher.clock() if record is None else record.first_seen
            delivery = self._deliver(delivered, todo, first_seen)
            if isinstance(self.fetcher.target, BatchingTarget):
                # Its deliveries run side by side and finish before the group commit, so
                # the file fsyncs of a batch overlap instead of adding up.
                delivered.task = asyncio.ensure_future(delivery)
            else:
                await delivery
        return delivered

    async def _deliver(self, item: _Delivered, todo: list[str], first_seen: float) -> None:
        envelope = Envelope(item.block.envelope.sender, tuple(todo))
        item.sink.file.seek(item.block.length)
        # Waiting for a slot is outside delivery_timeout, which times only the delivery.
        async with self.delivery_slots:
            results = await self._call_target(envelope, item.sink.file)
        fault_point("fetch.after_deliver")
        item.outcomes = self._outcomes(first_seen, todo, results)

    async def _record(self, batch: list[_Delivered]) -> None:
        """Group commit: make the batch's deliveries durable, record them, then finish each.

        Nothing of the batch is deleted before this commit.  A crash before
        it redelivers the batch's recipients in the next session (the one
        duplicate window); a crash after it redelivers none of them.
        """
        if not batch:
            return
        try:
            await asyncio.gather(*(item.task for item in batch if item.task is not None))
            target = self.fetcher.target
            if isinstance(target, BatchingTarget):
                try:
                    await asyncio.to_thread(target.sync)
                except OSError as exc:
                    log.error("%s: making %d deliveries durable failed: %s; they are recorded "
                              "as deferred and delivered again later", self.sid, len(batch), exc)
                    for item in batch:
                        item.defer_delivered(f"4.3.0 syncing the delivery failed: {exc}")
            fault_point("fetch.before_record")
            entries = [item.entry(self.source.name) for item in batch]
            records = self.store.record_batch(entries)
            fault_point("fetch.after_record")
            for item, record in zip(batch, records, strict=True):
                await self._finish(item, record)
        finally:
            for item in batch:
                item.sink.file.close()

    def _accept_retrieved(self, msgnum: int, uidl: str, result: pop3client.RetrResult,
                          sink: BinaryIO) -> str:
        """Count a complete RETR, tie it to its state row; return its digest."""
        if uidl in self.failures:
            self.store.clear_retrieval_failures(self.source.name, uidl)
        self.report.retrieved += 1
        self.report.octets += result.size
        listed_size = self.sizes.get(msgnum)
        if listed_size is not None and listed_size != result.size:
            log.warning("%s: message %d (UIDL %s): LIST gave %d octets, RETR gave %d",
                        self.sid, msgnum, uidl, listed_size, result.size)
        digest = file_digest(sink)
        fault_point("fetch.after_retr")
        self._match_record(uidl, digest, result.size)
        return digest

    def _check_block(self, msgnum: int, uidl: str, digest: str, sink: BinaryIO,
                     size: int) -> tuple[Block, list[str]] | None:
        """Read the block; return it and the recipients, or quarantine and return None."""
        try:
            sink.seek(0)
            block = read_block(sink, max_recipients=self.limits.max_recipients,
                               allowed_above=self.config.allowed_above_block)
        except BlockDefect as defect:
            self._quarantine(msgnum, uidl, digest, sink, f"line {defect.line}: {defect.reason}",
                             size)
            return None
        recipients = unique_recipients(block.envelope.recipients)
        foreign = [rcpt for rcpt in recipients if not self.config.is_local(rcpt)]
        if foreign:
            reason = (f"recipient {', '.join(foreign)} is outside local_domains "
                      f"({', '.join(self.config.local_domains)})")
            self._quarantine(msgnum, uidl, digest, sink, reason, size)
            return None
        return block, recipients

    def _match_record(self, uidl: str, digest: str, size: int) -> None:
        """Tie a retrieved message to its state row before its block is read.

        A row bound to other content means the server reused the UIDL for a
        new message: the row is dropped so that the message is delivered.
        An unknown UIDL may be a delivered message under a new UIDL.
        """
        record = self.records.get(uidl)
        if record is not None and record.status in CONTENT_BOUND:
            if record.digest == digest:
                if record.status == MessageStatus.EXPUNGED:
                    log.warning("%s: UIDL %s is back after its deletion was confirmed, with "
                                "the same content: deleting it again without delivery",
                                self.sid, uidl)
                return
            log.warning("%s: UIDL %s was %s with sha256 %s and now has sha256 %s: the server "
                        "reused it for a new message, which is handled as new", self.sid, uidl,
                        record.status.value, (record.digest or "unknown")[:16], digest[:16])
            self.store.forget(record.id)
            record = None
        if record is None:
            self._recognise(uidl, digest, size)

    def _recognise(self, uidl: str, digest: str, size: int) -> None:
        """Match an unknown UIDL by digest to a delivered, not expunged record."""
        old = self.store.find_delivered_by_digest(self.source.name, digest, self.listed)
        if old is None:
            return
        log.info("%s: UIDL %s has the content (sha256 %s) of UIDL %s, delivered before: "
                 "taking over its record instead of delivering again",
                 self.sid, uidl, digest[:16], old.uidl)
        self.store.adopt(old, uidl, digest, size)

    async def _finish(self, item: _Delivered, record: MessageRecord) -> None:
        """After the batch's commit: log, send a DSN if owed, queue DELE or keep the message."""
        msgnum = item.msgnum
        for rcpt, outcome, code, text in item.outcomes:
            log.info("%s: message %d (UIDL %s) to <%s>: %s %s %s", self.sid, msgnum,
                     record.uidl, rcpt, outcome.value, code, text)
            if outcome == RecipientOutcome.DELIVERED:
                self.report.delivered += 1
            elif outcome == RecipientOutcome.FAILED:
                self.report.failed += 1
                self.report.raise_exit(EX_UNAVAILABLE)
        sink = item.sink.file
        dsn_done = True
        if item.dsn_owed():
            dsn_done = await self._send_dsn(record, item.block, sink)
        deferred = item.deferred()
        if deferred or not dsn_done:
            if record.status != MessageStatus.DELIVERING:
                self.store.set_status(record.id, MessageStatus.DELIVERING)
            self.report.deferred += len(deferred)
            self.report.kept_uidls.append(record.uidl)
            self.report.raise_exit(EX_TEMPFAIL)
            why = "; ".join(f"<{rcpt}> {code} {text}" for rcpt, code, text in deferred[:5])
            if not dsn_done:
                why = (why + "; " if why else "") + "DSN not handed over yet"
            log.warning("%s: message %d (UIDL %s) kept on the server: %d recipients deferred: %s",
                        self.sid, msgnum, record.uidl, len(deferred), why)
            return
        if record.status not in HANDLED:
            self.store.set_status(record.id, MessageStatus.FINAL)
        self.to_delete[msgnum] = record.id
        if record.uidl in self.from_quarantine:
            self._release(record.uidl, item.digest)

    async def _call_target(self, envelope: Envelope, sink: BinaryIO) -> list[RecipientResult]:
        try:
            results = await asyncio.wait_for(
                asyncio.to_thread(self.fetcher.target.deliver, envelope, sink),
                timeout=self.limits.delivery_timeout,
            )
            if results and all(result.unreachable for result in results):
                self.target_down = results[0].text
            return results
        except TimeoutError:
            # NOTE: the thread may still finish the delivery; the recipients stay
            # deferred, so the next session may deliver them a second time.
            reason = f"delivery timed out after {self.limits.delivery_timeout:g} s"
        except Exception as exc:  # any target failure must leave the mail retryable
            reason = f"delivery failed: {exc!r}"
        log.error("%s: %s", self.sid, reason)
        self.target_down = reason
        return [RecipientResult(rcpt, Outcome.DEFERRED, 451, f"4.3.0 {reason}")
                for rcpt in envelope.recipients]

    def _outcomes(self, first_seen: float, todo: list[str],
                  results: list[RecipientResult]) -> list[OutcomeRow]:
        by_rcpt = {result.recipient: result for result in results}
        lifetime = self.limits.max_queue_lifetime
        expired = bool(lifetime) and self.fetcher.clock() - first_seen > lifetime
        outcomes: list[OutcomeRow] = []
        for rcpt in todo:
            result = by_rcpt.get(rcpt)
            if result is None:
                outcomes.append((rcpt, RecipientOutcome.DEFERRED, None,
                                 "the delivery target returned no result"))
                continue
            outcome = _TO_STATE[result.outcome]
            text = result.text
            if outcome == RecipientOutcome.DEFERRED and expired:
                outcome = RecipientOutcome.FAILED
                text = f"{text} (deferred for longer than max_queue_lifetime = {lifetime:g} s)"
            outcomes.append((rcpt, outcome, result.code, text))
        return outcomes

    async def _send_dsn(self, record: MessageRecord, block: Block, sink: BinaryIO) -> bool:
        """Hand over a DSN for failed recipients not yet reported; True when none is owed."""
        owed = self.store.dsn_owed(record.id)
        if not owed:
            return True
        sender = block.envelope.sender
        if sender == "" or self.fetcher.dsn_sender is None:
            why = "null sender" if sender == "" else "no DSN sender configured"
            log.info("%s: UIDL %s: no DSN for %d failed recipients (%s)", self.sid, record.uidl,
                     len(owed), why)
            self.store.set_recipient_dsn(record.id, [row.recipient for row in owed],
                                         DsnStatus.DROPPED)
            return True
        sink.seek(block.length)
        try:
            outcome = await asyncio.to_thread(self.fetcher.dsn_sender, block.envelope, owed, sink)
        except Exception as exc:  # a DSN failure must not lose the original's state
            log.error("%s: UIDL %s: sending the DSN failed: %r", self.sid, record.uidl, exc)
            outcome = Outcome.DEFERRED
        fault_point("fetch.after_dsn")
        if outcome == Outcome.DEFERRED:
            return False
        status = DsnStatus.SENT if outcome == Outcome.DELIVERED else DsnStatus.DROPPED
        if status == DsnStatus.DROPPED:
            if not self._keep_undeliverable(record, sender, owed, sink):
                return False
        else:
            log.info("%s: UIDL %s: DSN sent to <%s> for %d recipients", self.sid, record.uidl,
                     sender, len(owed))
        self.store.set_recipient_dsn(record.id, [row.recipient for row in owed], status)
        return True

    def _keep_undeliverable(self, record: MessageRecord, sender: str,
                            owed: Sequence[RecipientRecord], sink: BinaryIO) -> bool:
        """Quarantine a copy of a message whose DSN failed for good; True when it is durable.

        The message is deleted from the server afterwards, so the copy is the
        only trace of it left for the admin.  On failure the DSN stays owed
        and the message stays on the server.
        """
        failed = ", ".join(f"<{row.recipient}> {row.code} {row.text}" for row in owed[:5])
        reason = (f"delivery failed for good ({failed}) and the DSN to <{sender}> failed "
                  "for good too; the message was deleted from the server")
        digest = record.digest or file_digest(sink)
        try:
            path = self.fetcher.quarantine.store(self.source.name, record.uidl, digest, sink,
                                                 reason)
        except OSError as exc:
            log.error("%s: UIDL %s: the DSN to <%s> failed for good and copying the message "
                      "into quarantine %s failed: %s; kept on the server", self.sid,
                      record.uidl, sender, self.config.quarantine, exc)
            return False
        where = path or self.fetcher.quarantine.path_for(self.source.name, digest)
        log.error("%s: UIDL %s: the DSN to <%s> failed for good; dropping the DSN, copy of "
                  "the message quarantined at %s", self.sid, record.uidl, sender, where)
        return True

    def _quarantine(self, msgnum: int, uidl: str, digest: str, sink: BinaryIO, reason: str,
                    size: int) -> None:
        try:
            path = self.fetcher.quarantine.store(self.source.name, uidl, digest, sink, reason)
        except OSError as exc:
            # Not recorded as quarantined, so the next session tries again.
            log.error("%s: message %d (UIDL %s) kept on the server, not delivered (%s); "
                      "copying it into quarantine %s failed: %s", self.sid, msgnum, uidl,
                      reason, self.config.quarantine, exc)
            self.report.raise_exit(EX_TEMPFAIL)
            return
        self._keep(msgnum, uidl, MessageStatus.QUARANTINED, reason, digest=digest, size=size)
        if path is not None:
            log.info("%s: UIDL %s: copy quarantined at %s", self.sid, uidl, path)

    def _release(self, uidl: str, digest: str) -> None:
        """Move the quarantined copy of a message now delivered out of the admin's way."""
        try:
            moved = self.fetcher.quarantine.release(self.source.name, digest)
        except OSError as exc:
            log.warning("%s: UIDL %s was delivered, but moving its quarantined copy to "
                        "released/ failed: %s; do not send that copy again", self.sid, uidl,
                        exc)
            return
        if moved is not None:
            log.info("%s: UIDL %s delivered from quarantine; its copy moved to %s", self.sid,
                     uidl, moved)

    def _keep(self, msgnum: int, uidl: str, status: MessageStatus, reason: str, *,
              digest: str | None = None, size: int | None = None) -> None:
        news = self.store.mark_kept(self.source.name, uidl, status, reason, digest=digest,
                                    size=size)
        if status == MessageStatus.QUARANTINED:
            self.report.quarantined += 1
        else:
            self.report.skipped += 1
        self.report.raise_exit(EX_DATAERR)
        if news:
            log.warning("%s: message %d (UIDL %s) kept on the server, not delivered (%s): %s",
                        self.sid, msgnum, uidl, status.value, reason)

    def _retrieval_failed(self, msgnum: int, uidl: str, result: pop3client.RetrResult,
                          capped: _CappedSink | None) -> None:
        error = result.error or "no data"
        if capped is not None and capped.over_limit:
            listed = self.sizes.get(msgnum)
            reason = (f"more than max_message_size = {self.limits.max_message_size} octets "
                      f"retrieved, although LIST gave {listed if listed is not None else 'none'}")
            self._keep(msgnum, uidl, MessageStatus.SKIPPED, reason)
            return
        if result.failure == pop3client.RetrFailure.LINE_TOO_LONG:
            setting = f"max_line_length = {self.limits.max_line_length}"
            self._keep(msgnum, uidl, MessageStatus.SKIPPED, f"{error} ({setting})")
            return
        if result.failure == pop3client.RetrFailure.UNSTUFFED_DOT:
            # The server sends the same bytes again next time: keep it, log it once.
            self._keep(msgnum, uidl, MessageStatus.SKIPPED, error)
            return
        log.warning("%s: message %d (UIDL %s) not retrieved, kept on the server: %s",
                    self.sid, msgnum, uidl, error)
        self.report.raise_exit(EX_TEMPFAIL)
        if result.failure == pop3client.RetrFailure.BROKEN:
            self._count_broken_retrieval(msgnum, uidl, error)

    def _count_broken_retrieval(self, msgnum: int, uidl: str, error: str) -> None:
        """Count a RETR that broke the session; log once when the message is given up."""
        attempts = self.store.add_retrieval_failure(self.source.name, uidl, error)
        limit = self.limits.max_retrieve_attempts
        if attempts == limit:
            log.warning("%s: message %d (UIDL %s) kept on the server and skipped from now on: "
                        "%d retrievals in a row failed (max_retrieve_attempts = %d), the last: "
                        "%s; run mailfeed fetch --retry-quarantined to try it again",
                        self.sid, msgnum, uidl, attempts, limit, error)

    async def _delete_and_quit(self) -> None:
        """DELE every handled message and QUIT, in one flight with PIPELINING.

        Every DELE'd message's outcomes were committed (fsynced) before.  The
        marks written here are not fsynced: a lost one only repeats a DELE
        or keeps a row until pruning.
        """
        client, self.client = self.client, None
        if client is None:
            return
        msgnums = sorted(self.to_delete)
        acked, quit_ok = await client.delete_and_quit(msgnums,
                                                      window=self.limits.pipelining_window)
        for msgnum in msgnums:
            if acked.get(msgnum):
                self.dele_acked.append((self.to_delete[msgnum], self.entries[msgnum]))
                log.debug("%s: message %d (UIDL %s) marked for deletion", self.sid, msgnum,
                          self.entries[msgnum])
            else:
                log.warning("%s: DELE %d (UIDL %s) rejected; it stays until the next session",
                            self.sid, msgnum, self.entries[msgnum])
                self.report.raise_exit(EX_TEMPFAIL)
        if not quit_ok:
            self.store.mark_dele_sent([row_id for row_id, _uidl in self.dele_acked])
            fault_point("fetch.after_dele")
            if self.dele_acked:
                log.warning("%s %s: QUIT not acknowledged: %d messages marked for deletion "
                            "stay on the server until the next session", self.sid, self.peer,
                            len(self.dele_acked))
            self.report.raise_exit(EX_TEMPFAIL)
            self.report.error = "QUIT not acknowledged"
            return
        fault_point("fetch.after_dele")
        fault_point("fetch.after_quit")
        self.store.mark_expunged([row_id for row_id, _uidl in self.dele_acked])
        for _row_id, uidl in self.dele_acked:
            log.info("%s: deleted UIDL %s", self.sid, uidl)
        self.report.deleted += len(self.dele_acked)

    async def close(self) -> None:
        for sink in self.sinks.values():
            sink.file.close()
        self.sinks.clear()
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
