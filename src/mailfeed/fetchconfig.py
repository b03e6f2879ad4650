"""Configuration of ``mailfeed fetch``: the site, its limits and its POP3 sources.

A site file looks like this (every key but ``state``, ``quarantine``,
``local_domains``, ``delivery`` and the sources' ``name``, ``host`` and
``user`` has a default)::

    state = "/var/lib/mailfeed/fetch.sqlite"
    quarantine = "/var/lib/mailfeed/quarantine"
    local_domains = ["example.org"]
    delivery = "smtp://127.0.0.1:10025"     # or lmtp://..., sendmail:..., maildir:/srv/mail
    dsn_reporting_mta = "site.example.org"  # default: this host's name
    allowed_above_block = ["return-path"]   # trace fields allowed above the block

    [limits]
    max_message_size = 104857600    # octets; larger messages stay on the server (0: none)
    max_messages_per_session = 0    # RETRs per session (0: no limit)
    max_line_length = 4194304       # octets per line of a POP3 reply, CRLF included
    max_recipients = 10000          # recipients one block may announce
    max_queue_lifetime = 432000     # seconds a recipient may stay deferred before it fails
    pipelining_window = 1000        # RETR or DELE commands in flight at once
    state_retention = 7776000       # seconds a vanished, delivered row is kept
    max_retrieve_attempts = 5       # broken RETRs in a row before a message is skipped

    [limits.timeouts]               # seconds per phase
    connect = 30
    greeting = 30
    login = 60
    command = 60
    data = 120
    message = 600                   # one RETR: this plus 16 KiB/s of its LIST size
    delivery = 300

    [daemon]
    interval = 300                  # seconds between polls
    backoff_max = 3600              # longest wait after repeated failures

    [[source]]
    name = "mx1"
    host = "mx.example.net"
    port = 995                      # default: 995 for implicit TLS, else 110
    tls = "implicit"                # implicit, starttls or none
    ca_file = "/etc/mailfeed/mx-ca.pem"   # default: the system store
    verify = true
    user = "site1"
    password_file = "/etc/mailfeed/site1.pass"   # or password = "..."
    allow_plaintext = false         # tls = "none" to a host that is not loopback

Every error names the file, the key and the value, with secrets masked.
Unknown keys are rejected in every table.  :func:`load_fetch_config` also
checks that ``ca_file`` and ``password_file`` can be read and that the
folders holding ``state`` and ``quarantine`` exist, and rejects an inline
``password`` in a file that group or others may read.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailfeed.config import Section, load_toml
from mailfeed.errors import ConfigError
from mailfeed.pop3client import DEFAULT_MAX_LINE_LENGTH, DEFAULT_RETR_WINDOW, Timeouts, TlsMode

__all__ = [
    "DaemonSettings",
    "FetchConfig",
    "FetchLimits",
    "SourceConfig",
    "load_fetch_config",
    "parse_fetch_config",
]

DEFAULT_POP3_PORT = 110  # RFC 1939 section 3
DEFAULT_POP3S_PORT = 995  # RFC 8314 section 7.2
TLS_CHOICES = tuple(mode.value for mode in TlsMode)
# The keys each table may hold; any other key is rejected with its name.
TOP_KEYS = ("state", "quarantine", "local_domains", "delivery", "dsn_reporting_mta",
            "allowed_above_block", "limits", "daemon", "source")
LIMITS_KEYS = ("max_message_size", "max_messages_per_session", "max_line_length",
               "max_recipients", "max_queue_lifetime", "pipelining_window", "state_retention",
               "max_retrieve_attempts", "timeouts")
TIMEOUTS_KEYS = ("connect", "greeting", "login", "command", "data", "message", "delivery")
DAEMON_KEYS = ("interval", "backoff_max")
SOURCE_KEYS = ("name", "host", "port", "tls", "ca_file", "verify", "user", "password",
               "password_file", "allow_plaintext")
# Mode bits that let a user other than the owner read a file.
READ_BY_OTHERS = stat.S_IRGRP | stat.S_IROTH
SOURCE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+")


@dataclass(frozen=True)
class FetchLimits:
    """Named limits of a fetch session; see the module docstring for units."""

    max_message_size: int = 100 * 1024 * 1024
    max_messages_per_session: int = 0
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH
    # Well above the MX side's default of 1000, so that no block the MX wrote
    # under a raised limit is refused here.
    max_recipients: int = 10_000
    # Postfix's maximal_queue_lifetime default: 5 days.
    max_queue_lifetime: float = 5 * 24 * 3600.0
    pipelining_window: int = DEFAULT_RETR_WINDOW
    state_retention: float = 90 * 24 * 3600.0
    # RETRs of one message in a row that broke the session (a stall, a dropped
    # connection, timeouts.message) before it is left on the server, so the
    # rest of the mailbox drains.
    max_retrieve_attempts: int = 5
    timeouts: Timeouts = field(default_factory=Timeouts)
    delivery_timeout: float = 300.0


@dataclass(frozen=True)
class DaemonSettings:
    interval: float = 300.0
    backoff_max: float = 3600.0


@dataclass(frozen=True)
class SourceConfig:
    """One POP3 mailbox to drain."""

    name: str
    host: str
    port: int
    tls: TlsMode
    user: str
    password: str = field(repr=False)
    ca_file: Path | None = None
    verify: bool = True
    allow_plaintext: bool = False


@dataclass(frozen=True)
class FetchConfig:
    """A whole site file: where state and quarantine live, and the sources."""

    path: str
    state: Path
    quarantine: Path
    local_domains: tuple[str, ...]
    delivery: str
    dsn_reporting_mta: str
    allowed_above_block: frozenset[str]
    limits: FetchLimits
    daemon: DaemonSettings
    sources: tuple[SourceConfig, ...]

    def is_local(self, address: str) -> bool:
        """True when the address's domain is one of the local domains."""
        _local, at, domain = address.rpartition("@")
        return bool(at) and domain.lower().rstrip(".") in self.local_domains


