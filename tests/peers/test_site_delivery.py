"""Site side: mailfeed-rmail re-injects into the site's Postfix and Dovecot.

Each message goes in as the POP3 client hands it over: the block, then the
original message.  It must end in the recipient's Maildir as the original
bytes (line ends aside) under the trace fields that the final delivery agent
adds.  The first of them is ``Return-Path:`` with the envelope sender, and
the null sender stays ``<>``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mailfeed.envelope import Envelope, encode_block
from tests.peers.dovecot import SiteDovecot
from tests.peers.mailflow import as_queued
from tests.peers.postfix import DELIVERY_TIMEOUT, SitePostfix, wait_until
from tests.support import case_bytes, script

pytestmark = pytest.mark.peer

# Header fields that the site MTA or LDA may add above the original message.
TRACE_FIELDS = (b"Return-Path:", b"X-Original-To:", b"Delivered-To:", b"Received:")
# (case file, envelope sender): a bounce, raw 8-bit, bytes a re-serialiser changes.
MESSAGES = [("H11.eml", ""), ("H22.eml", "alice@example.net"), ("H23.eml", "alice@example.net")]


def rmail(target: str, spooled: bytes, tmp_path: Path) -> None:
    source = tmp_path / "spooled.eml"
    source.write_bytes(spooled)
    result = subprocess.run([script("mailfeed-rmail"), "--target", target, str(source)],
                            capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def split_trace(delivered: bytes, original: bytes) -> list[bytes]:
    """Check ``delivered`` is trace fields plus ``original`` (LF ends); return the fields."""
    body = as_queued(original)
    assert delivered.endswith(body), delivered[:600]
    prefix = delivered[: len(delivered) - len(body)]
    fields: list[bytes] = []
    for line in prefix.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def wait_one(probe: Callable[[], list[Path]], what: str, log: Callable[[], str]) -> Path:
    found = wait_until(lambda: probe() or None, timeout=DELIVERY_TIMEOUT, what=what,
                       diagnostics=log)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("route", ["smtp", "sendmail"])
@pytest.mark.parametrize(("case", "sender"), MESSAGES)
def test_postfix_site_return_path_and_bytes(
    postfix_site: SitePostfix, tmp_path: Path, route: str, case: str, sender: str
) -> None:
    rcpt = f"list-bounces@{postfix_site.new_domain()}"
    original = case_bytes(case)
    spooled = encode_block(Envelope(sender, (rcpt,)), newline=b"\r\n") + original
    target = (f"smtp://127.0.0.1:{postfix_site.reinject_port}" if route == "smtp"
              else f"sendmail:{postfix_site.sendmail}")
    rmail(target, spooled, tmp_path)

    path = wait_one(lambda: postfix_site.messages(rcpt), f"delivery to {rcpt}",
                    postfix_site.instance.log_tail)
    fields = split_trace(path.read_bytes(), original)
    assert fields[0] == f"Return-Path: <{sender}>\n".encode()
    assert f"Delivered-To: {rcpt}\n".encode() in fields
    assert all(f.startswith(TRACE_FIELDS) for f in fields), fields


@pytest.mark.parametrize("route", ["socket", "tcp"])
@pytest.mark.parametrize(("case", "sender"), MESSAGES)
def test_dovecot_lmtp_return_path_and_bytes(
    dovecot_site: SiteDovecot, tmp_path: Path, route: str, case: str, sender: str
) -> None:
    rcpt = f"list-bounces@{route}-{case.lower().replace('.', '-')}.site.test"
    original = case_bytes(case)
    spooled = encode_block(Envelope(sender, (rcpt,)), newline=b"\r\n") + original
    instance = dovecot_site.instance
    target = (f"lmtp:{instance.lmtp_socket}" if route == "socket"
              else f"lmtp://127.0.0.1:{instance.lmtp_port}")
    rmail(target, spooled, tmp_path)

    path = wait_one(lambda: dovecot_site.messages(rcpt), f"delivery to {rcpt}",
                    instance.log_tail)
    fields = split_trace(path.read_bytes(), original)
    assert fields[0] == f"Return-Path: <{sender}>\n".encode()
    assert all(f.startswith(TRACE_FIELDS) for f in fields), fields
