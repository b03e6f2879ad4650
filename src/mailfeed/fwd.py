"""mailfeed-fwd: store one message from the MTA in a site's spool.

Usage::

    mailfeed-fwd [--config FILE] [--] SITE SENDER RCPT...

The MTA (for example Postfix pipe(8) with ``argv=mailfeed-fwd site1
${sender} ${recipient}``) passes the envelope as arguments and the message
on standard input.  An empty SENDER or ``<>`` is the null sender, and any
address may be given in angle brackets.  The configuration is FILE, else
``$MAILFEED_CONFIG``, else ``/etc/mailfeed/mx.toml``.

Exit status (sysexits(3)), mapped from exceptions only in
:func:`mailfeed.errors.exit_code_for`:

* 0 stored;
* 64 (EX_USAGE) invalid arguments;
* 65 (EX_DATAERR) invalid address, too many recipients, message too large;
* 67 (EX_NOUSER) invalid or unknown site name;
* 77 (EX_NOPERM) run as root (the MTA must run it as an unprivileged user);
* 78 (EX_CONFIG) missing or invalid configuration;
* 75 (EX_TEMPFAIL) everything else: disk full, I/O error, lock timeout, the
  deadline (``limits.deadline``), SIGTERM, SIGINT or SIGHUP, standard input
  not open, or an unexpected error.  Never 1, because an MTA bounces mail on
  an unknown status.

A stop signal or the deadline raises an exception inside the spool writer,
which removes what it wrote, so nothing partial stays behind.  Once the
message is stored, the stop signals are ignored.

Every failure prints one line on standard error naming the value at fault.
One process runs per message, so this module imports only what it needs:
no ``email``, no ``asyncio``, no ``argparse``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import BinaryIO

from mailfeed.envelope import Envelope, InvalidAddress, validate_address
from mailfeed.errors import (
    EX_OK,
    DataError,
    NotPermitted,
    TempFailure,
    UsageError,
    describe,
    exit_code_for,
)

__all__ = ["PROG", "USAGE", "main", "parse_args", "parse_envelope"]

PROG = "mailfeed-fwd"
USAGE = f"usage: {PROG} [--config FILE] [--] SITE SENDER RCPT..."
HELP = f"""{USAGE}

Store the message on standard input, with an envelope block for SENDER and
the RCPTs, in the spool of SITE.  An empty SENDER or <> is the null sender.

  --config FILE  configuration file (default: $MAILFEED_CONFIG, else
                 /etc/mailfeed/mx.toml)
  --version      print the program name and version, then exit
"""
# Octets of standard input buffered per read.
STDIN_BUFFER = 64 * 1024
# Signals that stop a delivery: each one makes fwd undo the write and exit 75.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Args:
    """Parsed command line."""

    def __init__(self, config: str | None, site: str, sender: str, recipients: list[str]):
        self.config = config
        self.site = site
        self.sender = sender
        self.recipients = recipients


def parse_args(argv: Sequence[str]) -> Args | str:
    """Parse the arguments; return the text to print for ``--help`` or ``--version``.

    Raise UsageError if the arguments are invalid.
    """
    config: str | None = None
    positional: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if positional or arg == "" or not arg.startswith("-"):
            positional.append(arg)
        elif arg == "--":
            positional.extend(argv[index:])
            break
        elif arg in ("-h", "--help"):
            return HELP
        elif arg == "--version":
            from mailfeed import __version__

            return f"{PROG} {__version__}\n"
        elif arg == "--config":
            if index >= len(argv):
                raise UsageError(f"option --config needs a FILE; {USAGE}")
            config = argv[index]
            index += 1
        elif arg.startswith("--config="):
            config = arg[len("--config=") :]
        else:
            raise UsageError(f"unknown option {arg!r}; {USAGE}")
    if len(positional) < 3:
        raise UsageError(f"expected SITE, SENDER and at least one RCPT; {USAGE}")
    return Args(config, positional[0], positional[1], positional[2:])


def _strip_brackets(value: str) -> str:
    if len(value) >= 2 and value[0] == "<" and value[-1] == ">":
        return value[1:-1]
    return value


def parse_envelope(sender: str, recipients: Sequence[str]) -> Envelope:
    """Build the envelope from command-line addresses; raise DataError naming a bad one."""
    sender = "" if sender in ("", "<>") else _strip_brackets(sender)
    try:
        validate_address(sender, allow_null=True)
    except InvalidAddress as exc:
        raise DataError(f"invalid sender: {exc}") from None
    rcpts: list[str] = []
    for rcpt in recipients:
        bare = _strip_brackets(rcpt)
        try:
            rcpts.append(validate_address(bare))
        except InvalidAddress as exc:
            raise DataError(f"invalid recipient {rcpt!r}: {exc}") from None
    return Envelope(sender, tuple(rcpts))


def _on_deadline(deadline: float) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise TempFailure(f"deadline of {deadline:g} s (limits.deadline) passed; nothing stored")

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, deadline)


def _on_stop_signals() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        raise TempFailure(f"stopped by {name} before the message was stored; nothing stored")

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _run(argv: Sequence[str]) -> int:
    _on_stop_signals()
    args = parse_args(argv)
    if isinstance(args, str):
        sys.stdout.write(args)
        return EX_OK
    if os.geteuid() == 0:
        raise NotPermitted(
            f"{PROG} must not run as root; let the MTA run it as the spool's owner"
        )

    from mailfeed.config import config_path, load_mx_spool_config, validate_site_name

    validate_site_name(args.site)
    envelope = parse_envelope(args.sender, args.recipients)
    config = load_mx_spool_config(config_path(args.config))
    site = config.site(args.site)

    _on_deadline(config.limits.deadline)
    try:
        from mailfeed.spool import store_message

        with _open_stdin() as stdin:
            store_message(site, envelope, stdin, config.limits)
        # Stored: a signal now must not turn success into a retry (a duplicate).
        _ignore_stop_signals()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return EX_OK


def _open_stdin() -> BinaryIO:
    try:
        return open(0, "rb", buffering=STDIN_BUFFER, closefd=False)
    except OSError as exc:
        raise TempFailure(
            f"standard input is not open ({exc.strerror}): the MTA must pass the message "
            "on standard input"
        ) from None


def _report(text: str) -> None:
    # With standard error closed there is nowhere to report: the exit status still tells.
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f"{PROG}: {text}\n")
            sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run mailfeed-fwd and return its exit status."""
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except BaseException as exc:
        # Every failure, including an unexpected one, becomes a sysexits code.
        code = exit_code_for(exc)
        text = describe(exc)
        if isinstance(exc, PermissionError):
            text += f"; {PROG} runs as {_user()}: make the spool writable by that user"
        _report(text)
        return code


def _user() -> str:
    """Describe the effective user, for permission errors."""
    import pwd

    uid, gid = os.geteuid(), os.getegid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    return f"user {name} (uid {uid}, gid {gid})"


if __name__ == "__main__":
    sys.exit(main())
