"""The whole corpus: mailfeed-fwd's spool writer, then mailfeed-rmail to an SMTP MTA.

Every message is stored with a block in a Maildir spool and in an mbox spool,
read back as a POP3 client would see it, and re-injected by mailfeed-rmail.
The MTA must receive the original envelope and the original bytes in their
delivered form: the mbox ``From `` line dropped, every bare CR and bare LF
turned into CRLF, and a final CRLF added when missing.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from mailfeed import rmail
from mailfeed.config import Limits, SiteConfig
from mailfeed.envelope import Envelope
from mailfeed.spool import store_message
from tests.integration.mta import RecordingHandler, ServerThread, Transaction
from tests.support import need_corpus, split_mboxrd

# The corpus has lines of up to 48,677 octets, so the test MTA must accept long lines.
MTA_LINE_LIMIT = 1024 * 1024


class LongLineSMTP(SMTP):  # type: ignore[misc]
    line_length_limit = MTA_LINE_LIMIT


def envelope_for(index: int) -> Envelope:
    """Vary the envelope: the null sender, one recipient, several recipients."""
    sender = "" if index % 7 == 0 else f"sender{index % 5}@example.net"
    count = 1 + index % 3
    recipients = tuple(f"rcpt{index}-{n}@example.org" for n in range(count))
    return Envelope(sender, recipients)


def delivered_form(original: bytes) -> bytes:
    """Return the bytes an SMTP MTA must receive for an original message."""
    if original.startswith(b"From "):
        original = original[original.index(b"\n") + 1 :]
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", original)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def start_mta() -> tuple[ServerThread, RecordingHandler]:
    handler = RecordingHandler()
    server = ServerThread(handler)

    def factory() -> Any:
        return LongLineSMTP(handler, enable_SMTPUTF8=True, decode_data=False,
                            data_size_limit=None, hostname="mta.test")

    server.factory = factory
    return server, handler


def check(transaction: Transaction, envelope: Envelope, original: bytes, name: str) -> None:
    assert transaction.sender == envelope.sender, name
    assert transaction.recipients == list(envelope.recipients), name
    assert transaction.content == delivered_form(original), name


@pytest.mark.slow
@pytest.mark.parametrize("spool_format", ["maildir", "mbox"])
def test_corpus_fwd_then_rmail(tmp_path: Path, spool_format: str) -> None:
    files = need_corpus()
    site = SiteConfig("corpus", spool_format, tmp_path / "spool")
    envelopes = [envelope_for(index) for index in range(len(files))]
    stored: list[Path] = []
    for path, envelope in zip(files, envelopes, strict=True):
        with path.open("rb") as fp:
            result = store_message(site, envelope, fp, Limits(max_message_size=0))
        stored.append(Path(result.location))

    if spool_format == "mbox":
        # A POP3 server hands out each mbox message with one '>' removed.
        messages = split_mboxrd(site.path.read_bytes())
        assert len(messages) == len(files)
        stored = []
        for number, (_from_line, data) in enumerate(messages):
            one = tmp_path / f"mbox-{number}.eml"
            one.write_bytes(data)
            stored.append(one)

    server, handler = start_mta()
    with server:
        target = f"smtp://127.0.0.1:{server.port}"
        for path in stored:
            assert rmail.main(["--target", target, str(path)]) == 0, path

    assert len(handler.transactions) == len(files)
    for transaction, path, envelope in zip(handler.transactions, files, envelopes, strict=True):
        check(transaction, envelope, path.read_bytes(), path.name)


def test_delivered_form_rules() -> None:
    assert delivered_form(b"From x Mon\nA: b\n\nbody") == b"A: b\r\n\r\nbody\r\n"
    assert delivered_form(b"A: b\r\rc\n") == b"A: b\r\n\r\nc\r\n"
    assert delivered_form(io.BytesIO(b"x\r\n").read()) == b"x\r\n"
