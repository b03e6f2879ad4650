"""POP3 clients under test: configuration files and measured runs.

Each client drains one POP3 mailbox on 127.0.0.1 (deleting what it fetched)
into a Maildir, as user ``mail`` when the harness runs as root:

* fetchmail 6.4 hands each message to an MDA, ``safecat TMP NEW``, because
  it has no Maildir writer; ``sslproto ""`` stops it from trying STLS.
* mpop writes the Maildir itself; ``keep off`` deletes, and ``only_new off``
  fetches every message regardless of its UID file.
* getmail6 uses its Maildir destination with ``delete = true``.
* mailfeed fetch reads the block and delivers into a Maildir target.

:func:`run_measured` runs one command and returns its wall time and peak
resident set size.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench.peers import as_run_user, chown_tree, run_user_ids

__all__ = [
    "ClientSetup",
    "Measured",
    "fetchmail_setup",
    "getmail_setup",
    "mailfeed_fetch_setup",
    "mpop_setup",
    "run_measured",
]


@dataclass
class Measured:
    """One finished command: exit status, wall time (s), peak RSS (KiB), stderr tail."""

    returncode: int
    elapsed: float
    max_rss_kib: int
    stderr: str


def _vm_hwm_kib(pid: int) -> int:
    """Return the peak RSS (VmHWM) of a live process in KiB, or 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_measured(argv: list[str], *, env: dict[str, str] | None = None,
                 cwd: Path | None = None, stdin: bytes | None = None,
                 stdin_path: Path | None = None, timeout: float = 1800.0,
                 poll_interval: float = 0.005) -> Measured:
    """Run a command and measure it; stdout is discarded, stderr kept (last 2000 chars).

    Peak RSS comes from polling VmHWM in /proc, because ``ru_maxrss`` of a
    child forked from this harness includes the harness's own RSS at exec.
    The last few milliseconds before exit may be missed.
    """
    err_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-stderr-{os.getpid()}"
    outcome: dict[str, float | int] = {}
    with ExitStack() as files:
        err = files.enter_context(open(err_path, "w+b"))
        stdin_source: int | IO[bytes] = subprocess.DEVNULL
        if stdin is not None:
            stdin_source = subprocess.PIPE
        elif stdin_path is not None:
            stdin_source = files.enter_context(open(stdin_path, "rb"))
        started = time.perf_counter()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                   stderr=err, stdin=stdin_source)

        def wait_for_exit() -> None:
            _pid, status, _usage = os.wait4(process.pid, 0)
            outcome["ended"] = time.perf_counter()
            outcome["status"] = status

        waiter = threading.Thread(target=wait_for_exit, daemon=True)
        waiter.start()
        if stdin is not None and process.stdin is not None:
            try:
                process.stdin.write(stdin)
            except BrokenPipeError:
                pass
            finally:
                process.stdin.close()
        peak = 0
        deadline = started + timeout
        while waiter.is_alive():
            peak = max(peak, _vm_hwm_kib(process.pid))
            if time.perf_counter() > deadline:
                process.kill()
                waiter.join()
                break
            waiter.join(poll_interval)
        process.returncode = os.waitstatus_to_exitcode(int(outcome["status"]))
        err.seek(0)
        stderr = err.read().decode(errors="replace")[-2000:]
    err_path.unlink(missing_ok=True)
    return Measured(process.returncode, float(outcome["ended"]) - started, peak, stderr)


