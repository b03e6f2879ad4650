"""The mbox writer and the POP3 reader share one lock, so no partial message is served.

A mailfeed-fwd killed in the middle of an append leaves its dotlock with the
old length of the mbox in it.  The POP3 side (the maildrop directly, and the
real server through poplib) must cut the partial append off before it lists
anything, keep the earlier messages intact, and leave the mbox usable for
the next append.  Writers in several processes and a reader that expunges
between them must neither lose nor damage a message.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfeed.config import SiteConfig
from mailfeed.maildrop import Maildrop, open_maildrop
from tests.integration.fwd_helpers import MBOX_SITE, fwd_env, run_fwd, write_config
from tests.pop3harness import PASSWORD, USER, start_server
from tests.support import ROOT, is_root, run_user_ids, shared_tmpdir, split_mboxrd

SENDER = "alice@example.net"
RECIPIENT = "bob@example.org"
ID_RE = re.compile(rb"^Message-ID: <m(\d+)@mailfeed\.test>\r?$", re.MULTILINE)
WRITERS = 10
MESSAGES_PER_WRITER = 10


def message(number: int) -> bytes:
    """Return message ``number``: a unique Message-ID line and a body line that mboxrd quotes."""
    return (
        f"Message-ID: <m{number}@mailfeed.test>\r\n"
        f"Subject: message {number}\r\n"
        "\r\n"
        f"body of message {number}\r\n"
        "From the start of a body line, quoted in the mbox\r\n"
    ).encode()


def message_ids(data: bytes) -> list[int]:
    return [int(found) for found in ID_RE.findall(data)]


def check_wire(wire: bytes) -> int:
    """Check one RETR form (block and message, CRLF) and return its message number."""
    [number] = message_ids(wire)
    assert wire.startswith(f"X-Mailfeed-Sender: {SENDER}\r\n".encode())
    assert wire.endswith(message(number))
    return number


@pytest.fixture
def root() -> Iterator[Path]:
    path = shared_tmpdir()
    write_config(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mbox_site(root: Path) -> SiteConfig:
    return SiteConfig(USER, "mbox", root / MBOX_SITE)


def fwd(root: Path, number: int, fault: str | None = None) -> int:
    """Run mailfeed-fwd (as the unprivileged user) for message ``number``; return its status."""
    env = fwd_env(MAILFEED_FAULT=fault) if fault else fwd_env()
    argv = ["--config", str(root / "mx.toml"), MBOX_SITE, SENDER, RECIPIENT]
    return run_fwd(argv, message(number), env=env).returncode


def kill_writer_mid_append(root: Path) -> bytes:
    """Store messages 1 and 2, kill the writer of message 3 mid-append; return the good mbox."""
    mbox = root / MBOX_SITE
    assert fwd(root, 1) == 0
    assert fwd(root, 2) == 0
    good = mbox.read_bytes()
    assert fwd(root, 3, "mbox.mid_write:kill") == -signal.SIGKILL
    torn = mbox.read_bytes()
    assert torn.startswith(good)
    assert torn[len(good):].startswith(b"From "), "the From_ line of message 3 is on disk"
    assert (root / f"{MBOX_SITE}.lock").read_text().split()[2] == str(len(good))
    return good


def read_wire(drop: Maildrop, msgnum: int) -> bytes:
    reader = drop.open(msgnum)
    try:
        return b"".join(reader)
    finally:
        reader.close()


def test_maildrop_cuts_partial_append(root: Path) -> None:
    good = kill_writer_mid_append(root)
    mbox = root / MBOX_SITE
    drop = open_maildrop(mbox_site(root))
    drop.lock()
    try:
        assert not (root / f"{MBOX_SITE}.lock").exists()
        assert mbox.read_bytes() == good
        assert len(drop.messages) == 2
        wires = [read_wire(drop, listed.msgnum) for listed in drop.messages]
        assert [check_wire(wire) for wire in wires] == [1, 2]
        assert [listed.size for listed in drop.messages] == [len(wire) for wire in wires]
    finally:
        drop.unlock()
    assert mbox.read_bytes() == good

    assert fwd(root, 4) == 0
    assert message_ids(mbox.read_bytes().replace(b"\n", b"\r\n")) == [1, 2, 4]


def test_pop3_server_never_serves_partial(root: Path) -> None:
    kill_writer_mid_append(root)
    mbox = root / MBOX_SITE
    running = start_server({USER: mbox_site(root)})
    try:
        pop = poplib.POP3("127.0.0.1", running.port, timeout=20)
        pop.user(USER)
        pop.pass_(PASSWORD)
        count, _octets = pop.stat()
        assert count == 2
        listed = [line.split() for line in pop.list()[1]]
        served = []
        for number, size in listed:
            lines = pop.retr(int(number))[1]
            wire = b"\r\n".join(lines) + b"\r\n"
            assert len(wire) == int(size)
            served.append(check_wire(wire))
        assert served == [1, 2]
        pop.dele(1)
        # Appended during the session: the expunge must keep it.
        assert fwd(root, 4) == 0
        pop.quit()
    finally:
        running.stop()

    assert not (root / f"{MBOX_SITE}.lock").exists()
    stored = [stored for _from, stored in split_mboxrd(mbox.read_bytes())]
    assert [message_ids(data.replace(b"\n", b"\r\n")) for data in stored] == [[2], [4]]
    if is_root():
        assert mbox.stat().st_uid == run_user_ids()[0], "the rewritten mbox keeps its owner"
    assert fwd(root, 5) == 0
    assert message_ids(mbox.read_bytes().replace(b"\n", b"\r\n")) == [2, 4, 5]


WRITER_SCRIPT = """
import io, sys
from pathlib import Path
from mailfeed.config import Limits, SiteConfig
from mailfeed.envelope import Envelope
from mailfeed.spool import store_message
sys.path.insert(0, sys.argv[1])
from tests.integration.test_mbox_shared_lock import RECIPIENT, SENDER, message
site = SiteConfig("site1", "mbox", Path(sys.argv[2]))
for number in map(int, sys.argv[3:]):
    store_message(site, Envelope(SENDER, (RECIPIENT,)), io.BytesIO(message(number)),
                  Limits(lock_timeout=120.0))
