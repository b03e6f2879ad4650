"""Maildrop: wire form and sizes, unique-ids, locks and expunge for Maildir and mbox."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfeed.config import SiteConfig
from mailfeed.maildrop import (
    MaildropError,
    MaildropInUse,
    MessageReader,
    WireConverter,
    open_maildrop,
    wire_size_of,
)
from mailfeed.pop3server import DotStuffer, TopFilter
from tests.pop3harness import make_maildir

MBOX = (
    b"From a@example.net Mon Mar  2 10:00:00 2026\n"
    b"Subject: one\n\n>From here\n>>From there\n\n"
    b"From b@example.net Mon Mar  2 10:00:01 2026\n"
    b"Subject: two\r\n\r\nbody\r\n\n"
    b"From c@example.net Mon Mar  2 10:00:02 2026\n"
    b"Subject: three\n\nlast\n\n"
)


def convert(data: bytes, pieces: list[int], unquote: bool = False) -> bytes:
    converter = WireConverter(unquote=unquote)
    out = b""
    start = 0
    for cut in sorted(pieces):
        out += converter.feed(data[start:cut])
        start = cut
    return out + converter.feed(data[start:]) + converter.finish()


def reference_wire(data: bytes, unquote: bool = False) -> bytes:
    if unquote:
        lines = data.split(b"\n")
        fixed = []
        for line in lines:
            stripped = line.lstrip(b">")
            if line.startswith(b">") and stripped.startswith(b"From "):
                line = line[1:]
            fixed.append(line)
        data = b"\n".join(fixed)
    out = bytearray()
    for i, byte in enumerate(data):
        if byte == 0x0A and (i == 0 or data[i - 1] != 0x0D):
            out += b"\r\n"
        else:
            out.append(byte)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return bytes(out)


alphabet = st.sampled_from([b"\r", b"\n", b".", b">", b"From ", b"x", b"\r\n", b"F", b"rom"])


@given(st.lists(alphabet, max_size=40).map(b"".join), st.lists(st.integers(0, 200), max_size=6),
       st.booleans())
def test_wire_converter_chunking_is_invisible(data: bytes, cuts: list[int], unquote: bool) -> None:
    cuts = [c for c in cuts if c <= len(data)]
    wire = convert(data, cuts, unquote)
    assert wire == reference_wire(data, unquote)
    assert len(wire) == wire_size_of(data, unquote=unquote)


@given(st.lists(alphabet, max_size=40).map(b"".join), st.lists(st.integers(0, 200), max_size=6))
def test_dot_stuffing_round_trips(data: bytes, cuts: list[int]) -> None:
    wire = reference_wire(data)
    stuffer = DotStuffer()
    pieces = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(wire)):
        # WireConverter never splits CRLF; keep the test chunks the same.
        if 0 < cut < len(wire) and wire[cut - 1 : cut + 1] == b"\r\n":
            continue
        pieces.append(stuffer.feed(wire[start:cut]))
        start = cut
    pieces.append(stuffer.feed(wire[start:]))
    stuffed = b"".join(pieces)
    lines = stuffed.split(b"\r\n")
    assert all(line != b"." for line in lines[:-1])
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    assert unstuffed == wire


@given(st.lists(alphabet, max_size=40).map(b"".join), st.integers(1, 16),
       st.lists(st.integers(0, 9), max_size=30), st.booleans(), st.booleans())
def test_message_reader_reads_are_invisible(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk_octets: int, caps: list[int],
    unquote: bool, bounded: bool,
) -> None:
    path = tmp_path_factory.mktemp("reader") / "message"
    # bounded: the message lies between other octets, as in an mbox.
    path.write_bytes(b"before" + data + b"after" if bounded else data)
    end = 6 + len(data) if bounded else None
    reader = MessageReader(os.open(path, os.O_RDONLY), 6 if bounded else 0, end,
                           unquote=unquote, chunk_octets=chunk_octets)
    with reader:
        out = b""
        calls = 0
        while not reader.done:
            # 0 reads a whole chunk; a positive cap bounds each read.
            chunk = reader.read_chunk(caps[calls] if calls < len(caps) else 0)
            calls += 1
            assert chunk or reader.done
            out += chunk
        assert reader.read_chunk() == b""
        assert reader.octets_read == len(data)
    assert out == reference_wire(data, unquote)


def test_message_reader_reports_the_end_with_the_last_chunk(tmp_path: Path) -> None:
    path = tmp_path / "message"
    path.write_bytes(b"Subject: x\n\nbody")
    with MessageReader(os.open(path, os.O_RDONLY), 0, None, unquote=False,
                       chunk_octets=1024) as reader:
        assert reader.read_chunk() == b"Subject: x\r\n\r\nbody\r\n"
        assert reader.done


def test_top_filter_across_chunks() -> None:
    wire = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"
    for cut in range(1, len(wire)):
        if wire[cut - 1 : cut + 1] == b"\r\n":
            continue
        top = TopFilter(2)
        first, done = top.feed(wire[:cut])
        rest = b"" if done else top.feed(wire[cut:])[0]
        assert first + rest == b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n", cut


def test_maildir_uidl_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "md"
    make_maildir(path, [b"a\n", b"b\r\n"])
    (path / "cur" / "1700000099.M9P9.mx,S=2,W=3:2,S").write_bytes(b"c\n")
    long_unique = "u" * 71
    (path / "new" / long_unique).write_bytes(b"no final newline")
    (path / "new" / "~tilde").write_bytes(b"")
    drop = open_maildrop(SiteConfig("s", "maildir", path))
    drop.lock()
    try:
        uidls = [m.uidl for m in drop.messages]
        assert uidls[:3] == ["1700000000.M0P1.mx", "1700000001.M1P1.mx", "1700000099.M9P9.mx"]
        assert [m.size for m in drop.messages] == [3, 3, 3, 18, 0]
        assert all(len(u) <= 70 and u.isascii() and " " not in u for u in uidls)
        assert uidls[3].startswith("~")
        assert uidls[4].startswith("~")
        with drop.open(4) as reader:
            assert b"".join(reader) == b"no final newline\r\n"
    finally:
        drop.unlock()
    again = open_maildrop(SiteConfig("s", "maildir", path))
    again.lock()
    assert [m.uidl for m in again.messages] == uidls
    again.unlock()


def test_maildir_lock_excludes_second_session(tmp_path: Path) -> None:
    path = tmp_path / "md"
    make_maildir(path, [b"a\n"])
    site = SiteConfig("s", "maildir", path)
    first = open_maildrop(site)
    first.lock()
    with pytest.raises(MaildropInUse):
        open_maildrop(site).lock()
    # Another process sees the fcntl lock too.
    probe = (
        "import sys; from mailfeed.maildrop import open_maildrop, MaildropInUse\n"
        "from mailfeed.config import SiteConfig\n"
        "from pathlib import Path\n"
        "try:\n open_maildrop(SiteConfig('s','maildir',Path(sys.argv[1]))).lock()\n"
        "except MaildropInUse:\n sys.exit(3)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", probe, str(path)], env=env, check=False)
    assert result.returncode == 3
    first.unlock()
    second = open_maildrop(site)
    second.lock()
    second.unlock()


def test_maildir_expunge_finds_moved_file(tmp_path: Path) -> None:
    path = tmp_path / "md"
    make_maildir(path, [b"a\n", b"b\n"])
    drop = open_maildrop(SiteConfig("s", "maildir", path))
    drop.lock()
    # Another program moved message 1 to cur/ and flagged it during the session.
    name = sorted(os.listdir(path / "new"))[0]
    os.rename(path / "new" / name, path / "cur" / (name + ":2,S"))
    drop.expunge([1])
    drop.unlock()
    assert os.listdir(path / "cur") == []
    assert len(os.listdir(path / "new")) == 1


def test_mbox_parse_unquote_and_uidl(tmp_path: Path) -> None:
    mbox = tmp_path / "mbox"
    mbox.write_bytes(MBOX)
    drop = open_maildrop(SiteConfig("s", "mbox", mbox))
    drop.lock()
    try:
        bodies = []
        for message in drop.messages:
            with drop.open(message.msgnum) as reader:
                wire = b"".join(reader)
            assert len(wire) == message.size
            bodies.append(wire)
        assert bodies == [
            b"Subject: one\r\n\r\nFrom here\r\n>From there\r\n",
            b"Subject: two\r\n\r\nbody\r\n",
            b"Subject: three\r\n\r\nlast\r\n",
        ]
        uidls = [m.uidl for m in drop.messages]
        assert len(set(uidls)) == 3
    finally:
        drop.unlock()
    assert not (tmp_path / "mbox.lock").exists(), "the dotlock is released after the scan"


def test_mbox_duplicate_messages_get_distinct_uidls(tmp_path: Path) -> None:
    one = b"From a@example.net Mon Mar  2 10:00:00 2026\nSubject: same\n\nx\n\n"
    mbox = tmp_path / "mbox"
    mbox.write_bytes(one * 2)
    drop = open_maildrop(SiteConfig("s", "mbox", mbox))
    drop.lock()
    first, second = (m.uidl for m in drop.messages)
    drop.unlock()
    assert second == first + "-2"


def test_mbox_expunge_keeps_appended_mail(tmp_path: Path) -> None:
    mbox = tmp_path / "mbox"
    mbox.write_bytes(MBOX)
    mbox.chmod(0o640)
    drop = open_maildrop(SiteConfig("s", "mbox", mbox))
    drop.lock()
    kept_uidl = drop.messages[1].uidl
    appended = b"From d@example.net Mon Mar  2 10:00:03 2026\nSubject: four\n\nnew\n\n"
    with mbox.open("ab") as fp:
        fp.write(appended)
    drop.expunge([1, 3])
    drop.unlock()
    segments = MBOX.split(b"\n\nFrom ")
    assert mbox.read_bytes() == b"From " + segments[1] + b"\n\n" + appended
    assert oct(mbox.stat().st_mode & 0o777) == oct(0o640)
    assert not list(tmp_path.glob(".mbox.mailfeed-expunge-*"))
    drop = open_maildrop(SiteConfig("s", "mbox", mbox))
    drop.lock()
    assert drop.messages[0].uidl == kept_uidl
    assert len(drop.messages) == 2
    drop.unlock()


def test_mbox_expunge_refuses_replaced_file(tmp_path: Path) -> None:
    mbox = tmp_path / "mbox"
    mbox.write_bytes(MBOX)
    drop = open_maildrop(SiteConfig("s", "mbox", mbox))
    drop.lock()
    replacement = tmp_path / "other"
    replacement.write_bytes(MBOX[:50])
    os.replace(replacement, mbox)
    with pytest.raises(MaildropError, match="nothing removed"):
        drop.expunge([1])
    drop.unlock()
    assert mbox.read_bytes() == MBOX[:50]


def test_mbox_dotlock_timeout(tmp_path: Path) -> None:
    mbox = tmp_path / "mbox"
    mbox.write_bytes(MBOX)
    (tmp_path / "mbox.lock").write_text("held")
    drop = open_maildrop(SiteConfig("s", "mbox", mbox), lock_timeout=0.2)
    with pytest.raises(MaildropError, match=r"mbox\.lock"):
        drop.lock()
    assert not drop.locked


def test_missing_spools_are_empty(tmp_path: Path) -> None:
    for fmt in ("maildir", "mbox"):
        drop = open_maildrop(SiteConfig("s", fmt, tmp_path / f"none-{fmt}"))
        drop.lock()
        assert drop.messages == []
        drop.unlock()


def test_pipe_format_rejected(tmp_path: Path) -> None:
    with pytest.raises(MaildropError, match="pipe"):
        open_maildrop(SiteConfig("s", "pipe", tmp_path, command=("true",)))
