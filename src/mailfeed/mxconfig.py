"""Configuration of the ``mailfeed mx`` daemon: listeners, TLS, limits, routing.

The daemon reads the same TOML file as ``mailfeed-fwd`` (``spool_root``,
``[limits]`` and ``[sites.NAME]``, parsed by :mod:`mailfeed.config`) plus one
``[mx]`` table::

    [mx]
    hostname = "mx.example.net"           # default: the host's FQDN
    smtp_listen = ["127.0.0.1:25"]        # "host:port", "[v6]:port"; port 0 picks one
    pop3_listen = ["127.0.0.1:110"]       # plain POP3, with STLS when TLS is set
    pop3s_listen = ["127.0.0.1:995"]      # implicit TLS; only with tls_cert/tls_key
    tls_cert = "/etc/mailfeed/cert.pem"
    tls_key = "/etc/mailfeed/key.pem"
    passwd_file = "passwd"                # relative to the configuration's folder
    allow_plaintext_auth = false          # USER/PASS and PLAIN without TLS
    max_connections = 100                 # per protocol, all clients together
    max_connections_per_address = 10      # per protocol and client IP address
    smtp_timeout = 300                    # seconds without data from an SMTP client
    pop3_timeout = 600                    # seconds idle after POP3 login (at least 600)
    max_errors = 20                       # 4xx/5xx SMTP replies before 421 and close
    max_bad_commands = 10                 # failed POP3 commands before the session ends
    max_line_length = 1048576             # octets of one SMTP line, CRLF included
    min_free_space = 104857600            # octets free on a spool filesystem, else 452
    storage_threads = 4                   # threads that write spools
    shutdown_grace = 30                   # seconds SIGTERM waits for sessions

``[limits].max_message_size`` becomes the SMTP SIZE limit and
``[limits].max_recipients`` the RCPT limit of one transaction.

Invariants: every domain and every address belongs to at most one site, and a
second claim is a :class:`ConfigError` naming both sites.  Domains are stored
as lower-case A-labels (IDNA) and addresses in lower case.  Exact address
entries take precedence over domain entries.  Errors name the file, the key
and the value.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailfeed.config import (
    MxSpoolConfig,
    Section,
    SiteConfig,
    load_toml,
    mx_spool_config_from,
)
from mailfeed.errors import ConfigError

__all__ = [
    "DEFAULT_POP3S_LISTEN",
    "DEFAULT_POP3_LISTEN",
    "DEFAULT_SMTP_LISTEN",
    "ListenAddress",
    "MxConfig",
    "MxLimits",
    "Routing",
    "build_routing",
    "check_spool_paths",
    "load_mx_config",
    "mx_config_from",
    "normalise_domain",
    "parse_listen",
]

# Loopback by default: an admin opens the MX to the world on purpose.
DEFAULT_SMTP_LISTEN = ("127.0.0.1:25",)
DEFAULT_POP3_LISTEN = ("127.0.0.1:110",)
DEFAULT_POP3S_LISTEN = ("127.0.0.1:995",)
DEFAULT_PASSWD_FILE = "passwd"


@dataclass(frozen=True)
class ListenAddress:
    """One listening socket address; port 0 lets the kernel pick a port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MxLimits:
    """Per-connection and per-server limits of the daemon's listeners."""

    max_connections: int = 100
    max_connections_per_address: int = 10
    # Seconds without any data from an SMTP client (RFC 5321 section 4.5.3.2
    # suggests at least 5 minutes for commands).
    smtp_timeout: float = 300.0
    # Seconds a logged-in POP3 client may stay idle (RFC 1939 section 3
    # requires at least 10 minutes).
    pop3_timeout: float = 600.0
    max_errors: int = 20
    # POP3 commands that fail before the session is closed.
    max_bad_commands: int = 10
    # RFC 5321 section 4.5.3.1.6 sets 1000 octets, but section 4.5.3.1 tells
    # implementations to avoid such limits, and real mail has longer lines.
    max_line_length: int = 1024 * 1024
    min_free_space: int = 100 * 1024 * 1024
    storage_threads: int = 4
    shutdown_grace: float = 30.0


