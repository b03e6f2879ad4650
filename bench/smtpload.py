"""SMTP load for the benchmarks: many small transactions, or one large message.

The harness's own memory is not measured, so the standard library client
(smtplib) is good enough here, although it keeps a whole message in memory.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["send_file", "send_messages"]


def send_messages(host: str, port: int, sender: str, recipients: Sequence[str],
                  messages: Sequence[bytes], timeout: float = 600.0) -> float:
    """Send each message in its own transaction over one connection; return seconds taken.

    Messages with LF line ends are converted to CRLF first (RFC 5321 section
    2.3.8 forbids bare LF), outside the timed part.
    """
    wire = [m if b"\r\n" in m else m.replace(b"\n", b"\r\n") for m in messages]
    started = time.perf_counter()
    with smtplib.SMTP(host, port, timeout=timeout) as client:
        for message in wire:
            client.sendmail(sender, list(recipients), message)
    return time.perf_counter() - started


def send_file(host: str, port: int, sender: str, recipients: Sequence[str], path: Path,
              timeout: float = 600.0) -> float:
    """Send the message stored at ``path`` in one transaction; return seconds taken."""
    return send_messages(host, port, sender, recipients, [path.read_bytes()], timeout)
