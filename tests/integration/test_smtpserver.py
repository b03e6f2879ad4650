"""The SMTP receiver on 127.0.0.1 with real clients: routing, limits, storage."""

from __future__ import annotations

import itertools
import logging
import re
import smtplib
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailfeed import faults
from mailfeed.envelope import parse_block
from mailfeed.mx import make_tls_context
from mailfeed.mxconfig import load_mx_config
from tests.integration.smtp_support import (
    TWO_SITES,
    LoopServer,
    RawClient,
    start,
    stored_files,
    tmp_files,
    write_config,
)
from tests.support import case_bytes, need, open_files_in, run

FIXED_DATE = datetime(2024, 1, 1, tzinfo=UTC)
MESSAGE = (
    b"From: alice@example.net\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\n"
    b"first line\r\n.leading dot\r\nlast line\r\n"
)


def injected(**extra: object) -> dict[str, object]:
    counter = itertools.count(1)
    options: dict[str, object] = {
        "clock": lambda: FIXED_DATE,
        "queue_ids": lambda: f"Q{next(counter)}",
        "session_ids": lambda: "S1",
    }
    options.update(extra)
    return options


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LoopServer]:
    running = start(write_config(tmp_path), **injected())
    yield running
    running.stop()


def spool(tmp_path: Path, site: str) -> Path:
    return tmp_path / "spool" / site


