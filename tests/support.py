"""Shared helpers for the test suite: peers, paths, unprivileged runs.

A test that needs a peer program calls :func:`need`; it is skipped with the
reason when the program is missing, unless MAILFEED_REQUIRE_PEERS is set (as
.ci/run does), in which case it fails, so that CI never skips silently.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CORPUS_DIR = SHARED / "corpus" / "messages"
CASES_DIR = SHARED / "cases"
BIN_DIR = Path(sys.executable).parent
# The unprivileged account that runs mailfeed-fwd and the peers when the
# suite itself runs as root (Postfix's pipe transport never runs as root).
RUN_USER = os.environ.get("MAILFEED_TEST_USER", "mail")


def require_peers() -> bool:
    return bool(os.environ.get("MAILFEED_REQUIRE_PEERS"))


def need(*programs: str) -> dict[str, str]:
    """Return the paths of the programs, or skip (fail in CI) if one is missing."""
    found: dict[str, str] = {}
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/lib/dovecot"])
    for name in programs:
        path = shutil.which(name, path=search)
        if path is None:
            message = f"{name} is not installed"
            if require_peers():
                pytest.fail(message + " (MAILFEED_REQUIRE_PEERS is set)")
            pytest.skip(message)
        found[name] = path
    return found


def need_corpus() -> list[Path]:
    files = sorted(CORPUS_DIR.glob("*.eml"))
    if not files:
        if require_peers():
            pytest.fail(f"corpus not found at {CORPUS_DIR}")
        pytest.skip(f"corpus not found at {CORPUS_DIR}")
    return files


def case_path(name: str) -> Path:
    path = CASES_DIR / name
    if not path.exists():
        if require_peers():
            pytest.fail(f"case file {path} not found")
        pytest.skip(f"case file {path} not found")
    return path


def case_bytes(name: str) -> bytes:
    return case_path(name).read_bytes()


def case_json(name: str) -> Any:
    return json.loads(case_path(name).read_text())


def unescape(payload: str) -> bytes:
    """Decode a dialogue payload written with Python bytes escapes."""
    return codecs.escape_decode(payload.encode("latin-1"))[0]  # type: ignore[no-any-return]


def script(name: str) -> str:
    """Return the path of one of mailfeed's console scripts in this venv."""
    path = BIN_DIR / name
    if not path.exists():
        pytest.fail(f"{path} not found: install mailfeed into this environment (make test)")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_root() -> bool:
    return os.geteuid() == 0


def run_user_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(RUN_USER)
    return entry.pw_uid, entry.pw_gid


def check_run_user_can_execute(program: str) -> None:
    """Fail with the remedy when the test user cannot reach ``program``'s interpreter.

    Otherwise the failure shows up much later, as a Postfix pipe or a client
    that times out with "Permission denied" in some log.
    """
    uid, _gid = run_user_ids()
    path = Path(os.path.realpath(program))
    for folder in path.parents:
        info = folder.stat()
        if info.st_uid != uid and not info.st_mode & 0o001:
            pytest.fail(
                f"user {RUN_USER} cannot execute {program}: {folder} is closed to it; "
                "build the venv from /usr/bin/python3 (make test does so as root)"
            )


def as_run_user(argv: Sequence[str]) -> list[str]:
    """Prefix a command so it runs as the unprivileged test user when we are root."""
    if not is_root():
        return list(argv)
    check_run_user_can_execute(sys.executable)
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [setpriv, f"--reuid={RUN_USER}", f"--regid={RUN_USER}", "--init-groups", *argv]


