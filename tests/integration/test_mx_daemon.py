"""``mailfeed mx`` and ``mailfeed site add`` as real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import poplib
import queue
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import pytest

from mailfeed import pop3client
from mailfeed.envelope import parse_block
from mailfeed.pop3client import RetrResult, TlsMode
from tests.integration.smtp_support import RawClient, stored_files, tmp_files
from tests.support import (
    ROOT,
    RUN_USER,
    as_run_user,
    cleanup_at_exit,
    forget_at_exit,
    is_root,
    kill_process,
    run,
    run_user_ids,
    script,
    shared_tmpdir,
)

PASSWORD = "pw-site1-example"
RSS_PROBE = Path(__file__).resolve().parent.parent / "rss_probe.py"
MESSAGE = (
    b"From: alice@example.net\r\nTo: bob@example.org\r\nSubject: over pop3\r\n\r\n"
    b"body line\r\n.dot line\r\n\r\nlast\r\n"
)
CONFIG = """\
spool_root = "{root}/spool"

[mx]
hostname = "mx.example.net"
smtp_listen = ["127.0.0.1:0"]
pop3_listen = ["127.0.0.1:0"]
min_free_space = 0
shutdown_grace = 20
"""


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src")
    env.pop("MAILFEED_FAULT", None)
    env.update(extra)
    return env


def site_add(
    config: Path, name: str, domain: str, *options: str
) -> subprocess.CompletedProcess[bytes]:
    argv = [script("mailfeed"), "site", "add", "--config", str(config), name,
            "--domain", domain, "--password-stdin", *options]
    result = run(argv, stdin=PASSWORD.encode() + b"\n", env=environment())
    assert result.returncode == 0, result.stderr.decode()
    return result


class Daemon:
    """A ``mailfeed mx`` process whose stderr lines are collected by a thread."""

    def __init__(self, config: Path, *, rss_file: Path | None = None,
                 start_timeout: float = 30, **env: str) -> None:
        self.ready_file = config.with_name("ready.json")
        argv = [script("mailfeed"), "mx", "--config", str(config), "--ready-file",
                str(self.ready_file), "-v"]
        if rss_file is not None:
            # The probe writes the daemon's peak RSS to rss_file when it exits.
            argv = [sys.executable, str(RSS_PROBE), str(rss_file), *argv]
        self.process = subprocess.Popen(
            argv,
            stderr=subprocess.PIPE,
            env=environment(**env),
        )
        self.pid = self.process.pid
        # If no teardown stops it (a test or fixture that crashes before
        # stop, a pytest that is interrupted), kill it when Python exits.
        cleanup_at_exit(self.process.pid, self.kill)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self.wait_for("mailfeed mx started", timeout=start_timeout)
            self.ready = json.loads(self.ready_file.read_text())
        except BaseException:
            self.kill()
            raise
        self.pid = int(self.ready["pid"])
        self.smtp_port = self.ready["smtp"][0][1]
        self.pop3_port = self.ready["pop3"][0][1] if self.ready.get("pop3") else None

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.lines.put(raw.decode("utf-8", "replace"))
        self.lines.put("")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """Return the first new log line containing ``text``; fail at exit or timeout."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no log line with {text!r} within {timeout} s:\n{''.join(self.log)}")
            if line == "":
                pytest.fail(f"mailfeed mx exited before logging {text!r}:\n{''.join(self.log)}")
            self.log.append(line)
            if text in line:
                return line

    def signal(self, signum: int) -> None:
        # Signal the daemon itself, because with rss_file self.process is the probe.
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the daemon and wait; SIGKILL it if it outlives ``timeout``."""
        try:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        finally:
            self.kill()
        self.reader.join(timeout=10)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        assert self.process.returncode is not None
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the daemon (the pid this object started) if it still runs."""
        kill_process(self.process, self.pid)
        forget_at_exit(self.process.pid)


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    config = tmp_path / "mx.toml"
    config.write_text(CONFIG.format(root=tmp_path))
    (tmp_path / "spool").mkdir()
    return config


@pytest.fixture
def daemon_with_site(setup: Path) -> Iterator[tuple[Daemon, Path]]:
    site_add(setup, "site1", "example.org")
    daemon = Daemon(setup)
    try:
        yield daemon, setup
    finally:
        daemon.stop()


