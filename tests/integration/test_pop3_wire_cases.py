"""RETR bytes of the harvested cases, served from Maildir and mbox spools."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mailfeed.config import SiteConfig
from tests.pop3harness import USER, Client, make_maildir, start_server
from tests.support import case_bytes, case_path

# Cases whose spool is the RETR form (block + message) stored as a Maildir file.
RETR_EML_CASES = ["H05", "H09", "H11", "H22", "H23"]


def crlf_to_lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def serve_retr(site: SiteConfig) -> tuple[bytes, bytes, bytes]:
    """Log in and return the LIST line, the UIDL line and the RETR reply for message 1."""
    running = start_server({USER: site})
    try:
        client = Client(running.port)
        assert client.login().startswith(b"+OK maildrop locked and ready, 1 messages")
        listing = client.command(b"LIST 1")
        uidl = client.command(b"UIDL 1")
        client.send(b"RETR 1\r\n")
        reply = client.multiline()
        assert client.command(b"QUIT").startswith(b"+OK")
        return listing, uidl, reply
    finally:
        running.stop()


def unstuffed_size(wire: bytes) -> int:
    body = wire.split(b"\r\n", 1)[1][: -len(b".\r\n")]
    lines = body.split(b"\r\n")
    return len(b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines))


@pytest.mark.parametrize("case", RETR_EML_CASES)
@pytest.mark.parametrize("line_ends", ["crlf", "lf"])
@pytest.mark.parametrize("sizes", [True, False], ids=["named-sizes", "computed-sizes"])
def test_maildir_retr_matches_wire(tmp_path: Path, case: str, line_ends: str, sizes: bool) -> None:
    stored = case_bytes(f"{case}.retr-1.eml")
    if line_ends == "lf":
        stored = crlf_to_lf(stored)
    make_maildir(tmp_path / "md", [stored], sizes=sizes)
    expected = case_bytes(f"{case}.retr-1.wire")
    listing, _uidl, reply = serve_retr(SiteConfig("site1", "maildir", tmp_path / "md"))
    assert reply == expected
    size = unstuffed_size(expected)
    assert listing == b"+OK 1 %d\r\n" % size


def test_maildir_spool_h05b_no_final_newline(tmp_path: Path) -> None:
    make_maildir(tmp_path / "md", [case_bytes("H05b.spool.eml")])
    expected = case_bytes("H05b.retr-1.wire")
    listing, _uidl, reply = serve_retr(SiteConfig("site1", "maildir", tmp_path / "md"))
    assert reply == expected
    assert listing == b"+OK 1 %d\r\n" % unstuffed_size(expected)


def test_mbox_spool_h19_from_lines(tmp_path: Path) -> None:
    mbox = tmp_path / "site1.mbox"
    shutil.copy(case_path("H19.spool.mboxrd"), mbox)
    expected = case_bytes("H19.retr-1.wire")
    listing, uidl, reply = serve_retr(SiteConfig("site1", "mbox", mbox))
    assert reply == expected
    assert listing == b"+OK 1 %d\r\n" % unstuffed_size(expected)
    assert uidl.startswith(b"+OK 1 ~")
    # QUIT without DELE leaves the mbox byte for byte.
    assert mbox.read_bytes() == case_bytes("H19.spool.mboxrd")
