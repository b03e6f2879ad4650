"""mailfeed-fwd as the MTA runs it: exit codes, stderr, paths, privileges, memory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailfeed import fwd
from tests.integration.fwd_helpers import (
    MAILDIR_SITE,
    MBOX_SITE,
    fwd_env,
    maildir_files,
    run_fwd,
    write_config,
)
from tests.support import (
    as_run_user,
    case_bytes,
    chown_tree,
    is_root,
    script,
    shared_tmpdir,
)

MESSAGE = b"Subject: test\r\n\r\nBody.\r\n"


@pytest.fixture
def root() -> Iterator[Path]:
    path = shared_tmpdir()
    write_config(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fwd_args(root: Path, *args: str) -> list[str]:
    return ["--config", str(root / "mx.toml"), *args]


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.count("\n") == 1, text
    assert text.startswith("mailfeed-fwd: ")
    return text


def test_stored_exit_0(root: Path) -> None:
    result = run_fwd(fwd_args(root, MAILDIR_SITE, "<a@example.net>", "<b@example.org>"), MESSAGE)
    assert result.returncode == 0
    assert result.stderr == b""
    [stored] = maildir_files(root)
    assert stored.read_bytes().startswith(b"X-Mailfeed-Sender: a@example.net\r\n")


def test_config_from_environment(root: Path) -> None:
    env = fwd_env(MAILFEED_CONFIG=str(root / "mx.toml"))
    result = run_fwd([MAILDIR_SITE, "", "b@example.org"], MESSAGE, env=env)
    assert result.returncode == 0, result.stderr
    assert len(maildir_files(root)) == 1


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        ([], 64, "expected SITE, SENDER and at least one RCPT"),
        (["--bogus", "s", "a", "b"], 64, "unknown option '--bogus'"),
        ([MAILDIR_SITE, "a@example.net", "bad rcpt "], 65, "invalid recipient 'bad rcpt '"),
        ([MAILDIR_SITE, "a\x01@example.net", "b@example.org"], 65, "invalid sender"),
        # Latin-1 bytes on the command line: the block reader would reject them.
        ([MAILDIR_SITE, "a@example.net", "j\udcfcrgen@example.org"], 65, "not valid UTF-8"),
        (["nosuch", "a@example.net", "b@example.org"], 67, "unknown site 'nosuch'"),
    ],
)
def test_exit_codes(root: Path, args: list[str], code: int, text: str) -> None:
    result = run_fwd(fwd_args(root, *args) if args else [], MESSAGE)
    assert result.returncode == code
    assert text in one_line(result.stderr)
    assert maildir_files(root) == []


def test_missing_config_exit_78(root: Path) -> None:
    missing = root / "missing.toml"
    result = run_fwd(["--config", str(missing), MAILDIR_SITE, "", "b@example.org"], MESSAGE)
    assert result.returncode == 78
    assert f"{missing}: configuration file not found" in one_line(result.stderr)


def test_invalid_config_exit_78(root: Path) -> None:
    (root / "mx.toml").write_text("[limits]\nmax_recipients = 'many'\n")
    result = run_fwd(fwd_args(root, MAILDIR_SITE, "", "b@example.org"), MESSAGE)
    assert result.returncode == 78
    assert "limits.max_recipients = 'many'" in one_line(result.stderr)


def test_too_large_exit_65(root: Path) -> None:
    write_config(root, "max_message_size = 10")
    result = run_fwd(fwd_args(root, MAILDIR_SITE, "", "b@example.org"), MESSAGE)
    assert result.returncode == 65
    assert f"message is {len(MESSAGE)} octets, over max_message_size of 10" in one_line(
        result.stderr
    )
    assert maildir_files(root) == []
    assert maildir_files(root, "tmp") == []


def test_too_many_recipients_exit_65(root: Path) -> None:
    write_config(root, "max_recipients = 1")
    result = run_fwd(fwd_args(root, MAILDIR_SITE, "", "b@example.org", "c@example.org"), MESSAGE)
    assert result.returncode == 65
    assert "2 recipients, over max_recipients of 1" in one_line(result.stderr)


def test_lock_timeout_exit_75(root: Path) -> None:
    write_config(root, "lock_timeout = 0.2")
    (root / f"{MBOX_SITE}.lock").write_text(f"{os.getpid()} {os.uname().nodename}\n")
    result = run_fwd(fwd_args(root, MBOX_SITE, "", "b@example.org"), MESSAGE)
    assert result.returncode == 75
    assert "timed out after 0.2 s waiting for the lock" in one_line(result.stderr)


def test_deadline_exit_75_nothing_stored(root: Path) -> None:
    write_config(root, "deadline = 1.0")
    argv = as_run_user([script("mailfeed-fwd"), *fwd_args(root, MAILDIR_SITE, "", "b@x.org")])
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=fwd_env()
    )
    assert proc.stdin is not None
    proc.stdin.write(MESSAGE)  # and never close: the message never ends
    proc.stdin.flush()
    try:
        proc.wait(timeout=60)
    finally:
        proc.stdin.close()
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode == 75
    assert "deadline of 1 s (limits.deadline) passed" in one_line(err)
    assert maildir_files(root) == []
    assert maildir_files(root, "tmp") == []


@pytest.mark.skipif(not is_root(), reason="needs root to check the root refusal")
def test_root_refused_exit_77(root: Path) -> None:
    result = run_fwd(fwd_args(root, MAILDIR_SITE, "", "b@example.org"), MESSAGE, as_user=False)
    assert result.returncode == 77
    assert "must not run as root" in one_line(result.stderr)
    assert not (root / MAILDIR_SITE).exists()


@pytest.mark.parametrize("site", ["..", "a/b", ".x", "../etc", "x" * 65, "-", ""])
def test_traversal_site_names_exit_67(root: Path, site: str) -> None:
    spool = root / "spool"
    spool.mkdir()
    os.chmod(spool, 0o777)
    config = write_config(spool)
    result = run_fwd(["--config", str(config), "--", site, "", "b@example.org"], MESSAGE)
    assert result.returncode == 67, result.stderr
    assert "invalid site name" in one_line(result.stderr)
    assert sorted(p.name for p in root.iterdir()) == ["mx.toml", "spool"]
    assert sorted(p.name for p in spool.iterdir()) == ["mx.toml"]


def test_nul_site_name_exit_67(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code = fwd.main(fwd_args(root, "a\x00b", "", "b@example.org"))
    assert code == 67
    assert "invalid site name 'a\\x00b'" in capsys.readouterr().err


def test_symlinked_maildir_exit_75(root: Path) -> None:
    target = root / "target"
    target.mkdir()
    os.chmod(target, 0o777)
    (root / MAILDIR_SITE).symlink_to(target)
    result = run_fwd(fwd_args(root, MAILDIR_SITE, "", "b@example.org"), MESSAGE)
    assert result.returncode == 75
    assert "symbolic link" in one_line(result.stderr)
    assert list(target.iterdir()) == []


def test_h11_null_sender_from_empty_argument(root: Path) -> None:
    result = run_fwd(fwd_args(root, MAILDIR_SITE, "", "list-bounces@example.org"),
                     case_bytes("H11.eml"))
    assert result.returncode == 0, result.stderr
    [stored] = maildir_files(root)
    assert stored.read_bytes().startswith(b"X-Mailfeed-Sender: <>\r\n")


def test_help_exit_0() -> None:
    result = run_fwd(["--help"], as_user=False)
    assert result.returncode == 0
    assert result.stdout.startswith(b"usage: mailfeed-fwd")


def test_imports_stay_small(root: Path) -> None:
    env = fwd_env()
    code = (
        "import sys; from mailfeed import fwd; "
        "print(' '.join(m for m in ('email', 'asyncio', 'argparse', 'subprocess', 'logging') "
        "if m in sys.modules))"
    )
    result = subprocess.run([script("python"), "-c", code], env=env, capture_output=True,
                            check=True)
    assert result.stdout.strip() == b""


SIZE_200MB = 200 * 1024 * 1024
RSS_LIMIT_KB = 64 * 1024
RSS_PROBE = Path(__file__).resolve().parent.parent / "rss_probe.py"


@pytest.mark.slow
def test_200mb_message_flat_memory(root: Path) -> None:
    write_config(root, "max_message_size = 0")
    rss_file = root / "maxrss"
    argv = [sys.executable, str(RSS_PROBE), str(rss_file),
            *as_run_user([script("mailfeed-fwd"), *fwd_args(root, MAILDIR_SITE, "", "b@x.org")])]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, env=fwd_env())
    assert proc.stdin is not None
    header = b"Subject: big\n\n"
    proc.stdin.write(header)
    line = b"0123456789" * 7 + b"\n"
    block = line * (1024 * 1024 // len(line))
    written = len(header)
    while written + len(block) <= SIZE_200MB:
        proc.stdin.write(block)
        written += len(block)
    proc.stdin.close()
    assert proc.wait() == 0
    assert int(rss_file.read_text()) < RSS_LIMIT_KB
    [stored] = maildir_files(root)
    block_size = len(b"X-Mailfeed-Sender: <>\nX-Mailfeed-Recipient-Number: 1\n"
                     b"X-Mailfeed-Recipient-Address: b@x.org\n")
    assert stored.stat().st_size == written + block_size


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a file-system condition that the child process brings about."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
@pytest.mark.parametrize("site", [MAILDIR_SITE, MBOX_SITE])
def test_stop_signal_mid_write_exit_75(root: Path, site: str, signum: int) -> None:
    mbox = root / MBOX_SITE
    mbox.write_bytes(b"")
    chown_tree(root)
    argv = as_run_user([script("mailfeed-fwd"), *fwd_args(root, site, "", "b@x.org")])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=fwd_env())
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(b"Subject: x\n\n" + b"body line\n" * 1000)
    proc.stdin.flush()
    if site == MAILDIR_SITE:
        wait_until(lambda: bool(maildir_files(root, "tmp")), "a file in tmp/")
    else:
        wait_until(lambda: mbox.stat().st_size > 0, "the first write to the mbox")
    os.kill(proc.pid, signum)  # setpriv execs fwd, so this is fwd's pid
    proc.wait(timeout=60)
    proc.stdin.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode == 75
    assert f"stopped by {signal.Signals(signum).name}" in one_line(err)
    assert maildir_files(root) == []
    assert maildir_files(root, "tmp") == []
    assert mbox.read_bytes() == b""
    assert not (root / f"{MBOX_SITE}.lock").exists()


@pytest.mark.parametrize("closed", ["<&-", "<&- 2>&-"])
def test_closed_stdin_exit_75(root: Path, closed: str) -> None:
    argv = as_run_user([script("mailfeed-fwd"), *fwd_args(root, MAILDIR_SITE, "", "b@x.org")])
    result = subprocess.run(["sh", "-c", f'exec "$@" {closed}', "sh", *argv],
                            capture_output=True, env=fwd_env(), check=False)
    assert result.returncode == 75
    if "2>&-" not in closed:
        assert "standard input is not open" in one_line(result.stderr)
    assert maildir_files(root) == []


def test_misspelt_top_level_key_exit_78(root: Path) -> None:
    # The MX daemon shares the file, but fwd must not skip a misspelt spool_root.
    (root / "mx.toml").write_text(f'spool_rot = "{root}"\n[sites.{MAILDIR_SITE}]\n')
    result = run_fwd(fwd_args(root, MAILDIR_SITE, "", "b@example.org"), MESSAGE)
    assert result.returncode == 78
    assert "unknown setting spool_rot" in one_line(result.stderr)
    assert maildir_files(root) == []
