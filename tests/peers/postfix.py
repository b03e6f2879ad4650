"""Private Postfix instances for tests: an MX role and a site role.

Each instance keeps its configuration, queue, data directory and maillog
under one temporary folder and listens only on 127.0.0.1.  Its default and
relay transports are ``error:``, so a stray message bounces instead of
leaving the machine.

Postfix 3.7 (Debian) starts a private instance as root with ``postfix -c DIR
start`` only when the default /etc/postfix/main.cf lists DIR in
``alternate_config_directories``, because the set-gid helpers (postlog,
postdrop, postqueue) refuse other configuration directories.
:func:`register_config_directory` adds DIR to that list under a lock and
:func:`unregister_config_directory` removes it again; both also drop entries
whose directory no longer exists, so a crashed session leaves nothing behind
after the next run.  :meth:`PostfixInstance.destroy` runs from each
fixture's ``finally`` and, as a fallback, at interpreter exit
(:func:`tests.support.cleanup_at_exit`), so an interrupted run leaves no
master running and no stale entry.

Postfix writes its errors only to a terminal or to the maillog file (a
failed start prints nothing when stdout is a pipe), so every failure message
here quotes the end of the maillog.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tests.support import cleanup_at_exit, forget_at_exit

DEFAULT_CONFIG_DIR = Path("/etc/postfix")
# Our own lock file beside the default main.cf: serialises edits of
# alternate_config_directories between pytest-xdist workers.
REGISTRY_LOCK = DEFAULT_CONFIG_DIR / ".mailfeed-tests.lock"
POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTMAP = "/usr/sbin/postmap"
POSTQUEUE = "/usr/sbin/postqueue"
SENDMAIL = "/usr/sbin/sendmail"

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
DELIVERY_TIMEOUT = 60.0
POLL_INTERVAL = 0.05
LOG_TAIL_LINES = 60

T = TypeVar("T")


class PostfixError(RuntimeError):
    """A private Postfix instance failed to start, stop or deliver."""


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``probe`` until it returns a value other than None, or fail.

    The interval is short and the deadline generous: the wait ends on the
    event, never after a fixed sleep.  On timeout the message names ``what``
    and appends ``diagnostics()`` (typically the end of a maillog).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            extra = diagnostics()
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{extra}")
        time.sleep(POLL_INTERVAL)


# ---------------------------------------------------------------------------
# alternate_config_directories in the default main.cf


@contextmanager
def _registry_lock() -> Iterator[None]:
    DEFAULT_CONFIG_DIR.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY_LOCK, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_alternates() -> list[str]:
    main_cf = DEFAULT_CONFIG_DIR / "main.cf"
    if not main_cf.exists():
        # Debian's "No configuration" install has no main.cf at all.
        main_cf.write_text(
            "# Created by mailfeed's test suite so that private Postfix\n"
            "# instances may use their own configuration directories.\n"
        )
    out = subprocess.run(
        [POSTCONF, "-c", str(DEFAULT_CONFIG_DIR), "-h", "alternate_config_directories"],
        capture_output=True, text=True, check=True,
    ).stdout
    return [item for item in re.split(r"[\s,]+", out.strip()) if item]


def _write_alternates(entries: Sequence[str]) -> None:
    subprocess.run(
        [POSTCONF, "-c", str(DEFAULT_CONFIG_DIR), "-e",
         f"alternate_config_directories = {' '.join(entries)}"],
        capture_output=True, text=True, check=True,
    )


def register_config_directory(config_dir: Path) -> None:
    """List ``config_dir`` in the default main.cf's alternate_config_directories."""
    with _registry_lock():
        current = _read_alternates()
        kept = [item for item in current if Path(item).is_dir()]
        if str(config_dir) not in kept:
            kept.append(str(config_dir))
        if kept != current:
            _write_alternates(kept)


