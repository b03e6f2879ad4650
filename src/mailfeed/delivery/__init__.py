"""Delivery targets on the site host: SMTP, LMTP, sendmail and Maildir.

A target takes an envelope and the original message (the block already
skipped) and returns one :class:`RecipientResult` per recipient, in envelope
order.  Targets are chosen by URL with :func:`target_from_url`:

``smtp://HOST:PORT``
    RFC 5321 over TCP: EHLO, MAIL, RCPT, DATA.  Uses ``BODY=8BITMIME``
    (RFC 6152) when offered and the message has 8-bit octets, ``SMTPUTF8``
    (RFC 6531) when an address needs it, ``SIZE`` (RFC 1870) when offered.
    A 452 reply to RCPT after at least one accepted recipient means "too
    many recipients" (RFC 5321 section 4.5.3.1.10): the rest go in a further
    transaction on the same connection.
``lmtp://HOST:PORT`` or ``lmtp:/path/to/socket``
    RFC 2033: LHLO, and after DATA one reply per accepted recipient.
``sendmail`` or ``sendmail:/path``
    ``sendmail -i -f SENDER -- RCPT...`` with the message on stdin, LF line
    ends.  The exit status applies to every recipient.
``maildir:/root``
    One Maildir per recipient at ``root/<recipient in lower case>``.  Each
    copy starts with ``Return-Path: <SENDER>`` and ``Delivered-To:
    RECIPIENT``, as a final delivery agent writes them, because a Maildir
    file has no other place for the envelope.

The package: :mod:`~mailfeed.delivery.base` (outcomes, results, the
Target protocol), :mod:`~mailfeed.delivery.convert` (line ends and
dot-stuffing), :mod:`~mailfeed.delivery.smtp` (SMTP and LMTP),
:mod:`~mailfeed.delivery.sendmail` and :mod:`~mailfeed.delivery.maildir`.
Every public name is importable from ``mailfeed.delivery`` itself.

Invariants:

* The message is read in chunks of :data:`CHUNK_SIZE` octets and never held
  whole in memory.  Only line ends change: over SMTP and LMTP every bare CR
  and bare LF becomes CRLF, a final CRLF is added when missing and lines
  starting with "." are dot-stuffed (RFC 5321 section 4.5.2).  For sendmail
  and Maildir, CRLF and bare CR become LF and a final LF is added when
  missing.  The message is never parsed.  The Maildir target alone adds
  header fields: its Return-Path and Delivered-To on top.
* The null sender is sent as ``MAIL FROM:<>`` and as ``-f <>``; it is never
  replaced by another address.
* A result is DELIVERED only after the server or program accepted the
  message for that recipient.  Any doubt (lost connection, timeout, reply
  that is neither 2xx nor 5xx) is DEFERRED, so a retry can only duplicate
  mail, never lose it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mailfeed.delivery.base import (
    DEFAULT_TIMEOUT,
    Outcome,
    RecipientResult,
    Target,
    outcome_for_code,
)
from mailfeed.delivery.convert import CHUNK_SIZE, iter_converted
from mailfeed.delivery.maildir import MaildirTarget, maildir_name_error, trace_fields
from mailfeed.delivery.sendmail import DEFAULT_SENDMAIL, SendmailTarget
from mailfeed.delivery.smtp import (
    DEFAULT_LMTP_PORT,
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_REPLY_LINES,
    DEFAULT_SMTP_PORT,
    LmtpTarget,
    SmtpTarget,
)
from mailfeed.errors import ConfigError

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_REPLY_LINES",
    "DEFAULT_TIMEOUT",
    "LmtpTarget",
    "MaildirTarget",
    "Outcome",
    "RecipientResult",
    "SendmailTarget",
    "SmtpTarget",
    "Target",
    "iter_converted",
    "maildir_name_error",
    "outcome_for_code",
    "target_from_url",
    "trace_fields",
]

TARGET_FORMS = (
    "smtp://HOST:PORT, lmtp://HOST:PORT, lmtp:/path/to/socket, sendmail, "
    "sendmail:/path/to/sendmail or maildir:/path/to/root"
)


def _invalid(url: str, why: str) -> ConfigError:
    return ConfigError(f"invalid delivery target {url!r}: {why}; expected {TARGET_FORMS}")


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise _invalid(url, "only a host and a port are allowed")
    try:
        port = parts.port
    except ValueError:
        raise _invalid(url, "the port is not a number from 0 to 65535") from None
    host = parts.hostname
    if not host:
        raise _invalid(url, "the host is missing")
    if port == 0:
        raise _invalid(url, "port 0 is not a valid destination")
    return host, port if port is not None else default_port


def target_from_url(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    helo: str | None = None,
    sendmail_path: str = DEFAULT_SENDMAIL,
    max_line: int = DEFAULT_MAX_LINE,
    max_reply_lines: int = DEFAULT_MAX_REPLY_LINES,
) -> Target:
    """Build the target that ``url`` names; raise ConfigError if it is invalid.

    ``max_line`` bounds each reply line from an SMTP or LMTP server, in
    octets, and ``max_reply_lines`` the lines of one reply.
    ``sendmail_path`` is the program for a bare ``sendmail`` URL.
    """
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "smtp" and rest.startswith("//"):
        host, port = _host_port(url, DEFAULT_SMTP_PORT)
        return SmtpTarget(host, port, timeout=timeout, helo=helo, max_line=max_line,
                          max_reply_lines=max_reply_lines)
    if scheme == "lmtp" and rest.startswith("//"):
        host, port = _host_port(url, DEFAULT_LMTP_PORT)
        return LmtpTarget(host, port, timeout=timeout, helo=helo, max_line=max_line,
                          max_reply_lines=max_reply_lines)
    if scheme == "lmtp" and rest.startswith("/"):
        return LmtpTarget(rest, 0, timeout=timeout, helo=helo, max_line=max_line,
                          max_reply_lines=max_reply_lines)
    if scheme == "sendmail" and not colon:
        return SendmailTarget(sendmail_path, timeout=timeout)
    if scheme == "sendmail" and rest.startswith("/") and not rest.startswith("//"):
        return SendmailTarget(rest, timeout=timeout)
    if scheme == "maildir" and rest.startswith("/") and not rest.startswith("//"):
        return MaildirTarget(rest)
    raise _invalid(url, "unknown form")