def test_delivery_stores_block_received_message(server: LoopServer, tmp_path: Path) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.example.net") as client:
        refused = client.sendmail("alice@example.net", ["bob@example.org"], MESSAGE)
    assert refused == {}
    files = stored_files(spool(tmp_path, "site1"))
    assert len(files) == 1
    expected = (
        b"X-Mailfeed-Sender: alice@example.net\r\n"
        b"X-Mailfeed-Recipient-Number: 1\r\n"
        b"X-Mailfeed-Recipient-Address: bob@example.org\r\n"
        b"Received: from client.example.net ([127.0.0.1])\r\n"
        b"\tby mx.example.net (mailfeed) with ESMTP id Q1\r\n"
        b"\t(session S1)\r\n"
        b"\tfor <bob@example.org>; Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    ) + MESSAGE
    assert files[0].read_bytes() == expected
    assert stored_files(spool(tmp_path, "site2")) == []


def test_null_sender_and_queue_id_reply(server: LoopServer, tmp_path: Path) -> None:
    client = RawClient(server.port)
    assert client.reply().startswith(b"220 ")
    assert client.command(b"EHLO client.example.net\r\n").startswith(b"250-")
    assert client.command(b"MAIL FROM:<>\r\n") == b"250 2.1.0 Sender OK\r\n"
    assert client.command(b"RCPT TO:<bob@example.org>\r\n") == b"250 2.1.5 Recipient OK\r\n"
    assert client.command(b"DATA\r\n").startswith(b"354")
    assert client.command(MESSAGE + b".\r\n") == b"250 2.0.0 OK: queued as Q1\r\n"
    client.close()
    block = parse_block(stored_files(spool(tmp_path, "site1"))[0].read_bytes())
    assert block.envelope.sender == ""


RELAY_ATTEMPTS = [
    b"<carol@example.net>",
    b"<@relay.example.org:carol@example.net>",
    b"<@relay.example.org,@other.example.org:bob@example.org>",
    b"<carol%example.net@example.org>",
    b"<carol!example.net@example.org>",
    b'<"carol@example.net"@example.org>',
    b"<postmaster>",
    b"<bob@[127.0.0.1]>",
    b"<bob@sub.example.org>",
    b"<bob@example.org.evil.example.net>",
]


@pytest.mark.parametrize("address", RELAY_ATTEMPTS)
def test_relay_attempt_refused(server: LoopServer, tmp_path: Path, address: bytes) -> None:
    client = RawClient(server.port)
    client.reply()
    client.command(b"EHLO client.example.net\r\n")
    assert client.command(b"MAIL FROM:<alice@example.net>\r\n").startswith(b"250")
    reply = client.command(b"RCPT TO:" + address + b"\r\n")
    assert reply.startswith(b"550 5.7.1 <")
    assert reply.endswith(b">: relay access denied\r\n")
    assert client.command(b"DATA\r\n").startswith(b"503")
    client.close()


@pytest.mark.parametrize(
    "address", [b"<bob@example.org.>", b"<a@b@example.org>", b"<bob\\@x@example.org>"]
)
def test_unparsable_recipient_refused(server: LoopServer, address: bytes) -> None:
    client = RawClient(server.port)
    client.reply()
    client.command(b"EHLO client.example.net\r\n")
    client.command(b"MAIL FROM:<alice@example.net>\r\n")
    reply = client.command(b"RCPT TO:" + address + b"\r\n")
    assert reply[:1] == b"5"
    client.close()


def test_domain_match_ignores_case(server: LoopServer, tmp_path: Path) -> None:
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("alice@example.net", ["Bob@EXAMPLE.Org"], MESSAGE)
    block = parse_block(stored_files(spool(tmp_path, "site1"))[0].read_bytes())
    assert block.envelope.recipients == ("Bob@EXAMPLE.Org",)


def test_recipients_split_per_site(server: LoopServer, tmp_path: Path) -> None:
    recipients = ["a@example.org", "b@example.com", "special@example.org", "c@example.org"]
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.example.net") as client:
        client.sendmail("alice@example.net", recipients, MESSAGE)
    site1 = stored_files(spool(tmp_path, "site1"))
    site2 = stored_files(spool(tmp_path, "site2"))
    assert len(site1) == 1
    assert len(site2) == 1
    data1 = site1[0].read_bytes()
    data2 = site2[0].read_bytes()
    assert parse_block(data1).envelope.recipients == ("a@example.org", "c@example.org")
    assert parse_block(data2).envelope.recipients == ("b@example.com", "special@example.org")
    # With two recipients in a copy, the Received field names none of them.
    assert b"\tfor <" not in data1
    assert data1.endswith(b"(session S1); Mon, 01 Jan 2024 00:00:00 +0000\r\n" + MESSAGE)
    assert data2.endswith(MESSAGE)
    assert b"b@example.com" not in data1
    assert b"a@example.org" not in data2


def test_duplicate_recipient_stored_once(server: LoopServer, tmp_path: Path) -> None:
    # Local parts are case-sensitive (RFC 5321 section 2.4): only the domain
    # is compared without regard to case.
    recipients = ["bob@example.org", "Bob@EXAMPLE.org", "bob@EXAMPLE.ORG", "Bob@example.org",
                  "BOB@example.org"]
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("alice@example.net", recipients, MESSAGE)
    [stored] = stored_files(spool(tmp_path, "site1"))
    block = parse_block(stored.read_bytes())
    assert block.envelope.recipients == ("bob@example.org", "Bob@EXAMPLE.org", "BOB@example.org")


def test_size_over_limit_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailfeed.smtpserver")
    running = start(write_config(tmp_path, max_size=1000), **injected())
    try:
        client = RawClient(running.port)
        client.reply()
        ehlo = client.command(b"EHLO client.example.net\r\n")
        assert b"250-SIZE 1000\r\n" in ehlo
        assert client.command(b"MAIL FROM:<alice@example.net> SIZE=5000\r\n") == (
            b"552 5.3.4 Error: message size exceeds the limit of 1000 octets\r\n"
        )
        assert client.command(b"MAIL FROM:<alice@example.net> SIZE=1000\r\n").startswith(b"250")
        client.command(b"RCPT TO:<bob@example.org>\r\n")
        client.command(b"DATA\r\n")
        body = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 20
        assert client.command(body + b".\r\n") == (
            b"552 5.3.4 Error: message too big, the limit is 1000 octets\r\n"
        )
        client.close()
    finally:
        running.stop()
    assert stored_files(spool(tmp_path, "site1")) == []
    refusals = [r.getMessage() for r in caplog.records if "S1" in r.getMessage()
                and ("refused" in r.getMessage() or "rejected" in r.getMessage())]
    assert len(refusals) == 2, refusals
    assert refusals[0].startswith("session=S1 peer=('127.0.0.1', ")
    assert refusals[0].endswith("message rejected at MAIL: SIZE=5000 exceeds the limit of 1000")
    assert refusals[1].startswith("session=S1 peer=('127.0.0.1', ")
    assert "message rejected: message too big after " in refusals[1]


def test_extensions_advertised(server: LoopServer) -> None:
    client = RawClient(server.port)
    client.reply()
    ehlo = client.command(b"EHLO client.example.net\r\n")
    for keyword in (b"8BITMIME", b"SMTPUTF8", b"PIPELINING", b"SIZE 100000"):
        assert b"250-" + keyword + b"\r\n" in ehlo or b"250 " + keyword + b"\r\n" in ehlo
    assert b"AUTH" not in ehlo
    client.close()


def test_eight_bit_body_stored_unchanged(server: LoopServer, tmp_path: Path) -> None:
    message = case_bytes("H22.eml")
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo("client.example.net")
        client.sendmail(
            "alice@example.net", ["bob@example.org"], message, mail_options=["BODY=8BITMIME"]
        )
    data = stored_files(spool(tmp_path, "site1"))[0].read_bytes()
    stuffed_end = message if message.endswith(b"\r\n") else message + b"\r\n"
    assert data.endswith(b"+0000\r\n" + stuffed_end)


def test_smtputf8_addresses(server: LoopServer, tmp_path: Path) -> None:
    client = RawClient(server.port)
    client.reply()
    client.command(b"EHLO client.example.net\r\n")
    sender = "jörg@example.net".encode()
    rcpt = "bjørn@example.org".encode()
    assert client.command(b"MAIL FROM:<" + sender + b"> SMTPUTF8\r\n").startswith(b"250")
    assert client.command(b"RCPT TO:<" + rcpt + b">\r\n").startswith(b"250")
    assert client.command(b"DATA\r\n").startswith(b"354")
    assert client.command(MESSAGE + b".\r\n").startswith(b"250")
    client.close()
    data = stored_files(spool(tmp_path, "site1"))[0].read_bytes()
    assert data.startswith(
        b"X-Mailfeed-Sender: " + sender + b"\r\nX-Mailfeed-Recipient-Number: 1\r\n"
        b"X-Mailfeed-Recipient-Address: " + rcpt + b"\r\n"
    )
    assert b"with UTF8SMTP id Q1" in data


def test_non_ascii_address_needs_smtputf8(server: LoopServer) -> None:
    client = RawClient(server.port)
    client.reply()
    client.command(b"EHLO client.example.net\r\n")
    assert client.command(b"MAIL FROM:<alice@example.net>\r\n").startswith(b"250")
    reply = client.command("RCPT TO:<bjørn@example.org>\r\n".encode())
    assert reply.startswith(b"553 5.6.7")
    client.close()


SMUGGLING = [
    b"<LF>.<LF>",
    b"<LF>.<CR><LF>",
    b"<CR>.<CR>",
    b"<CR><LF>.<LF>",
]


@pytest.mark.parametrize("ending", SMUGGLING)
def test_smuggled_message_never_created(server: LoopServer, tmp_path: Path, ending: bytes) -> None:
    fake_end = ending.replace(b"<LF>", b"\n").replace(b"<CR>", b"\r")
    smuggled = (
        b"MAIL FROM:<mallory@example.net>\r\n"
        b"RCPT TO:<victim@example.org>\r\n"
        b"DATA\r\n"
        b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
    )
    client = RawClient(server.port)
    client.reply()
    client.command(b"EHLO client.example.net\r\n")
    assert client.command(b"MAIL FROM:<alice@example.net>\r\n").startswith(b"250")
    assert client.command(b"RCPT TO:<bob@example.org>\r\n").startswith(b"250")
    assert client.command(b"DATA\r\n").startswith(b"354")
    client.send(b"Subject: outer\r\n\r\nouter body" + fake_end + smuggled + b".\r\n")
    assert client.reply().startswith(b"550 5.6.0 ")
    # The session is usable and no reply for the smuggled commands arrives.
    assert client.command(b"NOOP\r\n") == b"250 OK\r\n"
    assert client.command(b"QUIT\r\n").startswith(b"221")
    client.close()
    assert stored_files(spool(tmp_path, "site1")) == []
    assert tmp_files(spool(tmp_path, "site1")) == []


def test_low_disk_space_refused_before_data(tmp_path: Path) -> None:
    site1 = spool(tmp_path, "site1")
    free = {"default": 10**9}

    def free_space(path: Path) -> int:
        return free.get(str(path), free["default"])

    running = start(write_config(tmp_path), **injected(free_space_of=free_space))
    try:
        client = RawClient(running.port)
        client.reply()
        client.command(b"EHLO client.example.net\r\n")
        free[str(tmp_path / "spool")] = 100
        assert client.command(b"MAIL FROM:<alice@example.net>\r\n") == (
            b"452 4.3.1 Insufficient system storage\r\n"
        )
        free[str(tmp_path / "spool")] = 10**9
        # The declared SIZE counts too: 1024 minimum + 2000 announced > 2500 free.
        free[str(site1)] = 2500
        assert client.command(b"MAIL FROM:<alice@example.net> SIZE=2000\r\n").startswith(b"250")
        assert client.command(b"RCPT TO:<bob@example.org>\r\n") == (
            b"452 4.3.1 Insufficient system storage\r\n"
        )
        assert client.command(b"RCPT TO:<carol@example.com>\r\n").startswith(b"250")
        client.close()
    finally:
        running.stop()


@pytest.fixture
def fault() -> Iterator[None]:
    yield
    faults.configure(None)


def test_storage_failure_answers_451(server: LoopServer, tmp_path: Path, fault: None) -> None:
    faults.configure("maildir.after_tmp_write:enospc")
    with (
        smtplib.SMTP("127.0.0.1", server.port) as client,
        pytest.raises(smtplib.SMTPDataError) as caught,
    ):
        client.sendmail("alice@example.net", ["bob@example.org"], MESSAGE)
    assert caught.value.smtp_code == 451
    assert caught.value.smtp_error.startswith(b"4.3.0 ")
    assert stored_files(spool(tmp_path, "site1")) == []
    assert tmp_files(spool(tmp_path, "site1")) == []


MIXED_SITES = """
[sites.site1]
domains = ["example.org"]

[sites.site2]
format = "mbox"
path = "site2.mbox"
domains = ["example.com"]
"""


def test_second_site_failure_keeps_first_copy(tmp_path: Path, fault: None) -> None:
    running = start(write_config(tmp_path, MIXED_SITES), **injected())
    try:
        faults.configure("mbox.after_write:eio")
        with (
            smtplib.SMTP("127.0.0.1", running.port) as client,
            pytest.raises(smtplib.SMTPDataError) as caught,
        ):
            client.sendmail("alice@example.net", ["bob@example.org", "c@example.com"], MESSAGE)
        assert caught.value.smtp_code == 451
        # The documented trade-off: site1's durable copy stays, and the
        # client's retry will store it a second time.
        assert len(stored_files(spool(tmp_path, "site1"))) == 1
        mbox = tmp_path / "spool" / "site2.mbox"
        assert not mbox.exists() or mbox.read_bytes() == b""
    finally:
        running.stop()


def test_too_many_recipients(tmp_path: Path) -> None:
    running = start(write_config(tmp_path, max_rcpts=2), **injected())
    try:
        client = RawClient(running.port)
        client.reply()
        client.command(b"EHLO client.example.net\r\n")
        client.command(b"MAIL FROM:<alice@example.net>\r\n")
        assert client.command(b"RCPT TO:<a@example.org>\r\n").startswith(b"250")
        assert client.command(b"RCPT TO:<b@example.org>\r\n").startswith(b"250")
        assert client.command(b"RCPT TO:<c@example.org>\r\n").startswith(b"452 4.5.3")
        client.close()
    finally:
        running.stop()


def test_connections_per_address_limited(tmp_path: Path) -> None:
    running = start(write_config(tmp_path, per_address=2), **injected())
    try:
        first = RawClient(running.port)
        second = RawClient(running.port)
        assert first.reply().startswith(b"220")
        assert second.reply().startswith(b"220")
        third = RawClient(running.port)
        assert third.reply() == b"421 4.7.0 mx.example.net Error: too many connections\r\n"
        assert third.closed()
        first.command(b"QUIT\r\n")
        assert first.closed()
        fourth = RawClient(running.port)
        assert fourth.reply().startswith(b"220")
        for client in (second, third, fourth):
            client.close()
    finally:
        running.stop()


def test_too_many_errors_close_session(tmp_path: Path) -> None:
    running = start(write_config(tmp_path, max_errors=3), **injected())
    try:
        client = RawClient(running.port)
        client.reply()
        client.command(b"EHLO client.example.net\r\n")
        client.command(b"MAIL FROM:<alice@example.net>\r\n")
        assert client.command(b"RCPT TO:<x@example.net>\r\n").startswith(b"550")
        assert client.command(b"RCPT TO:<y@example.net>\r\n").startswith(b"550")
        assert client.command(b"RCPT TO:<z@example.net>\r\n").startswith(b"550")
        assert client.reply() == b"421 4.7.0 mx.example.net Error: too many errors\r\n"
        assert client.closed()
        client.close()
    finally:
        running.stop()


def test_shutdown_lets_transaction_finish(tmp_path: Path) -> None:
    running = start(write_config(tmp_path, TWO_SITES), **injected())
    idle = RawClient(running.port)
    busy = RawClient(running.port)
    idle.reply()
    busy.reply()
    busy.command(b"EHLO client.example.net\r\n")
    busy.command(b"MAIL FROM:<alice@example.net>\r\n")
    busy.command(b"RCPT TO:<bob@example.org>\r\n")
    assert busy.command(b"DATA\r\n").startswith(b"354")
    shutdown = running.loop.call_soon_threadsafe
    done = []
    shutdown(lambda: done.append(running.loop.create_task(running.server.shutdown(20))))
    # The idle session is closed at once; the busy one may finish.
    assert idle.reply() == b"421 4.3.2 mx.example.net Service shutting down, try again later\r\n"
    assert idle.closed()
    assert busy.command(MESSAGE + b".\r\n") == b"250 2.0.0 OK: queued as Q1\r\n"
    assert busy.reply().startswith(b"421 4.3.2")
    assert busy.closed()
    idle.close()
    busy.close()

    async def finished() -> None:
        await done[0]

    running.call(finished)
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(timeout=10)
    assert len(stored_files(spool(tmp_path, "site1"))) == 1


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for mx.example.net and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.net")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path = folder / "cert.pem"
    key_path = folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[LoopServer]:
    cert, key = make_certificate(tmp_path)
    extra = f'tls_cert = "{cert}"\ntls_key = "{key}"\npop3s_listen = []\n'
    config = load_mx_config(write_config(tmp_path, extra=extra))
    running = LoopServer(config, tls_context=make_tls_context(config), **injected())
    yield running
    running.stop()


def test_starttls_delivery_records_cipher(tls_server: LoopServer, tmp_path: Path) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", tls_server.port, local_hostname="client.example.net") as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=context)
        client.sendmail("alice@example.net", ["bob@example.org"], MESSAGE)
    data = stored_files(spool(tmp_path, "site1"))[0].read_bytes()
    assert b"with ESMTPS id Q1\r\n" in data
    assert re.search(rb"\t\(session S1; TLSv1\.[23] cipher \S+ \(\d+ bits\)\)\r\n", data)


def test_swaks_delivery_over_starttls(tls_server: LoopServer, tmp_path: Path) -> None:
    swaks = need("swaks")["swaks"]
    # swaks ends the data with its own CRLF before the final dot.
    body = "Subject: from swaks\r\n\r\nswaks body line"
    result = run(
        [swaks, "--server", f"127.0.0.1:{tls_server.port}", "--tls", "--helo",
         "client.example.net", "--from", "alice@example.net", "--to",
         "bob@example.org,carol@example.com", "--data", body],
        timeout=60,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    site1 = stored_files(spool(tmp_path, "site1"))
    site2 = stored_files(spool(tmp_path, "site2"))
    assert len(site1) == 1
    assert len(site2) == 1
    assert site1[0].read_bytes().endswith(b"+0000\r\n" + body.encode() + b"\r\n")
    assert parse_block(site2[0].read_bytes()).envelope.recipients == ("carol@example.com",)


# A 16-octet buffer sends every message below through the temporary file.
SPILL_BUFFER = 16


@pytest.fixture
def spilling(tmp_path: Path) -> Iterator[LoopServer]:
    config = write_config(tmp_path, max_size=4000)
    running = start(config, **injected(data_buffer_size=SPILL_BUFFER))
    yield running
    running.stop()


def wait_closed(folder: Path, timeout: float = 10) -> list[str]:
    """Return the files still open in ``folder`` once none is, or at the deadline."""
    deadline = time.monotonic() + timeout
    while (files := open_files_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return files


def open_data(port: int) -> RawClient:
    client = RawClient(port)
    client.reply()
    client.command(b"EHLO client.example.net\r\n")
    assert client.command(b"MAIL FROM:<alice@example.net>\r\n").startswith(b"250")
    assert client.command(b"RCPT TO:<bob@example.org>\r\n").startswith(b"250")
    assert client.command(b"DATA\r\n").startswith(b"354")
    return client


def test_spilled_message_stored_exactly(spilling: LoopServer, tmp_path: Path) -> None:
    with smtplib.SMTP("127.0.0.1", spilling.port) as client:
        client.sendmail("alice@example.net", ["bob@example.org", "special@example.org"], MESSAGE)
    for site in ("site1", "site2"):
        [stored] = stored_files(spool(tmp_path, site))
        assert stored.read_bytes().endswith(b"+0000\r\n" + MESSAGE)
    assert wait_closed(tmp_path / "spool") == []


@pytest.mark.parametrize("ending", [*SMUGGLING, b"<CR>.<LF>"])
def test_smuggling_through_temporary_file(
    spilling: LoopServer, tmp_path: Path, ending: bytes
) -> None:
    fake_end = ending.replace(b"<LF>", b"\n").replace(b"<CR>", b"\r")
    client = open_data(spilling.port)
    client.send(
        b"Subject: outer\r\n\r\n" + b"outer body line\r\n" * 4 + b"outer" + fake_end
        + b"MAIL FROM:<mallory@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
        + b"Subject: smuggled\r\n\r\n" + b"smuggled body line\r\n" * 4
    )
    client.send(fake_end + b"QUIT\r\n")
    client.send(b".\r\n")
    assert client.reply().startswith(b"550 5.6.0 ")
    assert client.command(b"NOOP\r\n") == b"250 OK\r\n"
    assert client.command(b"QUIT\r\n").startswith(b"221")
    client.close()
    assert stored_files(spool(tmp_path, "site1")) == []
    assert tmp_files(spool(tmp_path, "site1")) == []
    assert wait_closed(tmp_path / "spool") == []


def test_spilled_message_over_size(spilling: LoopServer, tmp_path: Path) -> None:
    client = open_data(spilling.port)
    # 4016 octets after unstuffing, over the limit of 4000.
    client.send(b"Subject: big\r\n\r\n" + b"..x\r\n" * 1000)
    reply = client.command(b".\r\n")
    assert reply == b"552 5.3.4 Error: message too big, the limit is 4000 octets\r\n"
    assert client.command(b"NOOP\r\n") == b"250 OK\r\n"
    client.close()
    assert stored_files(spool(tmp_path, "site1")) == []
    assert wait_closed(tmp_path / "spool") == []


def test_unstuffed_size_at_limit_accepted(spilling: LoopServer, tmp_path: Path) -> None:
    # 1000 lines of "..x" are 5000 octets on the wire but 4000 after unstuffing.
    client = open_data(spilling.port)
    client.send(b"..x\r\n" * 1000)
    assert client.command(b".\r\n").startswith(b"250 2.0.0 ")
    client.close()
    [stored] = stored_files(spool(tmp_path, "site1"))
    assert stored.read_bytes().endswith(b"+0000\r\n" + b".x\r\n" * 1000)


def test_long_line_answered_after_dot(tmp_path: Path) -> None:
    running = start(write_config(tmp_path, extra="max_line_length = 2000\n"), **injected())
    try:
        client = open_data(running.port)
        client.send(b"Subject: long\r\n\r\n" + b"w" * 5000 + b"\r\n" + b"tail\r\n")
        reply = client.command(b".\r\n")
        assert reply == b"500 5.5.2 Error: line too long, the limit is 2000 octets with CRLF\r\n"
        assert client.command(b"NOOP\r\n") == b"250 OK\r\n"
        client.close()
    finally:
        running.stop()
    assert stored_files(spool(tmp_path, "site1")) == []


def test_disconnect_during_data_closes_file(spilling: LoopServer, tmp_path: Path) -> None:
    client = open_data(spilling.port)
    client.send(b"Subject: cut\r\n\r\n" + b"line before the cut\r\n" * 50)
    deadline = time.monotonic() + 10
    while not open_files_in(tmp_path / "spool") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(open_files_in(tmp_path / "spool")) == 1
    client.close()
    assert wait_closed(tmp_path / "spool") == []
    assert stored_files(spool(tmp_path, "site1")) == []


def test_spilled_storage_failure_closes_file(
    spilling: LoopServer, tmp_path: Path, fault: None
) -> None:
    faults.configure("maildir.after_tmp_write:enospc")
    client = open_data(spilling.port)
    client.send(MESSAGE.replace(b"\r\n.", b"\r\n.."))
    assert client.command(b".\r\n").startswith(b"451 4.3.0 ")
    client.close()
    assert stored_files(spool(tmp_path, "site1")) == []
    assert wait_closed(tmp_path / "spool") == []
