"""``mailfeed mx``: the MX daemon, SMTP in and POP3 out, in one asyncio loop.

It listens for SMTP (:mod:`mailfeed.smtpserver`, with STARTTLS when TLS is
configured), for POP3 with STLS, and for POP3 over implicit TLS
(:mod:`mailfeed.pop3server`), all as set in the ``[mx]`` table
(:mod:`mailfeed.mxconfig`).

Signals:

* SIGTERM or SIGINT: close the listening sockets, close idle sessions with
  ``421``, let sessions in a transaction finish for at most
  ``shutdown_grace`` seconds, wait for storage under way, and exit 0.
* SIGHUP: reload the sites, limits, TLS files and credentials.  A new
  configuration that fails to load is logged and the old one stays in force.
  At start and on reload, ``spool_root`` and the folder above each site's
  spool must exist (:func:`mailfeed.mxconfig.check_spool_paths`).  At start
  a missing one exits 78 (EX_CONFIG) with the key and the path.
  Listen addresses change only on restart.

A listen address that cannot be bound ends the start with one line naming
the ``[mx]`` key and the address: exit 75 (EX_TEMPFAIL) when it is in use,
78 (EX_CONFIG) otherwise (:func:`listen_error`).

``--ready-file PATH`` receives, once every socket listens, a JSON object with
the bound addresses (so tests may listen on port 0)::

    {"pid": 1234, "generation": 0, "reload_error": null,
     "smtp": [["127.0.0.1", 40001]], "pop3": [...], "pop3s": [...]}

It is rewritten after each reload with ``generation`` increased by one and
``reload_error`` set to the error text or null.  The file is replaced by a
rename, so a reader never sees it half written.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailfeed.config import CONFIG_ENV, DEFAULT_MX_CONFIG, config_path
from mailfeed.errors import ConfigError, MailfeedError, TempFailure
from mailfeed.mxconfig import ListenAddress, MxConfig, check_spool_paths, load_mx_config

if TYPE_CHECKING:
    from mailfeed.passwd import PasswdFile
    from mailfeed.pop3server import Pop3Server, Pop3Settings

__all__ = ["MxDaemon", "add_arguments", "listen_error", "make_tls_context", "run"]

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help=f"configuration file (default: ${CONFIG_ENV} or {DEFAULT_MX_CONFIG})",
    )
    parser.add_argument(
        "--ready-file",
        help="write the bound addresses as JSON to this file once listening",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log debug messages; twice also logs aiosmtpd's command trace",
    )


def configure_logging(verbose: int) -> None:
    """Log to stderr: INFO by default, DEBUG with -v."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # aiosmtpd logs every command line at INFO under "mail.log".
    logging.getLogger("mail.log").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    path = config_path(args.config)
    config = load_mx_config(path)
    check_spool_paths(config)
    daemon = MxDaemon(path, config, ready_file=Path(args.ready_file) if args.ready_file else None)
    return asyncio.run(daemon.serve())


