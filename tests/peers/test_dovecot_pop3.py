"""Dovecot, configured as docs/examples/dovecot/ shows, serving mailfeed's spool.

The POP3 client sees the block and the message as stored, in wire form:
CRLF line ends, dot-stuffing, a final CRLF; nothing else changes.
"""

from __future__ import annotations

import poplib
import ssl
from pathlib import Path

import pytest

from tests.peers.dovecot import SpoolDovecot
from tests.peers.mailflow import SIZED_NAME, submit, wait_for_maildir
from tests.peers.pop3wire import RawPop3, stuff
from tests.peers.postfix import MxPostfix
from tests.support import case_bytes, chown_tree

pytestmark = pytest.mark.peer


def fill_maildir(maildir: Path, name: str, data: bytes) -> Path:
    """Store ``data`` as a Maildir message by hand, named as mailfeed-fwd names them."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    wsize = len(data) + data.count(b"\n") - data.count(b"\r\n")
    path = maildir / "new" / f"{name},S={len(data)},W={wsize}"
    path.write_bytes(data)
    chown_tree(maildir)
    return path


def test_hand_filled_maildir_wire_exact(dovecot_spool: SpoolDovecot) -> None:
    user = "hand1"
    password = dovecot_spool.password(user)
    stored = case_bytes("H05b.spool.eml")
    fill_maildir(dovecot_spool.spool_root / user, "1700000000.M1P1.mx", stored)

    pop = RawPop3(dovecot_spool.instance.pop3_port)
    pop.login(user, password)
    status, body = pop.multiline("RETR 1")
    pop.close()
    expected = case_bytes("H05b.retr-1.wire")
    assert body == expected[expected.index(b"\r\n") + 2:]
    assert body == stuff(stored)
    assert status.startswith(b"+OK")


def test_spool_from_postfix_served_byte_exact(
    postfix_mx: MxPostfix, dovecot_spool: SpoolDovecot
) -> None:
    site = postfix_mx.new_site()
    password = dovecot_spool.password(site.name)
    port = postfix_mx.instance.smtp_port
    submit(port, "alice@example.net", [site.address("bob"), site.address("erin")],
           case_bytes("H05.eml"))
    submit(port, "", [site.address("list-bounces")], case_bytes("H11.eml"))
    submit(port, "alice@example.net", [site.address("bob")], case_bytes("H22.eml"))
    files = wait_for_maildir(site.path, 3, postfix_mx.instance)
    stored = {path.read_bytes() for path in files}
    wire_sizes = {}
    for path in files:
        name = SIZED_NAME.match(path.name)
        assert name is not None, path.name
        wire_sizes[path.read_bytes()] = int(name["wsize"])

    pop = RawPop3(dovecot_spool.instance.pop3_port)
    pop.login(site.name, password)
    _status, listing = pop.multiline("LIST")
    retrieved = {}
    for entry in listing.splitlines()[:-1]:
        number, size = entry.split()
        _status, body = pop.multiline(f"RETR {int(number)}")
        matches = [data for data in stored if stuff(data) == body]
        assert len(matches) == 1, f"RETR {int(number)} matches no stored message: {body[:300]!r}"
        assert int(size) == wire_sizes[matches[0]]
        retrieved[matches[0]] = body
    pop.close()
    assert set(retrieved) == stored


def test_poplib_over_stls_and_pop3s(
    postfix_mx: MxPostfix, dovecot_spool: SpoolDovecot
) -> None:
    site = postfix_mx.new_site()
    password = dovecot_spool.password(site.name)
    submit(postfix_mx.instance.smtp_port, "", [site.address("list-bounces")],
           case_bytes("H11.eml"))
    [path] = wait_for_maildir(site.path, 1, postfix_mx.instance)
    stored = path.read_bytes()
    expected_lines = stored.rstrip(b"\n").split(b"\n")

    context = ssl.create_default_context(cafile=str(dovecot_spool.instance.cert_file))
    plain = poplib.POP3("127.0.0.1", dovecot_spool.instance.pop3_port, timeout=30)
    assert "STLS" in plain.capa()
    plain.stls(context=context)
    plain.user(site.name)
    plain.pass_(password)
    _resp, lines, _octets = plain.retr(1)
    plain.quit()
    assert lines == expected_lines

    implicit = poplib.POP3_SSL("127.0.0.1", dovecot_spool.instance.pop3s_port,
                               context=context, timeout=30)
    implicit.user(site.name)
    implicit.pass_(password)
    _resp, lines, _octets = implicit.retr(1)
    implicit.quit()
    assert lines == expected_lines
