"""The results of reading a multi-line RETR body (RFC 1939 section 3).

The client streams each body, unstuffed, into the caller's :class:`Sink`
in writes of up to :data:`SINK_CHUNK` octets; a :class:`RetrResult` says
whether the message is usable, and :class:`RetrFailure` why not.  One RETR
reply may take ``Timeouts.message`` plus its LIST size divided by
:data:`MESSAGE_MIN_RATE` seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MESSAGE_MIN_RATE", "SINK_CHUNK", "RetrFailure", "RetrResult", "Sink"]

# Octets per second that a RETR reply must average once Timeouts.message has
# passed (a 128 kbit/s link): a message of N octets may take
# message + N / MESSAGE_MIN_RATE seconds from its +OK to its terminator.
MESSAGE_MIN_RATE = 16 * 1024
# Unstuffed octets collected before one write to the sink.
SINK_CHUNK = 64 * 1024


class RetrFailure(enum.Enum):
    """Why a RETR gave no usable message, so the caller decides without parsing text."""

    SERVER_ERROR = "server-error"  # -ERR to RETR
    LINE_TOO_LONG = "line-too-long"  # a line over max_line_length
    UNSTUFFED_DOT = "unstuffed-dot"  # a line starting with a '.' that was not stuffed
    SIZE_MISMATCH = "size-mismatch"  # the unstuffed size differs from LIST
    SINK_ERROR = "sink-error"  # the sink's write raised OSError
    BROKEN = "broken"  # the session broke in the middle of the reply


class Sink(Protocol):
    """The destination of a message's unstuffed octets in :meth:`Pop3Client.retrieve`."""

    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True)
class RetrResult:
    """The outcome of one RETR.

    ``size`` counts the unstuffed octets written to the sink, line ends as
    sent.  When ``ok`` is False the sink contains an incomplete or doubtful
    message that the caller must discard; ``error`` gives the reason
    and ``failure`` its kind.
    """

    msgnum: int
    ok: bool
    size: int
    error: str | None = None
    failure: RetrFailure | None = None


@dataclass
class _BodyOutcome:
    size: int = 0
    defect: str | None = None
    failure: RetrFailure | None = None


@dataclass(frozen=True)
class _Deadline:
    """When a reply must be complete (``time.monotonic()``) and the seconds it had."""

    at: float
    seconds: float
    what: str


class _DiscardingSink:
    def write(self, data: bytes) -> int:
        return len(data)