def test_site_add_then_pop3_retrieves_exact_bytes(setup: Path) -> None:
    added = site_add(setup, "site1", "example.org")
    maildir = setup.parent / "spool" / "site1"
    passwd = setup.parent / "passwd"
    assert (maildir.stat().st_mode & 0o777) == 0o700
    assert (passwd.stat().st_mode & 0o777) == 0o600
    assert passwd.read_text().startswith("site1:{ARGON2ID}$argon2id$")
    assert '[sites."site1"]\nformat = "maildir"\ndomains = ["example.org"]\n' in setup.read_text()

    daemon = Daemon(setup)
    try:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as client:
            client.sendmail("alice@example.net", ["bob@example.org"], MESSAGE)
        stored = stored_files(maildir)
        assert len(stored) == 1
        pop = poplib.POP3("127.0.0.1", daemon.pop3_port, timeout=20)
        pop.user("site1")
        pop.pass_(PASSWORD)
        _response, lines, _octets = pop.retr(1)
        pop.quit()
        retrieved = b"\r\n".join(lines) + b"\r\n"
        assert retrieved == stored[0].read_bytes()
        block = parse_block(retrieved)
        assert block.envelope.recipients == ("bob@example.org",)
        assert retrieved.endswith(MESSAGE)
        daemon.signal(signal.SIGTERM)
        assert daemon.stop() == 0
    finally:
        daemon.stop()
    logs = "".join(daemon.log) + added.stdout.decode() + added.stderr.decode()
    assert "site1" in logs
    assert PASSWORD not in logs


def test_site_add_refuses_existing_site(setup: Path) -> None:
    site_add(setup, "site1", "example.org")
    before = setup.read_text()
    argv = [script("mailfeed"), "site", "add", "--config", str(setup), "site1",
            "--domain", "example.net", "--password-stdin"]
    result = run(argv, stdin=b"other\n", env=environment())
    assert result.returncode == 64
    assert b"site 'site1' already exists" in result.stderr
    assert setup.read_text() == before


def test_site_add_refuses_claimed_domain(setup: Path) -> None:
    site_add(setup, "site1", "example.org")
    argv = [script("mailfeed"), "site", "add", "--config", str(setup), "site2",
            "--domain", "EXAMPLE.org", "--password-stdin"]
    result = run(argv, stdin=b"other\n", env=environment())
    assert result.returncode == 78
    assert b"already claimed by site 'site1'" in result.stderr
    assert "site2" not in (setup.parent / "passwd").read_text()


def test_sighup_adds_site_and_survives_bad_config(
    daemon_with_site: tuple[Daemon, Path],
) -> None:
    daemon, config = daemon_with_site
    client = RawClient(daemon.smtp_port)
    client.reply()
    client.command(b"EHLO client.example.net\r\n")
    client.command(b"MAIL FROM:<alice@example.net>\r\n")
    assert client.command(b"RCPT TO:<carol@example.com>\r\n").startswith(b"550 5.7.1")
    client.command(b"QUIT\r\n")
    client.close()

    site_add(config, "site2", "example.com")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("configuration reloaded: 2 sites")
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as smtp:
        smtp.sendmail("alice@example.net", ["carol@example.com"], MESSAGE)
    assert len(stored_files(config.parent / "spool" / "site2")) == 1

    good = config.read_text()
    config.write_text(good + "\n[sites.site3]\ndomains = [\"example.com\"]\n")
    daemon.signal(signal.SIGHUP)
    line = daemon.wait_for("reload failed")
    assert "already claimed by site 'site2'" in line
    assert json.loads(daemon.ready_file.read_text())["generation"] == 2
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as smtp:
        smtp.sendmail("alice@example.net", ["carol@example.com", "bob@example.org"], MESSAGE)
    assert len(stored_files(config.parent / "spool" / "site2")) == 2
    assert len(stored_files(config.parent / "spool" / "site1")) == 1


def start_data(port: int) -> RawClient:
    client = RawClient(port)
    assert client.reply().startswith(b"220")
    client.command(b"EHLO client.example.net\r\n")
    assert client.command(b"MAIL FROM:<alice@example.net>\r\n").startswith(b"250")
    assert client.command(b"RCPT TO:<bob@example.org>\r\n").startswith(b"250")
    assert client.command(b"DATA\r\n").startswith(b"354")
    return client


