"""``mailfeed fetch``: one pass over every source, or a polling daemon.

Usage::

    mailfeed fetch --config /etc/mailfeed/fetch.toml [--daemon] [-v] [--retry-quarantined]

One pass runs a session per source and prints one summary line per source
on stdout.  ``--daemon`` repeats the pass every ``daemon.interval`` seconds.
When a session of a pass failed (connection, TLS, login, protocol), the wait
doubles with each such pass, up to ``daemon.backoff_max``, with random jitter.
SIGHUP reloads the configuration (a bad file keeps the old one), SIGTERM
and SIGINT finish the current message, QUIT, and stop.

Exit status (sysexits), the worst over all sources, in this order:

* 78 EX_CONFIG: the configuration is invalid.
* 77 EX_NOPERM: the server rejected the credentials ([AUTH] or [SYS/PERM]).
* 75 EX_TEMPFAIL: a recipient is deferred, a DSN or DELE is still owed, or a
  session failed in a way a retry may clear (connection, timeout, TLS, a
  login refused without a permanent response code, QUIT unacknowledged),
  the delivery target could not be reached (the session then retrieves no
  further message), a stop (SIGTERM, SIGINT) ended the pass before the
  mailboxes were drained, or another fetcher holds the state file.
* 69 EX_UNAVAILABLE: a recipient failed for good (its DSN was handed over,
  or none was owed), and the message was deleted.
* 65 EX_DATAERR: a message stays on the server because of its content or a
  limit (quarantined, over max_message_size or max_line_length).
* 0: every listed message was delivered to all its recipients and deleted.

The progress line (messages, octets, rate, time left) is drawn only when
stdout is a terminal.  ``-v`` logs the POP3 dialogue with secrets masked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

from mailfeed.delivery import Target, target_from_url
from mailfeed.errors import EX_OK, EX_TEMPFAIL, ConfigError
from mailfeed.fetch import Fetcher, RunReport, SourceReport, dsn_sender_for
from mailfeed.fetchconfig import FetchConfig, load_fetch_config
from mailfeed.state import StateError, StateLocked, StateStore

__all__ = ["add_arguments", "run"]

log = logging.getLogger("mailfeed.fetch")

DEFAULT_FETCH_CONFIG = "/etc/mailfeed/fetch.toml"
CONFIG_ENV = "MAILFEED_FETCH_CONFIG"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c",
        help=f"site configuration file (default: ${CONFIG_ENV} or {DEFAULT_FETCH_CONFIG})")
    parser.add_argument("--daemon", action="store_true",
                        help="poll every daemon.interval seconds until SIGTERM")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more; -v also traces the POP3 dialogue (secrets masked)")
    parser.add_argument("--retry-quarantined", action="store_true",
                        help="retrieve and check quarantined messages again in this run, "
                        "and messages skipped after max_retrieve_attempts broken retrievals")


def run(args: argparse.Namespace) -> int:
    """Run ``mailfeed fetch``; return the sysexits status."""
    verbose = int(args.verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT,
                        stream=sys.stderr)
    path = args.config or os.environ.get(CONFIG_ENV) or DEFAULT_FETCH_CONFIG
    config = load_fetch_config(path)
    # Checked before the state file is opened, so that a bad value exits 78.
    make_target(config)
    try:
        store = StateStore.open(config.state)
    except StateLocked as exc:
        print(f"mailfeed fetch: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except StateError as exc:
        print(f"mailfeed fetch: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    runner = _Runner(path, config, store, trace=verbose > 0,
                     retry_quarantined=bool(args.retry_quarantined))
    try:
        return asyncio.run(runner.main(daemon=bool(args.daemon)))
    finally:
        runner.store.close()


def make_target(config: FetchConfig) -> Target:
    """Build the delivery target; a bad ``delivery`` value names the file and the key."""
    try:
        return target_from_url(config.delivery, timeout=config.limits.delivery_timeout,
                               helo=config.dsn_reporting_mta)
    except ConfigError as exc:
        raise ConfigError(f"{config.path}: delivery = {config.delivery!r}: {exc}") from None


class _Progress:
    """A one-line progress display, redrawn in place on a terminal."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, report: SourceReport, planned: int, planned_octets: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = report.octets / elapsed
        left = max(planned_octets - report.octets, 0)
        eta = f"{left / rate:.0f} s left" if rate > 0 else "? s left"
        line = (f"{report.source}: {report.retrieved}/{planned} messages, "
                f"{report.octets}/{planned_octets} octets, {rate / 1024:.0f} KiB/s, {eta}")
        sys.stdout.write("\r" + line[:200] + "\x1b[K")
        sys.stdout.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
            self.shown = False
        self.started = time.monotonic()


class _Runner:
    """Owns the fetcher across passes, reloads and signals."""

    def __init__(self, path: str, config: FetchConfig, store: StateStore, *, trace: bool,
                 retry_quarantined: bool) -> None:
        self.path = path
        self.store = store
        self.trace = trace
        self.retry_quarantined = retry_quarantined
        self.progress = _Progress() if sys.stdout.isatty() else None
        self.stopping = False
        self.reload_requested = False
        self.wake = asyncio.Event()
        self.fetcher = self._make_fetcher(config)

    def _make_fetcher(self, config: FetchConfig) -> Fetcher:
        target = make_target(config)
        return Fetcher(config, self.store, target,
                       dsn_sender=dsn_sender_for(target, config.dsn_reporting_mta),
                       trace=self.trace, progress=self.progress,
                       retry_quarantined=self.retry_quarantined)

    def _on_stop(self) -> None:
        log.info("stop requested: finishing the current message, then QUIT")
        self.stopping = True
        self.fetcher.stop_requested = True
        self.wake.set()

    def _on_reload(self) -> None:
        self.reload_requested = True
        self.wake.set()

    async def main(self, *, daemon: bool) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_stop)
        if daemon:
            loop.add_signal_handler(signal.SIGHUP, self._on_reload)
            return await self._daemon()
        return self._finish(await self.fetcher.run())

    def _finish(self, report: RunReport) -> int:
        if self.progress is not None:
            self.progress.clear()
        for source in report.sources:
            print(source.summary(), flush=True)
        return report.exit_code

    async def _daemon(self) -> int:
        failures = 0
        log.info("daemon started: %d sources, interval %g s", len(self.fetcher.config.sources),
                 self.fetcher.config.daemon.interval)
        while not self.stopping:
            report = await self.fetcher.run()
            self._finish(report)
            settings = self.fetcher.config.daemon
            if any(source.error for source in report.sources):
                failures += 1
                ceiling = min(settings.backoff_max, settings.interval * 2 ** min(failures, 30))
                delay = random.uniform(ceiling / 2, ceiling)
                log.info("a session failed (%d passes in a row): next pass in %.0f s",
                         failures, delay)
            else:
                failures = 0
                delay = settings.interval
            self.wake.clear()
            if not self.stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=delay)
            if self.reload_requested and not self.stopping:
                self.reload_requested = False
                self._reload()
        log.info("daemon stopped")
        return EX_OK

    def _reload(self) -> None:
        try:
            config = load_fetch_config(self.path)
        except ConfigError as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            return
        if Path(config.state) != Path(self.fetcher.config.state):
            try:
                store = StateStore.open(config.state)
            except StateError as exc:
                log.error("reload failed, keeping the old configuration: %s", exc)
                return
            self.store.close()
            self.store = store
        try:
            self.fetcher = self._make_fetcher(config)
        except ConfigError as exc:
            log.error("reload failed, keeping the old configuration: %s", exc)
            return
        log.info("configuration reloaded from %s: %d sources", self.path, len(config.sources))
