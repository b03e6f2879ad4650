"""One contract suite run against the Maildir and mbox spools."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mailfeed.config import Limits, SiteConfig
from mailfeed.envelope import Envelope, encode_block, parse_block
from mailfeed.errors import DataError, TempFailure
from mailfeed.spool import StoredMessage, store_message
from tests.support import case_bytes, case_json, expected_spool_bytes, mbox_form, split_mboxrd

FORMATS = ("maildir", "mbox")
Reader = Callable[[], list[bytes]]


def envelope_of(case: str) -> Envelope:
    data = case_json(f"{case}.envelope.json")
    return Envelope(data["sender"], tuple(data["recipients"]))


def make_site(tmp_path: Path, fmt: str) -> SiteConfig:
    return SiteConfig("site1", fmt, tmp_path / "site1")


def delivery_order(path: Path) -> tuple[int, int, int]:
    """Sort key for Maildir names ``<sec>.M<usec>P<pid>Q<seq>...``."""
    match = re.match(r"(\d+)\.M(\d+)P\d+Q(\d+)", path.name)
    assert match, path.name
    return int(match[1]), int(match[2]), int(match[3])


def read_back(site: SiteConfig) -> list[bytes]:
    """Return each stored block + message as a reader of the spool gets it."""
    if site.format == "maildir":
        files = sorted((site.path / "new").iterdir(), key=delivery_order)
        return [f.read_bytes() for f in files]
    return [message for _from, message in split_mboxrd(site.path.read_bytes())]


def expected(site: SiteConfig, env: Envelope, message: bytes) -> bytes:
    data = expected_spool_bytes(lambda nl: encode_block(env, newline=nl), message)
    return data if site.format == "maildir" else mbox_form(data)


def store(site: SiteConfig, env: Envelope, message: bytes, **limits: int) -> StoredMessage:
    return store_message(site, env, io.BytesIO(message), Limits(**limits))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["H05", "H05b", "H11", "H18", "H19", "H22", "H23"])
def test_store_and_read_back(tmp_path: Path, fmt: str, case: str) -> None:
    site = make_site(tmp_path, fmt)
    env = envelope_of(case)
    message = case_bytes(f"{case}.eml")
    stored = store(site, env, message)
    [data] = read_back(site)
    assert data == expected(site, env, message)
    assert stored.size == len(data)
    assert parse_block(data).envelope == env


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_messages_kept_apart(tmp_path: Path, fmt: str) -> None:
    site = make_site(tmp_path, fmt)
    cases = ["H19", "H05b", "H22", "H19"]
    for case in cases:
        store(site, envelope_of(case), case_bytes(f"{case}.eml"))
    got = read_back(site)
    assert got == [expected(site, envelope_of(c), case_bytes(f"{c}.eml")) for c in cases]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sender", ["", "<>"])
def test_h11_null_sender(tmp_path: Path, fmt: str, sender: str) -> None:
    from mailfeed.fwd import parse_envelope

    site = make_site(tmp_path, fmt)
    env = parse_envelope(sender, ["list-bounces@example.org"])
    store(site, env, case_bytes("H11.eml"))
    [data] = read_back(site)
    assert data.startswith(b"X-Mailfeed-Sender: <>")
    assert parse_block(data).envelope.sender == ""


@pytest.mark.parametrize("fmt", FORMATS)
def test_h09_planted_fields_removed_from_header(tmp_path: Path, fmt: str) -> None:
    site = make_site(tmp_path, fmt)
    env = envelope_of("H09")
    message = case_bytes("H09.eml") + b"X-Mailfeed-Sender: a body line\r\n"
    store(site, env, message)
    [data] = read_back(site)
    block = parse_block(data)
    assert block.envelope == env
    rest = data[block.length :]
    header, _, body = rest.partition(b"\r\n\r\n" if fmt == "maildir" else b"\n\n")
    assert b"x-mailfeed" not in header.lower()
    assert header.startswith(b"Delivered-To: admin@example.org")
    newline = b"\r\n" if fmt == "maildir" else b"\n"
    assert body.endswith(b"X-Mailfeed-Sender: a body line" + newline)


def test_h05b_maildir_bytes(tmp_path: Path) -> None:
    site = make_site(tmp_path, "maildir")
    stored = store(site, envelope_of("H05b"), case_bytes("H05b.eml"))
    path = Path(stored.location)
    assert path.read_bytes() == case_bytes("H05b.spool.eml")
    assert path.parent == site.path / "new"
    spool = case_bytes("H05b.spool.eml")
    wsize = len(spool) + spool.count(b"\n")  # every line end in H05b is a bare LF
    assert path.name.endswith(f",S={len(spool)},W={wsize}")
    assert list((site.path / "tmp").iterdir()) == []
    assert sorted(p.name for p in site.path.iterdir()) == ["cur", "new", "tmp"]
    assert (site.path.stat().st_mode & 0o777) == 0o700


def test_h19_mboxrd_bytes(tmp_path: Path) -> None:
    site = make_site(tmp_path, "mbox")
    store(site, envelope_of("H19"), case_bytes("H19.eml"))
    got = site.path.read_bytes()
    want = case_bytes("H19.spool.mboxrd")
    assert got.split(b"\n", 1)[1] == want.split(b"\n", 1)[1]
    assert got.startswith(b"From alice@example.net ")
    assert not (tmp_path / "site1.lock").exists()


@pytest.mark.parametrize("case", ["H22", "H23"])
def test_message_bytes_unchanged(tmp_path: Path, case: str) -> None:
    site = make_site(tmp_path, "maildir")
    stored = store(site, envelope_of(case), case_bytes(f"{case}.eml"))
    data = Path(stored.location).read_bytes()
    assert data[parse_block(data).length :] == case_bytes(f"{case}.eml")


@pytest.mark.parametrize("fmt", FORMATS)
def test_too_large_leaves_nothing(tmp_path: Path, fmt: str) -> None:
    site = make_site(tmp_path, fmt)
    store(site, envelope_of("H19"), case_bytes("H19.eml"))
    before = read_back(site)
    with pytest.raises(DataError, match="over max_message_size of 100 octets"):
        store(site, envelope_of("H23"), case_bytes("H23.eml"), max_message_size=100)
    assert read_back(site) == before
    if fmt == "maildir":
        assert list((site.path / "tmp").iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_too_many_recipients(tmp_path: Path, fmt: str) -> None:
    site = make_site(tmp_path, fmt)
    env = Envelope("a@example.net", ("b@example.org", "c@example.org", "d@example.org"))
    with pytest.raises(DataError, match="3 recipients, over max_recipients of 2"):
        store(site, env, b"Subject: x\n\n", max_recipients=2)


def test_h08b_1200_recipients_raised_limit(tmp_path: Path) -> None:
    site = make_site(tmp_path, "maildir")
    env = envelope_of("H08b")
    with pytest.raises(DataError):
        store(site, env, case_bytes("H08b.eml"))
    stored = store(site, env, case_bytes("H08b.eml"), max_recipients=1200)
    assert Path(stored.location).read_bytes() == case_bytes("H08b.retr-1.eml")


@pytest.mark.parametrize("fmt", FORMATS)
def test_symlink_rejected(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    site = make_site(tmp_path, fmt)
    site.path.symlink_to(target)
    with pytest.raises(TempFailure, match="symbolic link"):
        store(site, envelope_of("H19"), case_bytes("H19.eml"))
    assert list(target.iterdir()) == []


def test_symlinked_maildir_subfolder_rejected(tmp_path: Path) -> None:
    site = make_site(tmp_path, "maildir")
    target = tmp_path / "elsewhere"
    target.mkdir()
    site.path.mkdir()
    (site.path / "new").symlink_to(target)
    with pytest.raises(TempFailure, match="symbolic link"):
        store(site, envelope_of("H19"), case_bytes("H19.eml"))
    assert list(target.iterdir()) == []


def test_pipe_streams_block_and_message(tmp_path: Path) -> None:
    out = tmp_path / "out"
    site = SiteConfig("p", "pipe", tmp_path, command=("/bin/sh", "-c", f"cat > {out}"))
    stored = store(site, envelope_of("H05b"), case_bytes("H05b.eml"))
    assert out.read_bytes() == case_bytes("H05b.spool.eml")
    assert stored.location == "pipe:/bin/sh"


@pytest.mark.parametrize(
    ("script", "code"),
    [("exit 75", 75), ("exit 71", 75), ("exit 67", 67), ("exit 1", 75), ("kill -9 $$", 75)],
)
def test_pipe_exit_status_mapped(tmp_path: Path, script: str, code: int) -> None:
    from mailfeed.errors import exit_code_for

    site = SiteConfig("p", "pipe", tmp_path, command=("/bin/sh", "-c", f"cat >/dev/null; {script}"))
    with pytest.raises(Exception) as info:
        store(site, envelope_of("H19"), case_bytes("H19.eml"))
    assert exit_code_for(info.value) == code


def test_mbox_stale_lock_recovered(tmp_path: Path) -> None:
    from mailfeed.spool.mbox import recover_stale_lock

    site = make_site(tmp_path, "mbox")
    store(site, envelope_of("H19"), case_bytes("H19.eml"))
    good = site.path.read_bytes()
    with site.path.open("ab") as fp:
        fp.write(b"From partial\nX-Mailfeed-Sender: a@b\n")
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    lock = tmp_path / "site1.lock"
    lock.write_text(f"{dead} {os.uname().nodename} {len(good)}\n")
    assert recover_stale_lock(site.path)
    assert site.path.read_bytes() == good
    assert not lock.exists()


def test_mbox_death_while_locking_leaves_no_empty_lock(tmp_path: Path) -> None:
    """A writer killed before the first octet of its dotlock blocks no one."""
    from mailfeed.spool.mbox import MboxLock

    site = make_site(tmp_path, "mbox")
    child = os.fork()
    if child == 0:
        # Die at the first write, as a SIGKILL would, before the lock holds its pid.
        os.write = lambda _fd, _data: os._exit(9)  # type: ignore[assignment]
        MboxLock(site.path, Limits().lock_timeout).acquire()
        os._exit(0)
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    lock = tmp_path / "site1.lock"
    assert not lock.exists() or lock.read_bytes() != b""
    store_message(site, envelope_of("H19"), io.BytesIO(b"x\n"), Limits(lock_timeout=1.0))
    assert len(read_back(site)) == 1
    assert not lock.exists()


def test_mbox_live_lock_times_out(tmp_path: Path) -> None:
    site = make_site(tmp_path, "mbox")
    lock = tmp_path / "site1.lock"
    lock.write_text(f"{os.getpid()} {os.uname().nodename}\n")
    with pytest.raises(TempFailure, match="timed out"):
        store_message(site, envelope_of("H19"), io.BytesIO(b"x\n"), Limits(lock_timeout=0.2))
    assert lock.exists()
    assert not site.path.exists()


def test_store_from_threads(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sites = [make_site(tmp_path, "maildir"), SiteConfig("m", "mbox", tmp_path / "m")]
    env = envelope_of("H19")
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(store, s, env, case_bytes("H19.eml")) for s in sites * 20]
        results = [f.result() for f in futures]
    assert len({r.location for r in results if "new" in r.location}) == 20
    assert len(read_back(sites[0])) == 20
    assert read_back(sites[1]) == [expected(sites[1], env, case_bytes("H19.eml"))] * 20
