"""Exceptions and their sysexits(3) exit codes.

Programs that an MTA runs (mailfeed-fwd, mailfeed-rmail) report their outcome
as a sysexits code, because the MTA decides from it whether to retry or to
bounce.  Postfix pipe(8) retries on 75 (EX_TEMPFAIL) and bounces on anything
other than 0, 71 and 75, so an unexpected failure must map to 75, never to 1.

Every exception that ends such a program derives from :class:`MailfeedError`
and carries its exit code; :func:`exit_code_for` is the one place where any
exception, ours or not, becomes an exit code.

:func:`classify_exit_status` is the other direction: the one rule by which
mailfeed judges the exit status of a child it runs (a delivery agent of the
pipe spool, the sendmail delivery target).
"""

from __future__ import annotations

import enum
import errno

__all__ = [
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_NOPERM",
    "EX_NOUSER",
    "EX_OK",
    "EX_OSERR",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "ChildStatus",
    "ConfigError",
    "DataError",
    "MailfeedError",
    "NotPermitted",
    "PermanentError",
    "TempFailure",
    "UnknownSite",
    "UsageError",
    "classify_exit_status",
    "describe",
    "exit_code_for",
]

# sysexits.h values.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# sysexits(3) codes run from EX__BASE (64) to EX__MAX (78).
SYSEXITS = range(64, 79)
# The sysexits codes that Postfix's sys_exits table (global/sys_exits.c) gives
# a 4.x.x status, so its delivery agents retry them: EX_OSERR and EX_TEMPFAIL.
TEMPORARY_SYSEXITS = frozenset({EX_OSERR, EX_TEMPFAIL})

# errno values that a later retry may clear: the MTA keeps the message queued.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EAGAIN,
        errno.EINTR,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EROFS,
    }
)


class MailfeedError(Exception):
    """Base of mailfeed's errors; ``exit_code`` is the sysexits value."""

    exit_code = EX_TEMPFAIL


class TempFailure(MailfeedError):
    """A failure that a retry may clear: disk full, I/O error, lock timeout."""

    exit_code = EX_TEMPFAIL


class PermanentError(MailfeedError):
    """A failure that a retry will not clear."""

    exit_code = EX_UNAVAILABLE


class DataError(MailfeedError):
    """Invalid input data: a bad address, a malformed block or message."""

    exit_code = EX_DATAERR


class UnknownSite(MailfeedError):
    """The site named on the command line is not configured."""

    exit_code = EX_NOUSER


class UsageError(MailfeedError):
    """Invalid command-line usage."""

    exit_code = EX_USAGE


class NotPermitted(MailfeedError):
    """The program runs with privileges it must not have (for example as root)."""

    exit_code = EX_NOPERM


class ConfigError(MailfeedError):
    """Invalid or unreadable configuration."""

    exit_code = EX_CONFIG


class ChildStatus(enum.Enum):
    """What a child's exit status means for the message it was given."""

    OK = "ok"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


def classify_exit_status(status: int) -> ChildStatus:
    """Classify a child's exit status as ``subprocess`` reports it.

    * 0: OK;
    * negative (death by signal ``-status``): TEMPORARY, the child may have
      been killed by the OOM killer or a shutdown;
    * EX_OSERR (71) and EX_TEMPFAIL (75): TEMPORARY, as in Postfix and sendmail;
    * any other sysexits code (64 to 78): PERMANENT, the child said why;
    * any other status, such as 1 from a crash or a shell error: TEMPORARY.
      Postfix bounces on such a status; mailfeed keeps the message instead,
      because a status that names no reason is no proof that a retry fails.
    """
    if status == EX_OK:
        return ChildStatus.OK
    if status < 0 or status in TEMPORARY_SYSEXITS or status not in SYSEXITS:
        return ChildStatus.TEMPORARY
    return ChildStatus.PERMANENT


def exit_code_for(exc: BaseException) -> int:
    """Map any exception to the sysexits code the calling MTA should see.

    Unknown exceptions are treated as transient, so the MTA keeps the mail.
    """
    if isinstance(exc, MailfeedError):
        return exc.exit_code
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return EX_TEMPFAIL
    return EX_TEMPFAIL


def describe(exc: BaseException) -> str:
    """Return one line for an error message: the error and the value it names.

    An exception that is neither ours nor an OSError is marked as an internal
    error, so a bug is not mistaken for bad input.
    """
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    else:
        text = str(exc) or type(exc).__name__
    if not isinstance(exc, (OSError, MailfeedError)):
        text = f"internal error: {type(exc).__name__}: {text}"
    return " ".join(text.split())