@dataclass(frozen=True)
class Routing:
    """The map from recipient addresses to sites.

    ``addresses`` maps a lower-case address to its site and wins over
    ``domains``, which maps a lower-case A-label domain to its site.
    """

    domains: dict[str, SiteConfig] = field(default_factory=dict)
    addresses: dict[str, SiteConfig] = field(default_factory=dict)

    def site_for(self, address: str) -> SiteConfig | None:
        """Return the site for ``local@domain``, or None if no site claims it."""
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return None
        try:
            ascii_domain = normalise_domain(domain)
        except ValueError:
            return None
        exact = self.addresses.get(f"{local}@{ascii_domain}".lower())
        if exact is None:
            exact = self.addresses.get(address.lower())
        if exact is not None:
            return exact
        return self.domains.get(ascii_domain)


@dataclass(frozen=True)
class MxConfig:
    """Everything ``mailfeed mx`` reads from its configuration file."""

    source: str
    spool: MxSpoolConfig
    routing: Routing
    hostname: str
    smtp_listen: tuple[ListenAddress, ...]
    pop3_listen: tuple[ListenAddress, ...]
    pop3s_listen: tuple[ListenAddress, ...]
    tls_cert: Path | None
    tls_key: Path | None
    passwd_file: Path
    allow_plaintext_auth: bool
    limits: MxLimits


def normalise_domain(domain: str) -> str:
    """Return a domain as a lower-case A-label; raise ValueError if invalid.

    Address literals (``[192.0.2.1]``) and names with a trailing dot or an
    empty label are invalid here: no site is reached through them.
    """
    if not domain or domain.startswith("[") or domain.endswith("."):
        raise ValueError(f"invalid domain {domain!r}")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"invalid domain {domain!r}: {exc}") from None
    labels = ascii_domain.split(".")
    for label in labels:
        if not label or not all(c.isalnum() or c == "-" for c in label):
            raise ValueError(f"invalid domain {domain!r}")
    return ascii_domain.lower()


def parse_listen(
    section: Section, name: str, default: tuple[str, ...]
) -> tuple[ListenAddress, ...]:
    """Read a list of ``host:port`` strings (IPv6 as ``[addr]:port``)."""
    result: list[ListenAddress] = []
    for text in section.get_str_list(name, list(default)):
        host, sep, port_text = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(
                f"{section.path}: {section.key(name)}: invalid listen address {text!r}: "
                "use host:port, such as 127.0.0.1:25 or [::1]:25"
            )
        result.append(ListenAddress(host, int(port_text)))
    return tuple(result)


def build_routing(spool: MxSpoolConfig) -> Routing:
    """Map every configured domain and address to its site; reject double claims."""
    domains: dict[str, SiteConfig] = {}
    addresses: dict[str, SiteConfig] = {}
    for site in spool.sites.values():
        for domain in site.domains:
            try:
                key = normalise_domain(domain)
            except ValueError as exc:
                raise ConfigError(f"{spool.source}: sites.{site.name}.domains: {exc}") from None
            other = domains.get(key)
            if other is not None and other.name != site.name:
                raise ConfigError(
                    f"{spool.source}: sites.{site.name}.domains: domain {domain!r} is "
                    f"already claimed by site {other.name!r}; list it in one site only"
                )
            domains[key] = site
        for address in site.addresses:
            local, at, domain = address.rpartition("@")
            try:
                if not at or not local:
                    raise ValueError("expected local-part@domain")
                key = f"{local}@{normalise_domain(domain)}".lower()
            except ValueError as exc:
                raise ConfigError(
                    f"{spool.source}: sites.{site.name}.addresses: invalid address "
                    f"{address!r}: {exc}"
                ) from None
            other = addresses.get(key)
            if other is not None and other.name != site.name:
                raise ConfigError(
                    f"{spool.source}: sites.{site.name}.addresses: address {address!r} is "
                    f"already claimed by site {other.name!r}; list it in one site only"
                )
            addresses[key] = site
    return Routing(domains, addresses)


