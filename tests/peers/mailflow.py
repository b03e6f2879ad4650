"""Helpers shared by the peer tests: submit mail, find spooled copies, split blocks."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

from mailfeed.envelope import Block, parse_block
from tests.peers.postfix import DELIVERY_TIMEOUT, PostfixInstance, wait_until

# A Maildir name as mailfeed-fwd writes it: unique part, then ,S= and ,W=.
SIZED_NAME = re.compile(r"^(?P<base>[^:/]+),S=(?P<size>\d+),W=(?P<wsize>\d+)(?::2,.*)?$")


def submit(port: int, sender: str, recipients: list[str], data: bytes) -> None:
    """Send one message over SMTP to 127.0.0.1:``port``; raise if any RCPT fails."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        refused = smtp.sendmail(sender, recipients, data)
    assert not refused, f"recipients refused: {refused}"


def maildir_files(maildir: Path) -> list[Path]:
    files: list[Path] = []
    for sub in ("new", "cur"):
        folder = maildir / sub
        if folder.is_dir():
            files.extend(sorted(folder.iterdir()))
    return files


def wait_for_maildir(maildir: Path, count: int, instance: PostfixInstance,
                     timeout: float = DELIVERY_TIMEOUT) -> list[Path]:
    """Wait until ``maildir`` holds ``count`` messages; return them."""
    def probe() -> list[Path] | None:
        found = maildir_files(maildir)
        return found if len(found) >= count else None

    return wait_until(probe, timeout=timeout,
                      what=f"{count} message(s) in {maildir}", diagnostics=instance.log_tail)


def split_stored(data: bytes) -> tuple[Block, bytes]:
    """Split spooled bytes into the block and the message after it."""
    block = parse_block(data)
    return block, data[block.length:]


def strip_received(message: bytes) -> tuple[bytes, bytes]:
    """Split off the first header field (a Received: line and its continuations)."""
    assert message.startswith(b"Received: "), message[:200]
    end = 0
    while True:
        end = message.index(b"\n", end) + 1
        if message[end:end + 1] not in (b" ", b"\t"):
            return message[:end], message[end:]


def as_queued(original: bytes) -> bytes:
    """The message as Postfix passes it to a pipe: LF line ends, final LF."""
    text = original.replace(b"\r\n", b"\n")
    return text if text.endswith(b"\n") else text + b"\n"
