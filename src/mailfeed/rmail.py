"""mailfeed-rmail: deliver one message that starts with an envelope block.

Usage::

    mailfeed-rmail [--target URL] [--quarantine DIR] [--max-recipients N]
                   [--allow-above FIELD]... [--timeout S] [FILE]

The input (FILE, or stdin when FILE is absent or "-") is copied to a
temporary file in chunks, so memory use does not grow with the message.  The
block is read with :func:`mailfeed.envelope.read_block`, and the rest is
delivered unchanged except for line ends, through the target named by
``--target`` or ``$MAILFEED_TARGET`` (see :func:`mailfeed.delivery.target_from_url`).

Exit status (sysexits, mapped in :func:`mailfeed.errors.exit_code_for`):

* 0 (EX_OK): every recipient delivered.
* 75 (EX_TEMPFAIL): a recipient deferred, or any unexpected error.
* 65 (EX_DATAERR): missing or malformed block; nothing is delivered.
* 69 (EX_UNAVAILABLE): a recipient failed permanently, none deferred.
* 64 (EX_USAGE): invalid command line or no target.
* 78 (EX_CONFIG): invalid target URL.

With ``--quarantine DIR``, a message whose block is malformed is also kept
as ``DIR/<time>.<pid>.<random>.eml`` (the input exactly as received), next
to ``<same name>.reason`` holding the defect ("line N: reason").  Both are
written durably; if that fails the exit status is 75 so the caller keeps
the message.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NoReturn

from mailfeed import __version__
from mailfeed.delivery import (
    CHUNK_SIZE,
    DEFAULT_TIMEOUT,
    Outcome,
    RecipientResult,
    target_from_url,
)
from mailfeed.durable import fsync_dir
from mailfeed.envelope import DEFAULT_MAX_RECIPIENTS, BlockDefect, read_block
from mailfeed.errors import (
    EX_OK,
    DataError,
    PermanentError,
    TempFailure,
    UsageError,
    describe,
    exit_code_for,
)

__all__ = ["TARGET_ENV", "main"]

PROG = "mailfeed-rmail"
# Environment variable naming the target when --target is not given.
TARGET_ENV = "MAILFEED_TARGET"

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {PROG} --help)")


def _seconds(text: str) -> float:
    """Parse a timeout: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"timeout {text!r} must be a number of seconds above 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Deliver one message that starts with a mailfeed envelope block.",
    )
    parser.add_argument(
        "--target",
        help=f"delivery target URL (smtp://HOST:PORT, lmtp://HOST:PORT, lmtp:/socket, "
        f"sendmail[:/path], maildir:/root); default ${TARGET_ENV}",
    )
    parser.add_argument(
        "--quarantine",
        metavar="DIR",
        help="keep a copy of a message with a malformed block in DIR, with the reason "
        "in NAME.reason next to it",
    )
    parser.add_argument(
        "--max-recipients",
        type=int,
        default=DEFAULT_MAX_RECIPIENTS,
        metavar="N",
        help=f"reject a block announcing more than N recipients (default {DEFAULT_MAX_RECIPIENTS})",
    )
    parser.add_argument(
        "--allow-above",
        action="append",
        default=[],
        metavar="FIELD",
        help="a header field (such as Return-Path) that a POP3 client or LDA may have "
        "put above the block; repeat for several",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"network and program timeout in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("file", nargs="?", default="-", metavar="FILE",
                        help="the message; stdin when absent or -")
    return parser


def _copy_input(name: str, spool: BinaryIO) -> None:
    if name == "-":
        if sys.stdin is None:
            raise TempFailure(
                "standard input is not open: pass the message on standard input or as FILE"
            )
        shutil.copyfileobj(sys.stdin.buffer, spool, CHUNK_SIZE)
        return
    with open(name, "rb") as source:
        shutil.copyfileobj(source, spool, CHUNK_SIZE)


def _write_durably(folder: Path, name: str, source: BinaryIO) -> Path:
    """Write ``source`` to ``folder/name`` via a hidden temporary file and rename."""
    final = folder / name
    partial = folder / f".{name}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(partial, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK_SIZE)
            out.flush()
            os.fsync(out.fileno())
        os.rename(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return final


def quarantine(folder: Path, message: BinaryIO, defect: BlockDefect) -> Path:
    """Keep the whole input and its defect in ``folder``; return the message path.

    Raise TempFailure naming the folder when the copy cannot be written.
    """
    stem = f"{int(time.time())}.{os.getpid()}.{secrets.token_hex(6)}"
    message.seek(0)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = _write_durably(folder, f"{stem}.eml", message)
        reason = f"line {defect.line}: {defect.reason}\n".encode()
        _write_durably(folder, f"{stem}.reason", io.BytesIO(reason))
        fsync_dir(folder)
    except OSError as exc:
        raise TempFailure(
            f"malformed block (line {defect.line}: {defect.reason}) and no copy kept: "
            f"cannot write to quarantine folder {folder}: {exc.strerror}; nothing delivered"
        ) from None
    return path


def _report(results: list[RecipientResult]) -> None:
    for result in results:
        if result.outcome is Outcome.DELIVERED:
            log.info("delivered to <%s>: %s", result.recipient, result.text)
        else:
            log.warning(
                "%s for <%s>: %d %s",
                result.outcome.value,
                result.recipient,
                result.code,
                result.text,
            )


def _raise_for(results: list[RecipientResult]) -> None:
    deferred = [r.recipient for r in results if r.outcome is Outcome.DEFERRED]
    failed = [r.recipient for r in results if r.outcome is Outcome.FAILED]
    if deferred:
        raise TempFailure(f"delivery deferred for {', '.join(deferred)}")
    if failed:
        raise PermanentError(f"delivery failed permanently for {', '.join(failed)}")


def run(argv: Sequence[str] | None) -> None:
    """Deliver one message as the command line says; raise on any non-success."""
    args = _parser().parse_args(argv)
    url = args.target or os.environ.get(TARGET_ENV)
    if not url:
        raise UsageError(f"no delivery target: pass --target URL or set ${TARGET_ENV}")
    if args.max_recipients < 1:
        raise UsageError(f"--max-recipients must be at least 1, not {args.max_recipients}")
    target = target_from_url(url, timeout=args.timeout)
    allowed = frozenset(name.lower().rstrip(":") for name in args.allow_above)

    with tempfile.TemporaryFile() as spool:
        _copy_input(args.file, spool)
        spool.seek(0)
        try:
            block = read_block(spool, max_recipients=args.max_recipients, allowed_above=allowed)
        except BlockDefect as defect:
            where = ""
            if args.quarantine:
                path = quarantine(Path(args.quarantine), spool, defect)
                where = f"; copy kept in {path}"
            raise DataError(
                f"malformed block: line {defect.line}: {defect.reason}; nothing delivered{where}"
            ) from None
        envelope = block.envelope
        log.info(
            "delivering from <%s> to %d recipients via %s",
            envelope.sender,
            len(envelope.recipients),
            url,
        )
        results = target.deliver(envelope, spool)
    _report(results)
    _raise_for(results)


def main(argv: Sequence[str] | None = None) -> int:
    """Run mailfeed-rmail and return its sysexits exit status."""
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s", stream=sys.stderr)
    try:
        run(argv)
    except SystemExit as exc:
        # argparse exits 0 after --help.
        return exc.code if isinstance(exc.code, int) else EX_OK
    except BaseException as exc:
        # Every failure, including an unexpected one, becomes one line and a
        # sysexits code; a traceback would only reach the calling MTA's log.
        code = exit_code_for(exc)
        log.error("%s", describe(exc))
        return code
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