def test_sigterm_lets_transaction_finish(daemon_with_site: tuple[Daemon, Path]) -> None:
    daemon, config = daemon_with_site
    client = start_data(daemon.smtp_port)
    stuffed = MESSAGE.replace(b"\r\n.", b"\r\n..")
    client.send(stuffed[:40])
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("stopping: no new connections")
    with pytest.raises(ConnectionRefusedError):
        RawClient(daemon.smtp_port)
    client.send(stuffed[40:] + b".\r\n")
    assert client.reply().startswith(b"250 2.0.0 OK: queued as ")
    assert client.reply().startswith(b"421 4.3.2")
    client.close()
    assert daemon.stop() == 0
    stored = stored_files(config.parent / "spool" / "site1")
    assert len(stored) == 1
    assert stored[0].read_bytes().endswith(MESSAGE)


def test_sigkill_during_data_stores_nothing(daemon_with_site: tuple[Daemon, Path]) -> None:
    daemon, config = daemon_with_site
    client = start_data(daemon.smtp_port)
    client.send(MESSAGE)
    # NOOP inside DATA is message text: the server answers nothing until ".".
    daemon.signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)
    with pytest.raises(ConnectionError):
        client.reply()
    client.close()
    maildir = config.parent / "spool" / "site1"
    assert stored_files(maildir) == []
    assert tmp_files(maildir) == []


def test_kill_during_storage_sends_no_250(setup: Path) -> None:
    site_add(setup, "site1", "example.org")
    daemon = Daemon(setup, MAILFEED_FAULT="maildir.after_tmp_write:kill")
    try:
        client = start_data(daemon.smtp_port)
        client.send(MESSAGE + b".\r\n")
        with pytest.raises(ConnectionError):
            client.reply()
        client.close()
        assert daemon.process.wait(timeout=10) == -signal.SIGKILL
    finally:
        daemon.stop()
    assert stored_files(setup.parent / "spool" / "site1") == []


LARGE_SIZE = 200 * 1024 * 1024
RSS_LIMIT_KIB = 64 * 1024
LARGE_FIRST_LINE = b"From: alice@example.net\r\n"


def large_message_lines() -> Iterator[bytes]:
    """Yield the lines of a message of LARGE_SIZE octets, each ending in CRLF.

    Every line carries its number, and every seventh starts with a dot, so
    a lost, repeated or wrongly unstuffed line changes the digest.
    """
    head = LARGE_FIRST_LINE + b"To: bob@example.org\r\nSubject: large\r\n\r\n"
    yield head
    size = len(head)
    number = 0
    while size < LARGE_SIZE:
        lead = b"." if number % 7 == 0 else b"x"
        line = lead + b"%09d " % number + b"y" * 986 + b"\r\n"
        line = line[: LARGE_SIZE - size - 2] + b"\r\n" if size + len(line) > LARGE_SIZE else line
        yield line
        size += len(line)
        number += 1


def send_large_message(port: int) -> tuple[int, str]:
    """Send the large message over SMTP, streaming; return its size and SHA-256."""
    client = start_data(port)
    digest = hashlib.sha256()
    size = 0
    batch: list[bytes] = []
    batch_size = 0
    for line in large_message_lines():
        digest.update(line)
        size += len(line)
        batch.append(b"." + line if line.startswith(b".") else line)
        batch_size += len(batch[-1])
        if batch_size >= 1024 * 1024:
            client.send(b"".join(batch))
            batch.clear()
            batch_size = 0
    client.send(b"".join(batch) + b".\r\n")
    reply = client.reply()
    assert reply.startswith(b"250 2.0.0 OK: queued as "), reply
    client.command(b"QUIT\r\n")
    client.close()
    return size, digest.hexdigest()