def shared_tmpdir(prefix: str = "mailfeed-test-") -> Path:
    """Create a temporary folder that the unprivileged test user may write."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    if is_root():
        uid, gid = run_user_ids()
        os.chown(path, uid, gid)
    return path


def chown_tree(path: Path) -> None:
    """Give a tree to the unprivileged test user (a no-op unless we are root)."""
    if not is_root():
        return
    uid, gid = run_user_ids()
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def run(argv: Sequence[str], *, stdin: bytes = b"", env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, env=env, timeout=timeout,
                          check=False)


def iter_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="latin-1") as fp:
        yield from fp


def split_mboxrd(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split an mboxrd file into (From_ line, message) pairs, removing the quoting.

    A message starts at a ``From `` line at the top of the file or after an
    empty line; the empty line before the next ``From_`` line is dropped, and
    one ``>`` is removed from each line matching ``^>+From ``.
    """
    import re

    messages: list[tuple[bytes, bytes]] = []
    starts = [0] if data.startswith(b"From ") else []
    starts += [m.start() + 2 for m in re.finditer(rb"\n\nFrom ", data)]
    for index, start in enumerate(starts):
        end = starts[index + 1] - 1 if index + 1 < len(starts) else len(data) - 1
        newline = data.index(b"\n", start)
        body = data[newline + 1 : end]
        messages.append((data[start:newline], re.sub(rb"(?m)^>(>*From )", rb"\1", body)))
    return messages


def mbox_form(message: bytes) -> bytes:
    """Return ``message`` as an mbox stores it: every line end as LF, ending in LF."""
    message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return message if message.endswith(b"\n") else message + b"\n"


def expected_spool_bytes(block_for: Any, message: bytes) -> bytes:
    """Return the block and message as fwd stores them in a Maildir.

    ``block_for(newline)`` returns the block with that line end.  The leading
    mbox ``From `` line is dropped and the block's lines end like the
    message's first line (LF only when that line ends in a bare LF).  A final
    bare CR is completed to CRLF.
    """
    if message.startswith(b"From "):
        newline = message.find(b"\n")
        message = b"" if newline < 0 else message[newline + 1 :]
    if message.endswith(b"\r"):
        message += b"\n"
    end = message.find(b"\n")
    bare_lf = end >= 0 and message[end - 1 : end] != b"\r"
    return bytes(block_for(b"\n" if bare_lf else b"\r\n")) + message


def open_files_in(folder: Path) -> list[str]:
    """Return the targets of this process's open file descriptors inside ``folder``.

    An unnamed temporary file (O_TMPFILE) shows as ``folder/#INODE (deleted)``.
    """
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(str(folder) + os.sep):
            targets.append(target)
    return targets


# Processes that fixtures started and have not stopped yet, by pid.  A
# teardown that never runs (a crash in a finaliser, a pytest killed by
# SIGTERM or Ctrl-C between fixtures) must still not leave them running.
_LEFT_AT_EXIT: dict[int, Callable[[], None]] = {}


def cleanup_at_exit(key: int, cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` at interpreter exit unless :func:`forget_at_exit` is called first.

    Use it for processes a fixture starts: the cleanup must stop them by the
    pid the fixture started, never by name.
    """
    if not _LEFT_AT_EXIT:
        atexit.register(_cleanup_left_over)
    _LEFT_AT_EXIT[key] = cleanup


def forget_at_exit(key: int) -> None:
    """The fixture cleaned up ``key`` itself; drop its exit-time cleanup."""
    _LEFT_AT_EXIT.pop(key, None)


def _cleanup_left_over() -> None:
    for key, cleanup in list(_LEFT_AT_EXIT.items()):
        _LEFT_AT_EXIT.pop(key, None)
        with contextlib.suppress(Exception):
            cleanup()


def kill_process(process: subprocess.Popen[bytes], *extra_pids: int,
                 timeout: float = 10) -> None:
    """SIGKILL ``process`` (and ``extra_pids`` it started) if still running, and reap it."""
    # While process runs, the pids it started are its children or not yet
    # reaped, so they cannot belong to another process.
    for pid in extra_pids:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


def write_self_signed_cert(cert_path: Path, key_path: Path) -> None:
    """Write a throwaway self-signed certificate for localhost and 127.0.0.1 (a CA too)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