def _parse_timeouts(section: Section) -> tuple[Timeouts, float]:
    section.check_unknown(TIMEOUTS_KEYS)
    defaults = Timeouts()
    timeouts = Timeouts(
        connect=section.get_float("connect", defaults.connect, minimum=0.1),
        greeting=section.get_float("greeting", defaults.greeting, minimum=0.1),
        login=section.get_float("login", defaults.login, minimum=0.1),
        command=section.get_float("command", defaults.command, minimum=0.1),
        data=section.get_float("data", defaults.data, minimum=0.1),
        message=section.get_float("message", defaults.message, minimum=0.1),
    )
    delivery = section.get_float("delivery", FetchLimits.delivery_timeout, minimum=0.1)
    section.check_unknown()
    return timeouts, delivery


def _parse_limits(section: Section) -> FetchLimits:
    section.check_unknown(LIMITS_KEYS)
    timeouts, delivery_timeout = _parse_timeouts(section.table("timeouts"))
    limits = FetchLimits(
        max_message_size=section.get_int("max_message_size", FetchLimits.max_message_size),
        max_messages_per_session=section.get_int(
            "max_messages_per_session", FetchLimits.max_messages_per_session),
        max_line_length=section.get_int(
            "max_line_length", FetchLimits.max_line_length, minimum=1002),
        max_recipients=section.get_int("max_recipients", FetchLimits.max_recipients, minimum=1),
        max_queue_lifetime=section.get_float(
            "max_queue_lifetime", FetchLimits.max_queue_lifetime, minimum=0.0),
        pipelining_window=section.get_int(
            "pipelining_window", FetchLimits.pipelining_window, minimum=1, maximum=10_000),
        state_retention=section.get_float(
            "state_retention", FetchLimits.state_retention, minimum=0.0),
        max_retrieve_attempts=section.get_int(
            "max_retrieve_attempts", FetchLimits.max_retrieve_attempts, minimum=1),
        timeouts=timeouts,
        delivery_timeout=delivery_timeout,
    )
    section.check_unknown()
    return limits


def _parse_daemon(section: Section) -> DaemonSettings:
    section.check_unknown(DAEMON_KEYS)
    interval = section.get_float("interval", DaemonSettings.interval, minimum=1.0)
    backoff_max = section.get_float("backoff_max", DaemonSettings.backoff_max, minimum=1.0)
    if backoff_max < interval:
        raise section.error("backoff_max", f"must be at least daemon.interval ({interval:g})")
    section.check_unknown()
    return DaemonSettings(interval=interval, backoff_max=backoff_max)


def _read_password_file(section: Section, path: Path) -> str:
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise section.error("password_file", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise section.error("password_file", "the file is not valid UTF-8") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise section.error(
            "password_file", f"readable by group or others (mode {info.st_mode & 0o777:o}): "
            "chmod 600 it")
    password = text.rstrip("\r\n")
    if not password:
        raise section.error("password_file", "the file is empty")
    return password


def _parse_source(section: Section, base: Path) -> SourceConfig:
    section.check_unknown(SOURCE_KEYS)
    name = section.required_str("name")
    if not name or not set(name) <= SOURCE_NAME_CHARS:
        raise section.error("name", "use letters, digits, '.', '_', '+' and '-'")
    if name.startswith("."):
        # The name is a directory under the quarantine root: ".." would leave it.
        raise section.error("name", "must not start with '.'")
    host = section.required_str("host")
    tls = TlsMode(section.get_str("tls", TlsMode.IMPLICIT.value, choices=TLS_CHOICES))
    default_port = DEFAULT_POP3S_PORT if tls is TlsMode.IMPLICIT else DEFAULT_POP3_PORT
    port = section.get_int("port", default_port, minimum=1, maximum=65535)
    user = section.required_str("user")
    password = section.get_str("password")
    password_path = section.get_path("password_file", base=base)
    if (password is None) == (password_path is None):
        raise ConfigError(
            f"{section.path}: {section.key('password')}: set exactly one of password and "
            "password_file")
    if password_path is not None:
        password = _read_password_file(section, password_path)
    source = SourceConfig(
        name=name,
        host=host,
        port=port,
        tls=tls,
        user=user,
        password=str(password),
        ca_file=section.get_path("ca_file", base=base),
        verify=section.get_bool("verify", True),
        allow_plaintext=section.get_bool("allow_plaintext", False),
    )
    section.check_unknown()
    return source


def _parse_sources(top: Section, base: Path) -> tuple[SourceConfig, ...]:
    top.seen.add("source")
    raw = top.data.get("source")
    if raw is None:
        raise ConfigError(f"{top.path}: source: missing: add at least one [[source]] table")
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise top.error("source", "expected an array of tables ([[source]])")
    sources = [
        _parse_source(Section(top.path, item, f"source[{index}]."), base)
        for index, item in enumerate(raw)
    ]
    names = [source.name for source in sources]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"{top.path}: source[{index}].name = {name!r}: used twice")
    return tuple(sources)