def unregister_config_directory(config_dir: Path) -> None:
    """Remove ``config_dir`` (and entries for deleted folders) from that list."""
    with _registry_lock():
        current = _read_alternates()
        kept = [item for item in current if item != str(config_dir) and Path(item).is_dir()]
        if kept != current:
            _write_alternates(kept)


def _is_master(pid: int) -> bool:
    """Return True while ``pid`` is a running Postfix master (not a reused pid)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "master"
    except OSError:
        return False


def _end_master(pid: int) -> None:
    """Wait for the master ``pid`` to exit; SIGKILL it after STOP_TIMEOUT."""
    try:
        wait_until(lambda: None if _is_master(pid) else True, timeout=STOP_TIMEOUT,
                   what=f"Postfix master {pid} to exit")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# master.cf

# chroot is "n" everywhere because the queue is a temporary folder without
# the files a chroot jail needs.
MASTER_CF_BASE = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixInstance:
    """One private Postfix: its folders, its SMTP port and control helpers.

    ``root`` contains ``etc/`` (main.cf, master.cf, lookup tables),
    ``queue/``, ``data/`` and ``maillog``.  Call :meth:`start` after
    writing the configuration and :meth:`destroy` at the end.
    """

    name: str
    root: Path
    smtp_port: int
    extra_env: Mapping[str, str] = field(default_factory=dict)
    started: bool = False

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    @property
    def hostname(self) -> str:
        return f"{self.name}.mailfeed.test"

    @classmethod
    def create(cls, name: str, smtp_port: int, extra_env: Mapping[str, str] | None = None
               ) -> PostfixInstance:
        """Make the folders and a base main.cf and master.cf; start nothing yet."""
        root = Path(tempfile.mkdtemp(prefix=f"mailfeed-postfix-{name}-"))
        root.chmod(0o755)
        instance = cls(name, root, smtp_port, dict(extra_env or {}))
        instance.config_dir.mkdir()
        instance.queue_dir.mkdir()
        instance.data_dir.mkdir()
        shutil.chown(instance.data_dir, "postfix", "postfix")
        instance.maillog.touch()
        # destroy() at exit if no fixture teardown does it, so an
        # interrupted run leaves no master and no alternate_config_directories entry.
        cleanup_at_exit(id(instance), instance.destroy)
        instance.write_main_cf({})
        instance.write_master_cf("")
        return instance

    # -- configuration ----------------------------------------------------

    def base_settings(self) -> dict[str, str]:
        """Settings every private instance needs, before the role's own."""
        env_names = " ".join(self.extra_env)
        env_values = " ".join(f"{k}={v}" for k, v in self.extra_env.items())
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "myhostname": self.hostname,
            "mydomain": "mailfeed.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "relayhost": "",
            # Nothing leaves the machine: anything not routed on purpose bounces.
            "default_transport": "error:mail to other hosts is disabled in mailfeed's tests",
            "relay_transport": "error:mail to other hosts is disabled in mailfeed's tests",
            "smtp_dns_support_level": "disabled",
            "biff": "no",
            "smtputf8_enable": "yes",
            # Deferred mail is retried quickly so that tests can watch a retry.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "import_environment": (
                "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE "
                f"POSTLOG_HOSTNAME {env_values}"
            ).strip(),
            "export_environment": f"TZ MAIL_CONFIG LANG {env_names}".strip(),
        }

    def write_main_cf(self, settings: Mapping[str, str], extra_text: str = "") -> None:
        """Write main.cf: the base settings, then ``settings``, then ``extra_text``."""
        merged = {**self.base_settings(), **settings}
        lines = [f"{key} = {value}" for key, value in merged.items()]
        text = "\n".join(lines) + "\n"
        if extra_text:
            text += "\n" + extra_text.rstrip("\n") + "\n"
        (self.config_dir / "main.cf").write_text(text)

    def write_master_cf(self, extra_text: str) -> None:
        """Write master.cf: the SMTP listener, the base services and ``extra_text``."""
        smtpd = f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd\n"
        text = smtpd + MASTER_CF_BASE
        if extra_text:
            text += extra_text.rstrip("\n") + "\n"
        (self.config_dir / "master.cf").write_text(text)

    def write_table(self, name: str, text: str, *, kind: str = "hash") -> Path:
        """Write a lookup table file into the config folder; postmap it if indexed."""
        path = self.config_dir / name
        path.write_text(text)
        if kind in ("hash", "btree", "lmdb", "cdb"):
            self.run([POSTMAP, "-c", str(self.config_dir), f"{kind}:{path}"])
        return path

    def postconf(self, name: str) -> str:
        """Return the value of one parameter in this instance's configuration."""
        return self.run([POSTCONF, "-c", str(self.config_dir), "-h", name]).stdout.strip()

    # -- control ----------------------------------------------------------

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(argv), input=stdin.decode("latin-1") if stdin is not None else None,
            capture_output=True, text=True, timeout=START_TIMEOUT, check=False,
        )
        if check and result.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited with {result.returncode}: "
                f"{result.stdout}{result.stderr}\n{self.log_tail()}"
            )
        return result

    def start(self) -> None:
        """Register the config folder, check it, start master and wait for SMTP."""
        register_config_directory(self.config_dir)
        self.run([POSTFIX, "-c", str(self.config_dir), "check"])
        # Set before the start command: master may run even when the command
        # reports a failure or times out, and stop() must then still end it.
        self.started = True
        self.run([POSTFIX, "-c", str(self.config_dir), "start"])
        wait_until(self._smtp_ready, timeout=START_TIMEOUT,
                   what=f"Postfix {self.name} to accept SMTP on port {self.smtp_port}",
                   diagnostics=self.log_tail)

    def _smtp_ready(self) -> bool | None:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=5) as sock:
                return sock.recv(4).startswith(b"220") or None
        except OSError:
            return None

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop master and its children and wait until master has exited.

        If ``postfix stop`` fails or hangs, the master whose pid this
        instance's own pid file names gets SIGKILL: never a process found by name.
        """
        if not self.started:
            return
        self.started = False
        pid = self.master_pid()
        try:
            self.run([POSTFIX, "-c", str(self.config_dir), "stop"], check=False)
        except subprocess.TimeoutExpired:
            pass
        finally:
            pid = pid or self.master_pid()
            if pid is not None:
                _end_master(pid)

    def destroy(self) -> None:
        """Stop the instance, unregister its folder and delete the tree (idempotent)."""
        forget_at_exit(id(self))
        try:
            self.stop()
        finally:
            try:
                unregister_config_directory(self.config_dir)
            finally:
                shutil.rmtree(self.root, ignore_errors=True)

    def flush(self) -> None:
        """Ask the queue manager to retry deferred mail now."""
        self.run([POSTQUEUE, "-c", str(self.config_dir), "-f"])

    # -- observing --------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.maillog}: {exc})"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.maillog} ---\n" + "\n".join(tail)

    def log_entries(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.log_text().splitlines() if regex.search(line)]

    def wait_for_log(self, pattern: str, *, timeout: float = DELIVERY_TIMEOUT,
                     count: int = 1) -> list[str]:
        """Wait until at least ``count`` maillog lines match ``pattern``; return them."""
        def probe() -> list[str] | None:
            found = self.log_entries(pattern)
            return found if len(found) >= count else None

        return wait_until(probe, timeout=timeout,
                          what=f"{count} maillog line(s) matching {pattern!r}",
                          diagnostics=self.log_tail)

    def queue_ids_for(self, message_id: str) -> list[str]:
        """Queue ids whose cleanup line names ``message_id`` (without brackets)."""
        pattern = re.compile(r"postfix/cleanup\[\d+\]: ([0-9A-F]+): message-id=<"
                             + re.escape(message_id) + ">")
        return [m.group(1) for line in self.log_text().splitlines()
                if (m := pattern.search(line))]

    def sendmail_argv(self) -> list[str]:
        """The sendmail command line that submits into this instance."""
        return [SENDMAIL, "-C", str(self.config_dir)]


# ---------------------------------------------------------------------------
# Roles


def toml_value(value: object) -> str:
    """Format a string, integer, boolean or list of strings as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