def file_digest(path: Path, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        stream.seek(offset)
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def peak_rss_kib(pid: int) -> int:
    """Return VmHWM, the peak resident set size of a live process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM line in /proc/{pid}/status")


class DigestSink:
    """A POP3 retrieve sink that hashes what it receives instead of keeping it."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


async def retrieve_first(port: int, sink: DigestSink) -> RetrResult:
    client = await pop3client.connect("127.0.0.1", port, tls=TlsMode.NONE)
    async with client:
        await client.login("site1", PASSWORD)
        sizes = await client.list_all()
        results = [
            result
            async for result in client.retrieve(
                [1], open_sink=lambda _msgnum: cast(BinaryIO, sink), expected_sizes=sizes
            )
        ]
        await client.quit()
    return results[0]


@pytest.mark.slow
def test_200mb_message_through_smtp_and_pop3(setup: Path) -> None:
    setup.write_text(setup.read_text() + "\n[limits]\nmax_message_size = 0\n")
    # mailfeed.pop3client logs in with SCRAM-SHA-256 whenever the server
    # offers it, and the server verifies SCRAM only against a SCRAM-SHA-256
    # or plain-text passwd entry, never against the default ARGON2ID hash.
    site_add(setup, "site1", "example.org", "--scheme", "SCRAM-SHA-256")
    rss_file = setup.with_name("peak-rss")
    daemon = Daemon(setup, rss_file=rss_file)
    try:
        at_start = peak_rss_kib(daemon.pid)
        size, digest = send_large_message(daemon.smtp_port)
        after_smtp = peak_rss_kib(daemon.pid)
        [stored] = stored_files(setup.parent / "spool" / "site1")
        with stored.open("rb") as stream:
            offset = stream.read(4096).index(LARGE_FIRST_LINE)
        assert stored.stat().st_size - offset == size
        assert file_digest(stored, offset) == digest

        sink = DigestSink()
        result = asyncio.run(retrieve_first(daemon.pop3_port, sink))
        after_pop3 = peak_rss_kib(daemon.pid)
        assert result.ok, result.error
        assert sink.size == stored.stat().st_size
        assert sink.digest.hexdigest() == file_digest(stored)

        daemon.signal(signal.SIGTERM)
        assert daemon.stop() == 0
    finally:
        daemon.stop()
    at_exit = int(rss_file.read_text())
    print(f"mailfeed mx peak RSS: {at_start} KiB at start, {after_smtp} KiB after SMTP, "
          f"{after_pop3} KiB after POP3, {at_exit} KiB at exit")
    assert after_smtp < RSS_LIMIT_KIB
    assert after_pop3 < RSS_LIMIT_KIB
    assert at_exit < RSS_LIMIT_KIB


def run_mx(config: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``mailfeed mx`` in the foreground; it must exit by itself."""
    argv = [script("mailfeed"), "mx", "--config", str(config)]
    return run(argv, env=environment(), timeout=30)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_mx_refuses_bad_spool_root(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "nonexist" / "spool"
    if kind == "file":
        root = tmp_path / "spool-file"
        root.write_bytes(b"")
    config = tmp_path / "mx.toml"
    config.write_text(CONFIG.replace("{root}/spool", str(root)).format(root=tmp_path))
    result = run_mx(config)
    err = result.stderr.decode()
    assert result.returncode == 78, err
    assert f"spool_root = {str(root)!r}" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_mx_refuses_missing_site_parent(setup: Path) -> None:
    setup.write_text(
        setup.read_text() + '\n[sites.site1]\npath = "/nonexist-mailfeed/site1"\n'
        'domains = ["example.org"]\n'
    )
    result = run_mx(setup)
    err = result.stderr.decode()
    assert result.returncode == 78, err
    assert "sites.site1.path = '/nonexist-mailfeed/site1'" in err


def test_sighup_keeps_config_when_spool_root_missing(
    daemon_with_site: tuple[Daemon, Path],
) -> None:
    daemon, config = daemon_with_site
    good = config.read_text()
    missing = config.parent / "gone"
    config.write_text(good.replace(str(config.parent / "spool"), str(missing)))
    daemon.signal(signal.SIGHUP)
    line = daemon.wait_for("reload failed")
    assert f"spool_root = {str(missing)!r} does not exist" in line
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as smtp:
        smtp.sendmail("alice@example.net", ["bob@example.org"], MESSAGE)
    assert len(stored_files(config.parent / "spool" / "site1")) == 1


@pytest.mark.parametrize("key", ["smtp_listen", "pop3_listen"])
def test_mx_listen_address_in_use(setup: Path, key: str) -> None:
    site_add(setup, "site1", "example.org")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = setup.read_text().replace(
            f'{key} = ["127.0.0.1:0"]', f'{key} = ["127.0.0.1:{port}"]'
        )
        setup.write_text(text)
        result = run_mx(setup)
    err = result.stderr.decode()
    assert result.returncode == 75, err
    assert "Traceback" not in err
    assert f"mx.{key} = '127.0.0.1:{port}': cannot listen" in err.splitlines()[-1]


def test_mx_listen_address_not_on_host(setup: Path) -> None:
    # 203.0.113.1 (RFC 5737 TEST-NET-3) is on no interface here: bind fails
    # locally and nothing is sent anywhere.
    setup.write_text(setup.read_text().replace(
        'smtp_listen = ["127.0.0.1:0"]', 'smtp_listen = ["203.0.113.1:0"]'
    ))
    result = run_mx(setup)
    err = result.stderr.decode()
    assert result.returncode == 78, err
    assert "Traceback" not in err
    assert err.splitlines() == [
        f"mailfeed mx: {setup}: mx.smtp_listen = '203.0.113.1:0': cannot listen: "
        + err.split("cannot listen: ", 1)[1].rstrip("\n")
    ]


@pytest.mark.parametrize("scheme", ["MD5", "CRYPT"])
def test_site_add_unsupported_scheme(setup: Path, scheme: str) -> None:
    before = setup.read_text()
    argv = [script("mailfeed"), "site", "add", "--config", str(setup), "site1",
            "--domain", "example.org", "--password-stdin", "--scheme", scheme]
    result = run(argv, stdin=PASSWORD.encode() + b"\n", env=environment())
    err = result.stderr.decode()
    assert result.returncode == 64, err
    assert err.splitlines() == [
        f"mailfeed site: --scheme {scheme!r} is not supported; use one of ARGON2I, ARGON2ID, "
        "CLEARTEXT, PLAIN, SCRAM-SHA-256, SHA256, SHA256-CRYPT, SHA512, SHA512-CRYPT, "
        "SSHA256, SSHA512"
    ]
    assert setup.read_text() == before
    assert not (setup.parent / "passwd").exists()
    assert not (setup.parent / "spool" / "site1").exists()


@pytest.fixture
def shared_config() -> Iterator[Path]:
    """A configuration in a folder the unprivileged test user may read."""
    if not is_root():
        pytest.skip("site add --owner and running fwd as another user need root")
    folder = shared_tmpdir()
    try:
        config = folder / "mx.toml"
        config.write_text(f'spool_root = "{folder}/spool"\n')
        yield config
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fwd_as_run_user(config: Path) -> subprocess.CompletedProcess[bytes]:
    argv = as_run_user([script("mailfeed-fwd"), "--config", str(config), "site1",
                        "alice@example.net", "bob@example.org"])
    return run(argv, stdin=MESSAGE, env=environment())


def test_site_add_owner_lets_fwd_store(shared_config: Path) -> None:
    site_add(shared_config, "site1", "example.org", "--owner", RUN_USER)
    uid, gid = run_user_ids()
    spool_root = shared_config.parent / "spool"
    for path in (spool_root, spool_root / "site1", spool_root / "site1" / "new"):
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path
    result = fwd_as_run_user(shared_config)
    assert result.returncode == 0, result.stderr.decode()
    assert len(stored_files(spool_root / "site1")) == 1


def test_fwd_permission_error_names_path_and_user(shared_config: Path) -> None:
    site_add(shared_config, "site1", "example.org")
    result = fwd_as_run_user(shared_config)
    err = result.stderr.decode()
    assert result.returncode == 75, err
    uid, gid = run_user_ids()
    site = shared_config.parent / "spool" / "site1"
    assert err == (
        f"mailfeed-fwd: Permission denied: {site}; mailfeed-fwd runs as user {RUN_USER} "
        f"(uid {uid}, gid {gid}): make the spool writable by that user\n"
    )


def test_site_add_unknown_owner(setup: Path) -> None:
    argv = [script("mailfeed"), "site", "add", "--config", str(setup), "site1",
            "--domain", "example.org", "--password-stdin", "--owner", "nosuchuser-mf:mail"]
    result = run(argv, stdin=PASSWORD.encode() + b"\n", env=environment())
    assert result.returncode == 64
    assert result.stderr == (
        b"mailfeed site: --owner 'nosuchuser-mf:mail': no user 'nosuchuser-mf' on this host\n"
    )
    assert not (setup.parent / "spool" / "site1").exists()


def processes_naming(text: str) -> list[int]:
    """Return the pids whose command line contains ``text`` (to observe, not to kill)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_daemon_killed_when_start_fails(setup: Path) -> None:
    with pytest.raises(pytest.fail.Exception):
        Daemon(setup, start_timeout=0.001)
    assert processes_naming(str(setup)) == []


def test_daemon_left_running_is_killed_at_exit(setup: Path) -> None:
    site_add(setup, "site1", "example.org")
    code = (
        "import sys; from pathlib import Path; "
        "from tests.integration.test_mx_daemon import Daemon; "
        "d = Daemon(Path(sys.argv[1])); print(d.pid, flush=True); sys.exit(3)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(setup)], capture_output=True, text=True,
        env=environment(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'src'}"), cwd=ROOT,
        timeout=60, check=False,
    )
    assert result.returncode == 3, result.stderr
    assert processes_naming(str(setup)) == []