def _parse_limits(mx: Section) -> MxLimits:
    defaults = MxLimits()
    return MxLimits(
        max_connections=mx.get_int("max_connections", defaults.max_connections, minimum=1),
        max_connections_per_address=mx.get_int(
            "max_connections_per_address", defaults.max_connections_per_address, minimum=1
        ),
        smtp_timeout=mx.get_float("smtp_timeout", defaults.smtp_timeout, minimum=1.0),
        pop3_timeout=mx.get_float("pop3_timeout", defaults.pop3_timeout, minimum=600.0),
        max_errors=mx.get_int("max_errors", defaults.max_errors, minimum=1),
        max_bad_commands=mx.get_int("max_bad_commands", defaults.max_bad_commands, minimum=1),
        max_line_length=mx.get_int(
            "max_line_length", defaults.max_line_length, minimum=1001
        ),
        min_free_space=mx.get_int("min_free_space", defaults.min_free_space),
        storage_threads=mx.get_int(
            "storage_threads", defaults.storage_threads, minimum=1, maximum=64
        ),
        shutdown_grace=mx.get_float("shutdown_grace", defaults.shutdown_grace),
    )


def mx_config_from(path: str, data: dict[str, Any]) -> MxConfig:
    """Build the daemon's configuration from parsed TOML."""
    spool, top = mx_spool_config_from(path, data)
    mx = top.table("mx")
    top.check_unknown()

    base = Path(path).resolve().parent
    tls_cert = mx.get_path("tls_cert", base=base)
    tls_key = mx.get_path("tls_key", base=base)
    if (tls_cert is None) != (tls_key is None):
        present = "tls_cert" if tls_cert is not None else "tls_key"
        raise mx.error(present, "tls_cert and tls_key must be set together")
    tls = tls_cert is not None

    pop3s_default = DEFAULT_POP3S_LISTEN if tls else ()
    pop3s_listen = parse_listen(mx, "pop3s_listen", pop3s_default)
    if pop3s_listen and not tls:
        raise mx.error("pop3s_listen", "implicit TLS needs tls_cert and tls_key")

    passwd_file = mx.get_path("passwd_file", DEFAULT_PASSWD_FILE, base=base)
    assert passwd_file is not None
    config = MxConfig(
        source=path,
        spool=spool,
        routing=build_routing(spool),
        hostname=mx.get_str("hostname") or socket.getfqdn(),
        smtp_listen=parse_listen(mx, "smtp_listen", DEFAULT_SMTP_LISTEN),
        pop3_listen=parse_listen(mx, "pop3_listen", DEFAULT_POP3_LISTEN),
        pop3s_listen=pop3s_listen,
        tls_cert=tls_cert,
        tls_key=tls_key,
        passwd_file=passwd_file,
        allow_plaintext_auth=mx.get_bool("allow_plaintext_auth", False),
        limits=_parse_limits(mx),
    )
    mx.check_unknown()
    return config


def check_spool_paths(config: MxConfig) -> None:
    """Raise ConfigError unless spool_root and each site's spool parent are folders.

    ``mailfeed mx`` calls this at start and on reload, because a missing spool
    root would otherwise turn every message into a ``451`` and show every POP3
    mailbox as empty.  Pipe sites have no spool and are skipped.
    """
    spool = config.spool
    root = spool.spool_root
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(
            f"{spool.source}: spool_root = {str(root)!r} {problem}; create it (for example "
            "with mailfeed site add) or set spool_root to an existing folder"
        )
    for site in spool.sites.values():
        if site.format == "pipe":
            continue
        parent = site.path.parent
        if not parent.is_dir():
            problem = "is not a folder" if parent.exists() else "does not exist"
            raise ConfigError(
                f"{spool.source}: sites.{site.name}.path = {str(site.path)!r}: the folder "
                f"{str(parent)!r} {problem}; create it or change the path"
            )


def load_mx_config(path: str | os.PathLike[str]) -> MxConfig:
    """Load and check the daemon's configuration file; raise ConfigError if invalid."""
    text_path = os.fspath(path)
    return mx_config_from(text_path, load_toml(text_path))