@dataclass(frozen=True)
class MxSite:
    """A site of the MX role: its name, the domain routed to it, its spool path."""

    name: str
    domain: str
    format: str
    path: Path

    def address(self, local: str) -> str:
        return f"{local}@{self.domain}"


def pool_site_names() -> list[str]:
    """Names of the MX role's pool sites, which are also their POP3 users."""
    return [f"s{i:02d}" for i in range(1, MxPostfix.POOL_SIZE + 1)]


class MxPostfix:
    """The MX role: Postfix routing site domains to the mailfeed pipe service.

    main.cf and master.cf get the lines of docs/examples/postfix-mx/ verbatim
    except for paths and the account.  The transport table lists a pool of
    sites (``s01.mx.test`` to ``mailfeed:s01`` and so on) fixed at start,
    because Postfix caches its tables; :meth:`new_site` hands out the next
    one and writes its spool settings into mailfeed's configuration file,
    which mailfeed-fwd reads afresh on every run.  ``unknown_domain`` routes
    to a site that is not configured.
    """

    POOL_SIZE = 40
    DOMAIN_SUFFIX = "mx.test"
    UNKNOWN_SITE = "nosuchsite"

    def __init__(self, instance: PostfixInstance, spool_root: Path, fwd_path: str,
                 run_user: str) -> None:
        from tests.peers.examples import example_text, transport_entries

        self.instance = instance
        self.spool_root = spool_root
        self.config_path = instance.root / "mx.toml"
        self.sites: dict[str, dict[str, object]] = {}
        self.used = 0
        self.unknown_domain = f"unknown.{self.DOMAIN_SUFFIX}"

        config_dir = instance.config_dir
        table = config_dir / "mailfeed-transport"
        main_cf = example_text("postfix-mx/main.cf", {
            "/etc/postfix/mailfeed-transport": str(table),
        })
        master_cf = example_text("postfix-mx/master.cf", {
            "/opt/mailfeed/bin/mailfeed-fwd": fwd_path,
            "/etc/mailfeed/mx.toml": str(self.config_path),
            "user=mailfeed": f"user={run_user}",
        })
        self.transport = transport_entries()[0][1]
        lines = [f"{name}.{self.DOMAIN_SUFFIX} {self.transport}:{name}"
                 for name in pool_site_names()]
        lines.append(f"{self.unknown_domain} {self.transport}:{self.UNKNOWN_SITE}")
        instance.write_main_cf({}, main_cf)
        instance.write_master_cf(master_cf)
        instance.write_table("mailfeed-transport", "\n".join(lines) + "\n")
        self.write_config()

    def new_site(self, example: str = "mailfeed/mx-maildir.toml",
                 substitutions: Mapping[str, str] | None = None) -> MxSite:
        """Configure the next pool site like ``site1`` of the example file.

        ``substitutions`` replace paths in the example (its spool_root is
        always replaced by this MX's spool root).
        """
        from tests.peers.examples import example_toml

        self.used += 1
        if self.used > self.POOL_SIZE:
            raise PostfixError(f"all {self.POOL_SIZE} pool sites are in use: raise POOL_SIZE")
        name = pool_site_names()[self.used - 1]
        subs = {'spool_root = "/var/spool/mailfeed"': f'spool_root = "{self.spool_root}"',
                **(substitutions or {})}
        template = example_toml(example, subs)["sites"]["site1"]
        table: dict[str, object] = {}
        for key, value in template.items():
            if isinstance(value, list):
                value = [name if item == "site1" else item for item in value]
            elif value == "site1":
                value = name
            table[key] = value
        self.sites[name] = table
        self.write_config()
        fmt = str(table.get("format", "maildir"))
        path = self.spool_root / str(table.get("path", name))
        return MxSite(name, f"{name}.{self.DOMAIN_SUFFIX}", fmt, path)

    def write_config(self) -> None:
        """Write mailfeed's configuration atomically; mailfeed-fwd reads it per run."""
        lines = [f"spool_root = {toml_value(str(self.spool_root))}", ""]
        for name, table in self.sites.items():
            lines.append(f"[sites.{name}]")
            lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
            lines.append("")
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines))
        tmp.chmod(0o644)
        tmp.replace(self.config_path)


