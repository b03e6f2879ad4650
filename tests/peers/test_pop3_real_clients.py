"""Real POP3 clients drain mailfeed's POP3 server: poplib, fetchmail, mpop, getmail6.

Each client runs over plaintext, STLS and implicit TLS where it supports them
(getmail6 has no STLS).  The peers run as the unprivileged test user.  They
store messages with LF line ends and add trace fields, so the comparison
turns CRLF into LF and removes exactly the fields each client adds.  mpop
adds one Received field on top and getmail6 adds Return-Path, Delivered-To
and Received on top.  fetchmail adds its own Received field further down.  getmail6 also refolds
header fields, also inside MIME parts, so its output is compared unfolded.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailfeed.config import SiteConfig
from tests.pop3harness import (
    PASSWORD,
    USER,
    RunningServer,
    TlsFiles,
    make_maildir,
    make_tls_files,
    start_server,
)
from tests.support import as_run_user, case_bytes, chown_tree, need, shared_tmpdir

pytestmark = pytest.mark.peer

CASES = ["H05", "H09", "H11", "H22", "H23"]
MODES = ["plain", "stls", "tls"]
CLIENT_TIMEOUT = 180  # seconds; generous because a loaded 2-core CI machine runs two workers


def spool_messages() -> list[bytes]:
    """Messages as stored: LF line ends, one without a final newline."""
    stored = [case_bytes(f"{case}.retr-1.eml").replace(b"\r\n", b"\n") for case in CASES]
    return [*stored, case_bytes("H05b.spool.eml")]


def expected_lf(stored: bytes) -> bytes:
    """What a client that stores LF line ends must write: the message plus a final newline."""
    return stored if stored.endswith(b"\n") else stored + b"\n"


FIELD_RE = re.compile(rb"([^:\s]+):.*\n(?:[ \t].*\n)*")


def strip_top_fields(message: bytes, names: set[bytes]) -> bytes:
    while True:
        match = FIELD_RE.match(message)
        if match is None or match.group(1).lower() not in names:
            return message
        message = message[match.end() :]


def strip_field_containing(message: bytes, marker: bytes) -> bytes:
    header_end = message.find(b"\n\n")
    for match in FIELD_RE.finditer(message, 0, header_end + 1):
        if marker in match.group(0):
            return message[: match.start()] + message[match.end() :]
    return message


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = shared_tmpdir("mailfeed-pop3peer-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tls_files(workdir: Path) -> TlsFiles:
    folder = workdir / "tls"
    folder.mkdir()
    files = make_tls_files(folder)
    chown_tree(folder)
    return files


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    make_maildir(path, spool_messages())
    return path


@pytest.fixture
def server(spool: Path, tls_files: TlsFiles) -> Iterator[RunningServer]:
    running = start_server({USER: SiteConfig("site1", "maildir", spool)}, tls=tls_files,
                           implicit_tls=True)
    yield running
    running.stop()


def port_for(server: RunningServer, mode: str) -> int:
    return server.tls_port if mode == "tls" else server.port


def delivered(maildir: Path) -> list[bytes]:
    files = sorted((maildir / "new").iterdir()) + sorted((maildir / "cur").iterdir())
    return [path.read_bytes() for path in files]


def unfold(message: bytes) -> bytes:
    """Join folded lines (also in MIME part headers) into one, with one space."""
    return re.sub(rb"[ \t]*\n[ \t]+", b" ", message)


def assert_drained(
    spool: Path, got: list[bytes], normalize: Callable[[bytes], bytes] = lambda m: m
) -> None:
    want = sorted(normalize(expected_lf(m)) for m in spool_messages())
    assert sorted(normalize(m) for m in got) == want
    assert list((spool / "new").iterdir()) == []
    assert list((spool / "cur").iterdir()) == []


def run_peer(argv: list[str], home: Path) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C"}
    result = subprocess.run(as_run_user(argv), capture_output=True, env=env,
                            timeout=CLIENT_TIMEOUT, check=False)
    return result


def make_maildir_for_peer(path: Path) -> Path:
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True)
    chown_tree(path)
    return path


@pytest.mark.parametrize("mode", MODES)
def test_poplib_drains_exactly(server: RunningServer, spool: Path, tls_files: TlsFiles,
                               mode: str) -> None:
    context = tls_files.client_context()
    client: poplib.POP3
    if mode == "tls":
        client = poplib.POP3_SSL("127.0.0.1", server.tls_port, context=context, timeout=20)
    else:
        client = poplib.POP3("127.0.0.1", server.port, timeout=20)
        if mode == "stls":
            client.stls(context)
    client.user(USER)
    client.pass_(PASSWORD)
    count, _octets = client.stat()
    listing = {int(n): int(s) for n, s in (line.split() for line in client.list()[1])}
    got = []
    for number in range(1, count + 1):
        _status, lines, _size = client.retr(number)
        message = b"\r\n".join(lines) + b"\r\n"
        assert len(message) == listing[number]
        got.append(message.replace(b"\r\n", b"\n"))
        client.dele(number)
    client.quit()
    assert_drained(spool, got)


@pytest.mark.parametrize("mode", MODES)
def test_fetchmail_drains(server: RunningServer, spool: Path, workdir: Path,
                          tls_files: TlsFiles, mode: str) -> None:
    tools = need("fetchmail", "safecat")
    out = make_maildir_for_peer(workdir / "out")
    security = {
        "plain": 'sslproto ""',
        "stls": f'sslproto "tls1.2+" sslcertck sslcertfile "{tls_files.cert}" '
                'sslcommonname "localhost"',
        "tls": f'ssl sslcertck sslcertfile "{tls_files.cert}" sslcommonname "localhost"',
    }[mode]
    rc = workdir / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f"poll 127.0.0.1 with proto POP3 port {port_for(server, mode)} uidl no envelope\n"
        f'  user "{USER}" there with password "{PASSWORD}" is "mail" here\n'
        f"  {security}\n"
        f'  fetchall nokeep no rewrite mda "{tools["safecat"]} {out}/tmp {out}/new"\n'
    )
    rc.chmod(0o600)
    chown_tree(workdir)
    result = run_peer([tools["fetchmail"], "--nosyslog", "--nodetach", "-f", str(rc),
                       "--pidfile", str(workdir / "fetchmail.pid"), "-v"], workdir)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    got = [strip_field_containing(m, b"(fetchmail-") for m in delivered(out)]
    assert_drained(spool, got)


@pytest.mark.parametrize("mode", MODES)
def test_mpop_drains(server: RunningServer, spool: Path, workdir: Path, tls_files: TlsFiles,
                     mode: str) -> None:
    mpop = need("mpop")["mpop"]
    out = make_maildir_for_peer(workdir / "out")
    tls = {
        "plain": "tls off\n",
        "stls": f"tls on\ntls_starttls on\ntls_trust_file {tls_files.cert}\n",
        "tls": f"tls on\ntls_starttls off\ntls_trust_file {tls_files.cert}\n",
    }[mode]
    rc = workdir / "mpoprc"
    rc.write_text(
        "account site1\n"
        f"host 127.0.0.1\nport {port_for(server, mode)}\nuser {USER}\n"
        f"password {PASSWORD}\nauth user\n{tls}"
        f"delivery maildir {out}\nkeep off\nuidls_file {workdir}/uidls\n"
    )
    rc.chmod(0o600)
    chown_tree(workdir)
    result = run_peer([mpop, "-C", str(rc), "site1"], workdir)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    got = [strip_top_fields(m, {b"received"}) for m in delivered(out)]
    assert_drained(spool, got)


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_getmail6_drains(server: RunningServer, spool: Path, workdir: Path,
                         tls_files: TlsFiles, mode: str) -> None:
    getmail = need("getmail")["getmail"]
    out = make_maildir_for_peer(workdir / "out")
    retriever = (
        "type = SimplePOP3Retriever\n"
        if mode == "plain"
        else f"type = SimplePOP3SSLRetriever\nca_certs = {tls_files.cert}\n"
    )
    rc = workdir / "getmailrc"
    rc.write_text(
        f"[retriever]\n{retriever}server = 127.0.0.1\nport = {port_for(server, mode)}\n"
        f"username = {USER}\npassword = {PASSWORD}\n\n"
        f"[destination]\ntype = Maildir\npath = {out}/\n\n"
        "[options]\ndelete = true\nread_all = true\nverbose = 0\n"
    )
    chown_tree(workdir)
    result = run_peer([getmail, "--getmaildir", str(workdir), "--rcfile", str(rc)], workdir)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    added = {b"return-path", b"delivered-to", b"received"}
    got = [strip_top_fields(m, added) for m in delivered(out)]
    # getmail6 6.18 parses and re-serialises each message with Python's email
    # package, which refolds some header fields, such as a long quoted From.
    assert_drained(spool, got, unfold)