@dataclass
class ClientSetup:
    """One client ready to run: its command, environment and work folder."""

    name: str
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    maildir: Path
    # Folders the client expects to exist, recreated empty by reset().
    state_dirs: tuple[Path, ...] = ()

    def reset(self) -> None:
        """Empty the destination Maildir and the client's own state before a run."""
        if self.maildir.exists():
            shutil.rmtree(self.maildir)
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(parents=True)
        for leftover in self.workdir.glob("state*"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        for folder in self.state_dirs:
            folder.mkdir(parents=True)
        chown_tree(self.workdir)

    def delivered(self) -> int:
        """Count messages in every Maildir under the destination (one per recipient)."""
        count = 0
        for dirpath, _dirnames, filenames in os.walk(self.maildir):
            if os.path.basename(dirpath) in ("new", "cur"):
                count += len(filenames)
        return count

    def run(self, timeout: float = 1800.0) -> Measured:
        return run_measured(as_run_user(self.argv), env=self.env, cwd=self.workdir,
                            timeout=timeout)


def _base_env(workdir: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
            "LANG": "C.UTF-8"}


def _private_file(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(path, *run_user_ids())


def _workdir(root: Path, name: str) -> tuple[Path, Path]:
    workdir = root / name
    workdir.mkdir(parents=True, exist_ok=True)
    maildir = workdir / "Maildir"
    chown_tree(workdir)
    return workdir, maildir


def fetchmail_setup(root: Path, program: str, safecat: str, port: int, user: str,
                    password: str) -> ClientSetup:
    workdir, maildir = _workdir(root, "fetchmail")
    rc = workdir / "fetchmailrc"
    _private_file(rc, (
        "set no bouncemail\n"
        # bad-header accept: by default fetchmail 6.4 leaves a message with a
        # malformed header line on the server, and the corpus has one.
        f"poll 127.0.0.1 service {port} protocol pop3 auth password bad-header accept\n"
        f'  user "{user}" there password "{password}"\n'
        '  sslproto ""\n'
        "  fetchall nokeep\n"
        f'  mda "{safecat} {maildir}/tmp {maildir}/new"\n'))
    argv = [program, "--fetchmailrc", str(rc), "--idfile", str(workdir / "state.ids"),
            "--pidfile", str(workdir / "state.pid"), "--nodetach", "--nosyslog", "--silent"]
    return ClientSetup("fetchmail", argv, _base_env(workdir), workdir, maildir)


def mpop_setup(root: Path, program: str, port: int, user: str, password: str) -> ClientSetup:
    workdir, maildir = _workdir(root, "mpop")
    rc = workdir / "mpoprc"
    _private_file(rc, (
        "defaults\n"
        "account bench\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        f"user {user}\n"
        f"password {password}\n"
        "auth user\n"
        "tls off\n"
        "pipelining auto\n"
        f"delivery maildir {maildir}\n"
        "keep off\n"
        "only_new off\n"
        f"uidls_file {workdir}/state.uidls\n"))
    argv = [program, f"--file={rc}", "--quiet", "bench"]
    return ClientSetup("mpop", argv, _base_env(workdir), workdir, maildir)


def getmail_setup(root: Path, program: str, port: int, user: str, password: str) -> ClientSetup:
    workdir, maildir = _workdir(root, "getmail6")
    rc = workdir / "getmailrc"
    _private_file(rc, (
        "[retriever]\n"
        "type = SimplePOP3Retriever\n"
        "server = 127.0.0.1\n"
        f"port = {port}\n"
        f"username = {user}\n"
        f"password = {password}\n"
        # getmail6 6.18 also waits this long for a delivery child whose exit it
        # sometimes misses; 20 s instead of 180 s bounds that stall.
        "timeout = 20\n\n"
        "[destination]\n"
        "type = Maildir\n"
        f"path = {maildir}/\n\n"
        "[options]\n"
        "delete = true\n"
        "read_all = true\n"
        "verbose = 0\n"))
    getmaildir = workdir / "state.getmail"
    argv = [program, f"--getmaildir={getmaildir}", f"--rcfile={rc}", "--quiet"]
    return ClientSetup("getmail6", argv, _base_env(workdir), workdir, maildir, (getmaildir,))


def mailfeed_fetch_setup(root: Path, program: str, port: int, user: str, password: str,
                         config_text: str) -> ClientSetup:
    """Set up ``mailfeed fetch``; ``config_text`` is its site.toml, already filled in."""
    workdir, maildir = _workdir(root, "mailfeed")
    config = workdir / "site.toml"
    _private_file(config, config_text.format(port=port, user=user, password=password,
                                             maildir=maildir, workdir=workdir))
    argv = [program, "fetch", "--config", str(config)]
    # The console script imports mailfeed from this checkout, not from an installed copy.
    env = {**_base_env(workdir), "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    return ClientSetup("mailfeed", argv, env, workdir, maildir)