class SitePostfix:
    """The site role: Postfix receiving re-injected mail and delivering to Maildirs.

    Every domain under ``site.test`` is a virtual mailbox domain.
    :meth:`new_domain` hands out one of a fixed pool (virtual(8) allows no
    regexp substitution in its mailbox maps), and all mail to ``*@domain``
    is delivered to the Maildir ``mail_root/domain/`` as the test user.  The re-injection listener
    is docs/examples/postfix-site/master.cf on ``reinject_port``; the
    ordinary listener on ``instance.smtp_port`` applies the default checks.
    """

    DOMAIN_SUFFIX = "site.test"
    POOL_SIZE = 200

    def __init__(self, instance: PostfixInstance, reinject_port: int, uid: int, gid: int) -> None:
        from tests.peers.examples import example_text

        self.instance = instance
        self.reinject_port = reinject_port
        self.mail_root = instance.root / "mail"
        self.mail_root.mkdir()
        os.chown(self.mail_root, uid, gid)
        self.domains_used = 0
        config_dir = instance.config_dir
        suffix = re.escape(self.DOMAIN_SUFFIX)
        instance.write_table("vdomains", f"/\\.{suffix}$/ OK\n", kind="regexp")
        instance.write_table("vmailbox", "".join(
            f"@{domain} {domain}/\n" for domain in self.domain_pool()))
        instance.write_main_cf({
            "virtual_mailbox_domains": f"regexp:{config_dir / 'vdomains'}",
            "virtual_mailbox_maps": f"hash:{config_dir / 'vmailbox'}",
            "virtual_mailbox_base": str(self.mail_root),
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_minimum_uid": str(uid),
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        })
        instance.write_master_cf(example_text("postfix-site/master.cf", {
            "127.0.0.1:10026": f"127.0.0.1:{reinject_port}",
        }))
        self.sendmail = instance.root / "sendmail"
        self.sendmail.write_text(
            "#!/bin/sh\n"
            "# Postfix sendmail of the private site instance.\n"
            f'exec {SENDMAIL} -C {config_dir} "$@"\n'
        )
        self.sendmail.chmod(0o755)

    def domain_pool(self) -> list[str]:
        return [f"t{i:03d}.{self.DOMAIN_SUFFIX}" for i in range(1, self.POOL_SIZE + 1)]

    def new_domain(self) -> str:
        """Return a domain no other test of this session uses."""
        self.domains_used += 1
        if self.domains_used > self.POOL_SIZE:
            raise PostfixError(f"all {self.POOL_SIZE} site domains are in use: raise POOL_SIZE")
        return self.domain_pool()[self.domains_used - 1]

    def maildir(self, address: str) -> Path:
        """The Maildir of every address in ``address``'s domain."""
        return self.mail_root / address.rpartition("@")[2].lower()

    def messages(self, address: str) -> list[Path]:
        new = self.maildir(address) / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def wait_for_messages(self, address: str, count: int = 1,
                          timeout: float = DELIVERY_TIMEOUT) -> list[Path]:
        """Wait until ``address`` has ``count`` messages in new/; return their paths."""
        def probe() -> list[Path] | None:
            found = self.messages(address)
            return found if len(found) >= count else None

        return wait_until(probe, timeout=timeout,
                          what=f"{count} message(s) for {address} in {self.maildir(address)}",
                          diagnostics=self.instance.log_tail)
