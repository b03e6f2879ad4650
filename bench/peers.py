"""Peer programs for the benchmarks: discovery, versions and a private Dovecot.

The peers are the programs mailfeed is compared with: the POP3 clients
fetchmail, getmail6 and mpop, the POP3 server Dovecot, its local delivery
agent dovecot-lda, and Postfix.  Each benchmark that needs a missing peer
reports "not run" with the reason instead of a number.

Clients run as the unprivileged user ``mail`` when the harness runs as root,
because getmail6 refuses to deliver into a Maildir as root, and every client
gets the same treatment for fairness.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PEER_PROGRAMS",
    "RUN_USER",
    "Dovecot",
    "Peer",
    "as_run_user",
    "chown_tree",
    "find_peers",
    "free_port",
    "run_user_ids",
    "wait_port",
]

RUN_USER = os.environ.get("MAILFEED_BENCH_USER", "mail")
PASSWORD = "bench-secret"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/lib/dovecot"])

# name -> (program, argv that prints its version, pattern of the version).
PEER_PROGRAMS: dict[str, tuple[str, list[str], str]] = {
    "fetchmail": ("fetchmail", ["--version"], r"release ([\d.]+)|fetchmail ([\d.]+)"),
    "getmail6": ("getmail", ["--version"], r"getmail ([\d.]+)"),
    "mpop": ("mpop", ["--version"], r"mpop version ([\d.]+)"),
    "dovecot": ("dovecot", ["--version"], r"^([\d.]+)"),
    "dovecot-lda": ("dovecot-lda", [], ""),
    "postfix": ("postfix", [], ""),
    "safecat": ("safecat", [], ""),
    "strace": ("strace", ["-V"], r"version ([\d.]+)"),
}


@dataclass(frozen=True)
class Peer:
    """One peer program: where it is and which version it reports."""

    name: str
    path: str | None
    version: str

    @property
    def present(self) -> bool:
        return self.path is not None


def _package_version(program: str) -> str:
    """Return the Debian package version that owns ``program``, or ""."""
    try:
        owner = subprocess.run(["dpkg", "-S", program], capture_output=True, text=True,
                               timeout=10, check=False).stdout.split(":")[0].strip()
        if not owner:
            return ""
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", owner], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def find_peers() -> dict[str, Peer]:
    """Locate each peer program and read its version."""
    peers: dict[str, Peer] = {}
    for name, (program, version_argv, pattern) in PEER_PROGRAMS.items():
        path = shutil.which(program, path=SEARCH_PATH)
        version = ""
        if path is not None and version_argv:
            try:
                result = subprocess.run([path, *version_argv], capture_output=True, text=True,
                                        timeout=10, check=False)
                match = re.search(pattern, result.stdout + result.stderr, re.MULTILINE)
                if match:
                    version = next(group for group in match.groups() if group)
            except (OSError, subprocess.SubprocessError):
                version = ""
        if path is not None and not version:
            version = _package_version(path) or "unknown"
        peers[name] = Peer(name, path, version)
    return peers


def run_user_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(RUN_USER)
    return entry.pw_uid, entry.pw_gid


def as_run_user(argv: Sequence[str]) -> list[str]:
    """Prefix a command so it runs as the unprivileged user when the harness is root."""
    if os.geteuid() != 0:
        return list(argv)
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [setpriv, f"--reuid={RUN_USER}", f"--regid={RUN_USER}", "--init-groups", *argv]


def chown_tree(path: Path) -> None:
    """Give a tree to the unprivileged user (a no-op unless the harness is root)."""
    if os.geteuid() != 0:
        return
    uid, gid = run_user_ids()
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None,
              ) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before "
                                   f"listening on port {port}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s"
                                   ) from None
            time.sleep(0.02)


DOVECOT_CONF = """\
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{maildir}
pop3_uidl_format = %08Xu%08Xv
first_valid_uid = {uid}
default_login_user = dovenull
default_internal_user = dovecot
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home
}}
protocol lda {{
  postmaster_address = postmaster@example.net
}}
"""


class Dovecot:
    """A private Dovecot POP3 server on 127.0.0.1 serving one Maildir as user ``bench``."""

    user = "bench"
    password = PASSWORD

    def __init__(self, base: Path, maildir: Path, program: str) -> None:
        self.base = base
        self.maildir = maildir
        self.program = program
        self.port = 0
        self.config = base / "dovecot.conf"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        self.base.mkdir(parents=True, exist_ok=True)
        for sub in ("run", "state", "home"):
            (self.base / sub).mkdir(exist_ok=True)
        uid, gid = run_user_ids()
        os.chown(self.base / "home", uid, gid)
        self.port = free_port()
        self.config.write_text(DOVECOT_CONF.format(base=self.base, maildir=self.maildir,
                                                   port=self.port, uid=uid, gid=gid))
        (self.base / "passwd").write_text(f"{self.user}:{{PLAIN}}{self.password}::::\n")
        self._process = subprocess.Popen([self.program, "-F", "-c", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port, process=self._process)
        except (RuntimeError, TimeoutError) as exc:
            log_text = self.log_tail()
            self.stop()
            raise RuntimeError(f"Dovecot failed to start: {exc}\n{log_text}") from None
        return self.port

    def log_tail(self, lines: int = 20) -> str:
        path = self.base / "dovecot.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