def parse_fetch_config(path: str, data: Mapping[str, Any]) -> FetchConfig:
    """Build a FetchConfig from parsed TOML; raise ConfigError on any bad key or value.

    Relative paths are taken relative to the directory of ``path``.
    """
    base = Path(path).resolve().parent
    top = Section(path, data)
    top.check_unknown(TOP_KEYS)
    state = top.get_path("state", base=base)
    if state is None:
        raise ConfigError(f"{path}: state: missing required setting (the state file's path)")
    quarantine = top.get_path("quarantine", base=base)
    if quarantine is None:
        raise ConfigError(f"{path}: quarantine: missing required setting (a directory)")
    domains = top.get_str_list("local_domains")
    if not domains:
        raise ConfigError(
            f"{path}: local_domains: missing or empty: list the domains this site receives")
    for domain in domains:
        if not domain or "@" in domain or domain.strip() != domain:
            raise top.error("local_domains", f"invalid domain {domain!r}")
    allowed = top.get_str_list("allowed_above_block")
    for name in allowed:
        if not name or any(c <= " " or c == ":" or ord(c) >= 0x7F for c in name):
            raise top.error("allowed_above_block", f"invalid header field name {name!r}")
    config = FetchConfig(
        path=path,
        state=state,
        quarantine=quarantine,
        local_domains=tuple(d.lower().rstrip(".") for d in domains),
        delivery=top.required_str("delivery"),
        dsn_reporting_mta=top.get_str("dsn_reporting_mta") or socket.getfqdn(),
        allowed_above_block=frozenset(name.lower() for name in allowed),
        limits=_parse_limits(top.table("limits")),
        daemon=_parse_daemon(top.table("daemon")),
        sources=_parse_sources(top, base),
    )
    top.check_unknown()
    return config


def load_fetch_config(path: str | os.PathLike[str]) -> FetchConfig:
    """Read and check a fetch configuration file and the files and folders it names."""
    text_path = os.fspath(path)
    data = load_toml(text_path)
    config = parse_fetch_config(text_path, data)
    _check_inline_password(text_path, data)
    _check_paths(config)
    return config


def _check_inline_password(path: str, data: Mapping[str, Any]) -> None:
    """Reject an inline password in a file that users other than its owner may read."""
    sources = data.get("source")
    if not isinstance(sources, list):
        return
    inline = [index for index, item in enumerate(sources)
              if isinstance(item, dict) and "password" in item]
    if not inline:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot check its permissions: {exc.strerror}") from None
    if mode & READ_BY_OTHERS:
        raise ConfigError(
            f"{path}: source[{inline[0]}].password: the file contains a password and is readable "
            f"by group or others (mode {mode & 0o777:o}): chmod 600 {path}, or move the "
            "password into a password_file")


def _check_paths(config: FetchConfig) -> None:
    """Check that the files the configuration names exist and its folders can be made.

    Run at load so that a wrong path is a configuration error (exit 78)
    naming the key, not a temporary failure retried for ever.
    """
    for index, source in enumerate(config.sources):
        if source.ca_file is not None:
            _check_readable_file(config.path, f"source[{index}].ca_file", source.ca_file)
    _check_parent(config.path, "state", config.state)
    if not config.quarantine.exists():
        _check_parent(config.path, "quarantine", config.quarantine)


def _check_readable_file(path: str, key: str, target: Path) -> None:
    try:
        with open(target, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(f"{path}: {key} = '{target}': file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: {key} = '{target}': expected a file, not a folder") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {key} = '{target}': cannot read it: {exc.strerror}") from None


def _check_parent(path: str, key: str, target: Path) -> None:
    parent = target.parent
    if not parent.is_dir():
        raise ConfigError(
            f"{path}: {key} = '{target}': the folder {parent} does not exist: create it or "
            f"change {key}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{path}: {key} = '{target}': no write permission in the folder {parent}")