"""


def test_writers_and_expunging_reader(tmp_path: Path) -> None:
    site = SiteConfig(USER, "mbox", tmp_path / "site1")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    writers = []
    for writer in range(WRITERS):
        first = writer * MESSAGES_PER_WRITER + 1
        numbers = [str(n) for n in range(first, first + MESSAGES_PER_WRITER)]
        argv = [sys.executable, "-c", WRITER_SCRIPT, str(ROOT), str(site.path), *numbers]
        writers.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE))

    deleted: list[int] = []
    sessions = 0
    while any(writer.poll() is None for writer in writers):
        drop = open_maildrop(site, lock_timeout=120.0)
        drop.lock()
        try:
            numbers = [check_wire(read_wire(drop, m.msgnum)) for m in drop.messages]
            # Delete every other message, so the rewrite keeps ranges on both sides.
            doomed = [m.msgnum for m in drop.messages if m.msgnum % 2 == 1]
            drop.expunge(doomed)
            deleted.extend(numbers[msgnum - 1] for msgnum in doomed)
        finally:
            drop.unlock()
        sessions += 1

    for writer in writers:
        _out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err.decode(errors="replace")

    drop = open_maildrop(site)
    drop.lock()
    try:
        remaining = [check_wire(read_wire(drop, m.msgnum)) for m in drop.messages]
    finally:
        drop.unlock()
    everything = sorted(deleted + remaining)
    assert everything == list(range(1, WRITERS * MESSAGES_PER_WRITER + 1))
    assert sessions > 1, "the reader expunged while writers were running"
    assert deleted, "some messages were removed by an expunge"
