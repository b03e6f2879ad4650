"""Postfix MX with the documented mailfeed pipe transport, into each spool kind.

The Postfix lines come from docs/examples/postfix-mx/ and the site settings
from docs/examples/mailfeed/, so these tests check the deployment guide.
"""

from __future__ import annotations

import mailbox

import pytest

from mailfeed.envelope import FIELD_SENDER
from tests.peers.dovecot import SpoolDovecot
from tests.peers.mailflow import (
    SIZED_NAME,
    as_queued,
    maildir_files,
    split_stored,
    strip_received,
    submit,
    wait_for_maildir,
)
from tests.peers.postfix import MxPostfix
from tests.support import case_bytes

pytestmark = pytest.mark.peer

SENDER = "alice@example.net"


def test_maildir_spool_gets_one_copy_with_block(postfix_mx: MxPostfix) -> None:
    site = postfix_mx.new_site()
    original = case_bytes("H10.eml")
    # erin is a Bcc recipient: she is in the envelope but in no header.
    rcpts = [site.address("bob"), site.address("carol"), site.address("erin")]
    submit(postfix_mx.instance.smtp_port, SENDER, rcpts, original)

    [stored] = wait_for_maildir(site.path, 1, postfix_mx.instance)
    postfix_mx.instance.wait_for_log(r"relay=mailfeed, .*status=sent", count=3)
    data = stored.read_bytes()
    block, message = split_stored(data)
    assert block.envelope.sender == SENDER
    assert sorted(block.envelope.recipients) == sorted(rcpts)
    assert data.startswith(f"{FIELD_SENDER}: {SENDER}\n".encode())
    received, rest = strip_received(message)
    assert b"by mx.mailfeed.test (Postfix)" in received
    assert rest == as_queued(original)

    name = SIZED_NAME.match(stored.name)
    assert name is not None, stored.name
    assert int(name["size"]) == len(data)
    assert int(name["wsize"]) == len(data) + data.count(b"\n")
    # One pipe run for all three recipients: one copy, nothing else stored.
    assert maildir_files(site.path) == [stored]


def test_null_sender_kept_as_angle_brackets(postfix_mx: MxPostfix) -> None:
    site = postfix_mx.new_site()
    original = case_bytes("H11.eml")
    rcpt = site.address("list-bounces")
    submit(postfix_mx.instance.smtp_port, "", [rcpt], original)

    [stored] = wait_for_maildir(site.path, 1, postfix_mx.instance)
    data = stored.read_bytes()
    assert data.startswith(
        b"X-Mailfeed-Sender: <>\nX-Mailfeed-Recipient-Number: 1\n"
        b"X-Mailfeed-Recipient-Address: " + rcpt.encode() + b"\n"
    )
    block, message = split_stored(data)
    assert block.envelope.sender == ""
    assert strip_received(message)[1] == as_queued(original)


def test_two_sites_get_one_copy_each(postfix_mx: MxPostfix) -> None:
    first = postfix_mx.new_site()
    second = postfix_mx.new_site()
    original = case_bytes("H10.eml")
    rcpts = [first.address("bob"), second.address("carol"), first.address("dave")]
    submit(postfix_mx.instance.smtp_port, SENDER, rcpts, original)

    [stored_first] = wait_for_maildir(first.path, 1, postfix_mx.instance)
    [stored_second] = wait_for_maildir(second.path, 1, postfix_mx.instance)
    assert split_stored(stored_first.read_bytes())[0].envelope.recipients == (
        first.address("bob"), first.address("dave"))
    assert split_stored(stored_second.read_bytes())[0].envelope.recipients == (
        second.address("carol"),)


def test_unknown_site_bounces(postfix_mx: MxPostfix) -> None:
    rcpt = f"bob@{postfix_mx.unknown_domain}"
    submit(postfix_mx.instance.smtp_port, SENDER, [rcpt], case_bytes("H10.eml"))

    [line] = postfix_mx.instance.wait_for_log(rf"to=<{rcpt}>, relay=mailfeed, .*status=")
    # mailfeed-fwd exits 67 (EX_NOUSER); pipe(8) turns that into a bounce.
    assert "dsn=5.1.1, status=bounced" in line, line
    assert "unknown site 'nosuchsite'" in line, line


def test_mbox_spool_gets_block_after_from_line(postfix_mx: MxPostfix) -> None:
    site = postfix_mx.new_site("mailfeed/mx-mbox.toml")
    original = case_bytes("H10.eml")
    rcpts = [site.address("bob"), site.address("erin")]
    submit(postfix_mx.instance.smtp_port, SENDER, rcpts, original)
    submit(postfix_mx.instance.smtp_port, "", [site.address("list-bounces")],
           case_bytes("H11.eml"))

    postfix_mx.instance.wait_for_log(rf"to=<{site.address('list-bounces')}>.*status=sent")
    postfix_mx.instance.wait_for_log(rf"to=<{site.address('erin')}>.*status=sent")
    box = mailbox.mbox(site.path, create=False)
    # The two messages may arrive in either order.
    from_lines = sorted(box.get_message(key).get_from().split()[0] for key in box.iterkeys())
    assert from_lines == ["MAILER-DAEMON", SENDER]
    messages = [box.get_bytes(key, from_=False) for key in box.iterkeys()]
    assert len(messages) == 2
    by_sender = {split_stored(m)[0].envelope.sender: m for m in messages}
    block, message = split_stored(by_sender[SENDER])
    assert block.envelope.recipients == tuple(rcpts)
    assert strip_received(message)[1] == as_queued(original)
    null_block, _ = split_stored(by_sender[""])
    assert null_block.envelope.recipients == (site.address("list-bounces"),)


def test_dovecot_lda_pipe_delivers_to_spool(
    postfix_mx: MxPostfix, dovecot_spool: SpoolDovecot
) -> None:
    site = postfix_mx.new_site("mailfeed/mx-dovecot-lda.toml", {
        "/etc/dovecot/dovecot.conf": str(dovecot_spool.instance.config_file),
    })
    # dovecot-lda -d checks the user against the passdb: each pool site has a login.
    assert dovecot_spool.password(site.name)
    original = case_bytes("H10.eml")
    rcpts = [site.address("bob"), site.address("erin")]
    submit(postfix_mx.instance.smtp_port, SENDER, rcpts, original)

    maildir = postfix_mx.spool_root / site.name
    [stored] = wait_for_maildir(maildir, 1, postfix_mx.instance)
    data = stored.read_bytes()
    block, message = split_stored(data)
    assert block.envelope.sender == SENDER
    assert block.envelope.recipients == tuple(rcpts)
    assert strip_received(message)[1] == as_queued(original)