def make_tls_context(config: MxConfig) -> ssl.SSLContext | None:
    """Build the server TLS context from tls_cert and tls_key, or None without TLS."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{config.source}: mx.tls_cert = {str(config.tls_cert)!r}, mx.tls_key = "
            f"{str(config.tls_key)!r}: cannot load the certificate and key: {exc}"
        ) from None
    return context


def listen_error(
    config: MxConfig, key: str, address: ListenAddress, exc: OSError
) -> MailfeedError:
    """Turn a failed bind into one line naming the key and the address.

    An address in use exits 75 (EX_TEMPFAIL): the other server may go away,
    and a supervisor may retry.  Any other failure (an address the host does
    not have, a name that does not resolve, a port that needs privileges)
    exits 78 (EX_CONFIG): it needs the configuration or the host changed.
    """
    where = f"{config.source}: mx.{key} = {str(address)!r}"
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return TempFailure(
            f"{where}: cannot listen: {reason}; stop the other server on that port "
            "or choose another port"
        )
    return ConfigError(
        f"{where}: cannot listen: {reason}; use an address this host has "
        "and a port it may bind"
    )


class MxDaemon:
    """The SMTP and POP3 listeners of one ``mailfeed mx`` process."""

    def __init__(self, path: str, config: MxConfig, *, ready_file: Path | None = None) -> None:
        from mailfeed.smtpserver import SmtpServer

        self.path = path
        self.config = config
        self.ready_file = ready_file
        self.tls_context = make_tls_context(config)
        self.smtp = SmtpServer(config, tls_context=self.tls_context)
        self.pop3 = Pop3Listeners(config, self.tls_context)
        self.stopping = asyncio.Event()
        self.generation = 0
        self.bound: dict[str, list[tuple[str, int]]] = {}

    async def serve(self) -> int:
        """Listen, serve until SIGTERM or SIGINT, then drain and return 0."""
        loop = asyncio.get_running_loop()
        self.bound["smtp"] = []
        for address in self.config.smtp_listen:
            try:
                self.bound["smtp"] += await self.smtp.start([address])
            except OSError as exc:
                raise listen_error(self.config, "smtp_listen", address, exc) from None
        self.bound.update(await self.pop3.start())
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.write_ready(None)
        log.info(
            "mailfeed mx started (pid %d): %d sites; smtp %s; pop3 %s; pop3s %s",
            os.getpid(), len(self.config.spool.sites), _show(self.bound.get("smtp")),
            _show(self.bound.get("pop3")), _show(self.bound.get("pop3s")),
        )
        await self.stopping.wait()

        grace = self.config.limits.shutdown_grace
        self.smtp.stop_accepting()
        log.info("stopping: no new connections; waiting up to %.0f s for sessions", grace)
        await asyncio.gather(self.smtp.shutdown(grace), self.pop3.shutdown(grace))
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
            # The daemon is already stopping: a repeated signal must not turn
            # the clean exit into death by signal.
            signal.signal(signum, signal.SIG_IGN)
        log.info("mailfeed mx stopped")
        return 0

    def request_stop(self, signum: int) -> None:
        if not self.stopping.is_set():
            log.info("received %s", signal.Signals(signum).name)
            self.stopping.set()

    def reload(self) -> None:
        """Load the configuration again; keep the old one if the new one fails."""
        log.info("received SIGHUP: reloading %s", self.path)
        try:
            config = load_mx_config(self.path)
            check_spool_paths(config)
            tls_context = make_tls_context(config)
            self.pop3.check(config)
        except (MailfeedError, OSError) as exc:
            # Write the ready file before logging, so that a test waiting for
            # the log line reads the new generation.
            self.generation += 1
            self.write_ready(str(exc))
            log.error("reload failed, keeping the previous configuration: %s", exc)
            return
        for name in ("smtp_listen", "pop3_listen", "pop3s_listen"):
            if getattr(config, name) != getattr(self.config, name):
                log.warning("mx.%s changed: listen addresses change only on restart", name)
        self.config = config
        self.tls_context = tls_context
        self.smtp.reload(config, tls_context)
        self.pop3.reload(config, tls_context)
        self.generation += 1
        self.write_ready(None)
        log.info("configuration reloaded: %d sites", len(config.spool.sites))

    def write_ready(self, reload_error: str | None) -> None:
        if self.ready_file is None:
            return
        data: dict[str, Any] = {
            "pid": os.getpid(),
            "generation": self.generation,
            "reload_error": reload_error,
            **{key: [list(pair) for pair in value] for key, value in self.bound.items()},
        }
        temporary = self.ready_file.with_name(self.ready_file.name + ".tmp")
        try:
            temporary.write_text(json.dumps(data) + "\n", encoding="utf-8")
            os.replace(temporary, self.ready_file)
        except OSError as exc:
            log.error("cannot write the ready file %s: %s", self.ready_file, exc)


class Pop3Listeners:
    """The POP3 listeners: plain (with STLS when TLS is set) and implicit TLS.

    Each passwd-file user logs in to the site of the same name.
    """

    def __init__(self, config: MxConfig, tls_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.tls_context = tls_context
        self.server: Pop3Server | None = None

    @staticmethod
    def enabled(config: MxConfig) -> bool:
        return bool(config.pop3_listen or config.pop3s_listen)

    @staticmethod
    def settings(config: MxConfig) -> Pop3Settings:
        from mailfeed.pop3server import Pop3Settings

        limits = config.limits
        try:
            return Pop3Settings(
                hostname=config.hostname,
                allow_plaintext=config.allow_plaintext_auth,
                max_connections=limits.max_connections,
                max_connections_per_address=limits.max_connections_per_address,
                idle_timeout=limits.pop3_timeout,
                max_bad_commands=limits.max_bad_commands,
            )
        except ValueError as exc:
            raise ConfigError(f"{config.source}: [mx]: {exc}") from None

    @staticmethod
    def load_passwd(config: MxConfig) -> PasswdFile:
        from mailfeed.passwd import PasswdFile

        passwd = PasswdFile.load(config.passwd_file)
        for user in config.spool.sites:
            if user not in passwd:
                log.warning(
                    "site %s has no user in %s, so its mail cannot be fetched over POP3; "
                    "add one with mailfeed site add or by hand",
                    user, config.passwd_file,
                )
        return passwd

    def check(self, config: MxConfig) -> None:
        """Raise ConfigError if the POP3 settings or credentials of ``config`` are invalid."""
        if self.enabled(config):
            self.settings(config)
            self.load_passwd(config)

    async def start(self) -> dict[str, list[tuple[str, int]]]:
        """Listen on every POP3 address; return the bound addresses by kind."""
        if not self.enabled(self.config):
            return {}
        from mailfeed.pop3server import Pop3Server

        sites = self.config.spool.sites
        self.server = Pop3Server(
            self.settings(self.config), self.load_passwd(self.config), sites.get
        )
        bound: dict[str, list[tuple[str, int]]] = {"pop3": [], "pop3s": []}
        for kind, addresses in (("pop3", self.config.pop3_listen),
                                ("pop3s", self.config.pop3s_listen)):
            for address in addresses:
                try:
                    listener = await self.server.start(
                        address.host,
                        address.port,
                        ssl_context=self.tls_context,
                        implicit_tls=kind == "pop3s",
                    )
                except OSError as exc:
                    raise listen_error(self.config, f"{kind}_listen", address, exc) from None
                for sock in listener.sockets:
                    name = sock.getsockname()
                    bound[kind].append((str(name[0]), int(name[1])))
        return bound

    def reload(self, config: MxConfig, tls_context: ssl.SSLContext | None) -> None:
        """Use the new credentials and sites; TLS changes need a restart here."""
        self.config = config
        if self.server is not None:
            # check() loaded this file moments ago; load it again for the
            # server so that a file replaced in between is read whole.
            self.server.reload(self.load_passwd(config), config.spool.sites.get)
        if tls_context is not self.tls_context and self.server is not None:
            log.warning("POP3 listeners keep their TLS certificate until restart")

    async def shutdown(self, grace: float) -> None:
        if self.server is not None:
            await self.server.close(graceful=True, timeout=grace)


def _show(pairs: list[tuple[str, int]] | None) -> str:
    if not pairs:
        return "off"
    return ", ".join(f"{host} port {port}" for host, port in pairs)
