"""Launchers for mailfeed's own programs in the benchmarks, and checks that they exist.

mailfeed's parts are built in parallel, so each helper here first checks
that the module it needs is importable from the checkout under test and
raises :class:`~bench.harness.NotRun` with the reason when it is not.
"""

from __future__ import annotations

import compileall
import functools
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import NotRun
from bench.mailboxes import RECIPIENT
from bench.peers import as_run_user, chown_tree, free_port, run_user_ids, wait_port

__all__ = [
    "FETCH_CONFIG",
    "MX_SITE",
    "MxDaemon",
    "mailfeed_env",
    "mailfeed_program",
    "mx_spool_config",
    "require_module",
]

ROOT = Path(__file__).resolve().parent.parent
MX_SITE = "site1"
POP3_USER = MX_SITE
POP3_PASSWORD = "bench-secret"

# The site file of ``mailfeed fetch`` for one plaintext POP3 source on 127.0.0.1,
# delivering into Maildirs under {maildir}/<recipient>.
FETCH_CONFIG = """\
state = "{workdir}/state.sqlite"
quarantine = "{workdir}/state.quarantine"
local_domains = ["example.org"]
delivery = "maildir:{maildir}"

[limits]
max_message_size = 0
{extra_limits}

[[source]]
name = "bench"
host = "127.0.0.1"
port = {port}
tls = "none"
user = "{user}"
password = "{password}"
"""


def require_module(module: str, branch: str) -> None:
    """Raise NotRun unless ``module`` can be imported from the checkout."""
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    if found is None:
        raise NotRun(f"{module} is not in this checkout (branch {branch} not merged)")


def mailfeed_program(name: str = "mailfeed") -> str:
    """Return the path of a mailfeed console script beside this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise NotRun(f"{path} not found: install mailfeed into this environment")
    return str(path)


@functools.cache
def _compile_sources() -> None:
    """Write the checkout's bytecode (.pyc), as an installed copy has it.

    The programs run as user mail, who may not write ``__pycache__`` in the
    checkout, so without this each run would compile mailfeed from source:
    a cost that an installed package (pip compiles at install time) never pays.
    """
    compileall.compile_dir(ROOT / "src", quiet=1)


def mailfeed_env(home: Path) -> dict[str, str]:
    _compile_sources()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT / "src")}
    return env


def mx_spool_config(root: Path, *, spool_format: str = "maildir", extra: str = "") -> Path:
    """Write an MX configuration with one Maildir site and return its path."""
    spool_root = root / "spool"
    spool_root.mkdir(parents=True, exist_ok=True)
    (spool_root / MX_SITE).mkdir(exist_ok=True)
    for sub in ("cur", "new", "tmp"):
        (spool_root / MX_SITE / sub).mkdir(exist_ok=True)
    config = root / "mx.toml"
    config.write_text(
        f'spool_root = "{spool_root}"\n\n'
        "[limits]\nmax_message_size = 0\n\n"
        f"{extra}"
        f"[sites.{MX_SITE}]\n"
        f'format = "{spool_format}"\n'
        'domains = ["example.org"]\n'
        f'addresses = ["{RECIPIENT}"]\n')
    chown_tree(root)
    return config


class MxDaemon:
    """``mailfeed mx`` with one site, SMTP and POP3 on free ports, run as user mail."""

    def __init__(self, root: Path, *, pop3: bool = True) -> None:
        require_module("mailfeed.mx", "smtpmx")
        self.root = root
        self.smtp_port = free_port()
        self.pop3_port = free_port()
        self.spool = root / "spool" / MX_SITE
        self.ready_file = root / "ready"
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        passwd = root / "passwd"
        passwd.write_text(f"{POP3_USER}:{{PLAIN}}{POP3_PASSWORD}\n")
        self.pop3 = pop3
        pop3_listen = f'["127.0.0.1:{self.pop3_port}"]' if pop3 else "[]"
        extra = (
            "[mx]\n"
            'hostname = "mx.example.net"\n'
            f'smtp_listen = ["127.0.0.1:{self.smtp_port}"]\n'
            f'pop3_listen = {pop3_listen}\n'
            'pop3s_listen = []\n'
            f'passwd_file = "{passwd}"\n'
            "allow_plaintext_auth = true\n\n")
        self.config = mx_spool_config(root, extra=extra)
        passwd.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(passwd, *run_user_ids())

    def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        argv = as_run_user([mailfeed_program(), "mx", "--config", str(self.config),
                            "--ready-file", str(self.ready_file)])
        log = open(self.root / "mx.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(argv, env=mailfeed_env(self.root), stdout=log,
                                        stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while not self.ready_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "mx.log").read_text(errors="replace")[-1500:]
                self.stop()
                if "POP3 is not available yet" in tail:
                    raise NotRun("mailfeed mx does not serve POP3 yet in this checkout")
                raise RuntimeError(f"mailfeed mx did not start: {tail}")
            time.sleep(0.02)
        wait_port(self.smtp_port, process=self.process)

    def peak_rss_kib(self) -> int:
        """Return the daemon's peak resident set size so far (VmHWM), in KiB."""
        if self.process is None:
            return 0
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
