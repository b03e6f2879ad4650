"""What every delivery target shares: outcomes, results, the Target protocol.

Also the reply codes and enhanced status codes (RFC 5321 section 4.2,
RFC 3463) that a target uses for results it decides itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

from mailfeed.envelope import Envelope

__all__ = [
    "DEFAULT_TIMEOUT",
    "BatchingTarget",
    "Outcome",
    "RecipientResult",
    "Target",
    "outcome_for_code",
]

DEFAULT_TIMEOUT = 60.0

# Codes used for results that the target decides itself, without a reply
# from a server.  They follow RFC 5321 section 4.2 so that logs and DSNs read
# like server replies; the enhanced status codes are from RFC 3463.
CODE_LOCAL_TEMPFAIL = 451  # "Requested action aborted: local error"
CODE_ADDRESS_REJECTED = 553  # "mailbox name not allowed"
# RFC 5321 section 4.5.3.1.10: "452 too many recipients".
CODE_TOO_MANY_RECIPIENTS = 452
# RFC 5321 section 4.3.2: the intermediate reply to DATA.
CODE_START_MAIL_INPUT = 354
# RFC 6531 section 3.7.4.1 (and RFC 6533): non-ASCII address not permitted.
STATUS_NON_ASCII = "5.6.7"
# The same condition as a temporary failure (RFC 3463 section 3.1: class 4
# with any subject and detail), for a local MTA that lacks SMTPUTF8: a
# setting on this site, not a property of the message.
STATUS_NON_ASCII_TEMPORARY = "4.6.7"
# RFC 3463: "4.4.1 no answer from host", "4.4.2 bad connection".
STATUS_NO_ANSWER = "4.4.1"
STATUS_BAD_CONNECTION = "4.4.2"
STATUS_LOCAL_ERROR = "4.3.0"
STATUS_SYSTEM_FULL = "4.3.1"
STATUS_BAD_MAILBOX = "5.1.3"


class Outcome(enum.Enum):
    """The delivery outcome for one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient, with the reply code and text behind it.

    ``code`` is the SMTP or LMTP reply code, or for the sendmail target the
    program's exit status; ``text`` is the reply text or a reason.
    ``unreachable`` is True when the target could not be reached at all
    (connection refused or timed out, no greeting), so that a caller can
    stop sending it more messages.
    """

    recipient: str
    outcome: Outcome
    code: int
    text: str
    unreachable: bool = False


class Target(Protocol):
    """A delivery destination that returns one result per recipient, in envelope order.

    ``message`` is a seekable binary file positioned at the first octet of
    the original message; a target may seek back to that position.
    """

    def deliver(self, envelope: Envelope, message: BinaryIO) -> list[RecipientResult]: ...


@runtime_checkable
class BatchingTarget(Target, Protocol):
    """A target that can defer part of its durability work to one :meth:`sync` per batch.

    After :meth:`begin_batch`, a DELIVERED result is durable only once
    :meth:`sync` has returned; the caller must not record it before.
    :meth:`sync` raises OSError when that work failed, and then no result
    since :meth:`begin_batch` may be taken as durable.  Without
    :meth:`begin_batch` every result is durable when ``deliver`` returns.
    """

    def begin_batch(self) -> None: ...

    def sync(self) -> None: ...


def outcome_for_code(code: int) -> Outcome:
    """Classify an SMTP or LMTP reply code (RFC 5321 section 4.2.1)."""
    if 200 <= code <= 299:
        return Outcome.DELIVERED
    if 500 <= code <= 599:
        return Outcome.FAILED
    # 4xx, and anything unexpected: a retry is safe.
    return Outcome.DEFERRED
