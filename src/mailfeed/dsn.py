"""Delivery status notifications for recipients that failed for good.

Builds an RFC 3464 report: a multipart/report (RFC 6522) with
report-type=delivery-status whose parts are a text/plain explanation, a
message/delivery-status with one per-recipient block per failed recipient
(RFC 3464 section 2.3: Final-Recipient, Action, Status, Diagnostic-Code),
and the header section of the original as text/rfc822-headers.

Invariants:

* No DSN is sent for a message with the null sender (RFC 5321 section
  6.1, RFC 3464 section 2), so notifications cannot loop.
* The DSN itself has the null sender and goes to the original sender; it
  carries ``Auto-Submitted: auto-replied`` (RFC 3834 section 5).
* The report is new content built with the email package.  The original
  message is never parsed or re-serialised: only its header bytes are
  quoted, cut at :data:`MAX_HEADER_OCTETS`.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from email import policy
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formatdate, make_msgid

from mailfeed.delivery import Outcome, RecipientResult
from mailfeed.envelope import Envelope

__all__ = [
    "MAX_HEADER_OCTETS",
    "build_dsn",
    "dsn_envelope",
    "should_send_dsn",
]

# The quoted original header section is cut at this size, at a line end.
MAX_HEADER_OCTETS = 64 * 1024
# RFC 3463 section 3.1: "5.0.0 Other undefined Status", used when the reply
# carries no enhanced status code.
DEFAULT_STATUS = "5.0.0"
# RFC 3464 section 2.3.6: the diagnostic type for SMTP reply codes; "x-unix"
# is the customary type for a program's exit status (used by Postfix).
DIAGNOSTIC_SMTP = "smtp"
DIAGNOSTIC_UNIX = "x-unix"

_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


def should_send_dsn(envelope: Envelope) -> bool:
    """Return False for the null sender, to whom no DSN may be sent."""
    return envelope.sender != ""


def dsn_envelope(envelope: Envelope) -> Envelope:
    """Return the envelope of a DSN for ``envelope``: null sender, to its sender."""
    if not should_send_dsn(envelope):
        raise ValueError("no DSN may be sent for a message with the null sender")
    return Envelope("", (envelope.sender,))


def status_for(result: RecipientResult) -> str:
    """Return the RFC 3463 status code for a failed recipient."""
    match = _ENHANCED.match(result.text)
    if match and match.group(1).startswith("5"):
        return match.group(1)
    return DEFAULT_STATUS


def _address_type(address: str) -> str:
    # RFC 6533 section 3 adds the "utf-8" address type for non-ASCII addresses.
    return "rfc822" if address.isascii() else "utf-8"


def _diagnostic(result: RecipientResult) -> str:
    text = " ".join(result.text.split())
    if 200 <= result.code <= 599:
        return f"{DIAGNOSTIC_SMTP}; {result.code} {text}"
    return f"{DIAGNOSTIC_UNIX}; {text}"


def _fields(pairs: list[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in pairs:
        block[name] = value
    return block


def _explanation(envelope: Envelope, failed: list[RecipientResult], reporting_mta: str) -> str:
    lines = [
        f"This is the mail system at {reporting_mta}.",
        "",
        "Your message could not be delivered to the following recipients.",
        "The delivery will not be retried.",
        "",
    ]
    for result in failed:
        lines.append(f"<{result.recipient}>: {' '.join(result.text.split())}")
    lines.append("")
    return "\n".join(lines)


def _headers_part(original_headers: bytes) -> MIMENonMultipart:
    headers = original_headers
    if len(headers) > MAX_HEADER_OCTETS:
        cut = headers.rfind(b"\n", 0, MAX_HEADER_OCTETS)
        headers = headers[: cut + 1] if cut >= 0 else headers[:MAX_HEADER_OCTETS]
    part = MIMENonMultipart("text", "rfc822-headers")
    if headers.isascii():
        text = headers.replace(b"\r\n", b"\n").decode("ascii")
        part.set_payload(text)
        part["Content-Transfer-Encoding"] = "7bit"
    else:
        # 8-bit header bytes are quoted exactly, so base64 keeps them intact.
        part.set_payload(base64.encodebytes(headers).decode("ascii"))
        part["Content-Transfer-Encoding"] = "base64"
    return part


def build_dsn(
    envelope: Envelope,
    failed: list[RecipientResult],
    original_headers: bytes,
    *,
    reporting_mta: str,
    arrival: datetime | None = None,
) -> bytes:
    """Build the DSN message (CRLF line ends) for the failed recipients.

    ``failed`` contains FAILED results only; ``original_headers`` is the header
    section of the original message as bytes.  Raise ValueError for the
    null sender, an empty list or a result that is not FAILED.
    """
    if not should_send_dsn(envelope):
        raise ValueError("no DSN may be sent for a message with the null sender")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    for result in failed:
        if result.outcome is not Outcome.FAILED:
            raise ValueError(
                f"recipient {result.recipient!r} is {result.outcome.value}, not failed"
            )

    per_message = [("Reporting-MTA", f"dns; {reporting_mta}")]
    if arrival is not None:
        per_message.append(("Arrival-Date", format_datetime(arrival)))
    blocks: list[Message | str] = [_fields(per_message)]
    for result in failed:
        blocks.append(
            _fields(
                [
                    (
                        "Final-Recipient",
                        f"{_address_type(result.recipient)}; {result.recipient}",
                    ),
                    ("Action", "failed"),
                    ("Status", status_for(result)),
                    ("Diagnostic-Code", _diagnostic(result)),
                ]
            )
        )
    status = MIMENonMultipart("message", "delivery-status")
    status.set_payload(blocks)

    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = envelope.sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = formatdate(localtime=True)
    report["Message-ID"] = make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    explanation = _explanation(envelope, failed, reporting_mta)
    charset = "us-ascii" if explanation.isascii() else "utf-8"
    report.attach(MIMEText(explanation, "plain", charset))
    report.attach(status)
    report.attach(_headers_part(original_headers))
    utf8 = not envelope.sender.isascii() or not all(r.recipient.isascii() for r in failed)
    return report.as_bytes(policy=policy.SMTPUTF8 if utf8 else policy.SMTP)
