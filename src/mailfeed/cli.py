"""The ``mailfeed`` command: a table of subcommands, each in its own module.

A subcommand module provides two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

and is registered with one line in :data:`SUBCOMMANDS`.  Only the chosen
subcommand's module is imported, so ``mailfeed site list`` never loads the
SMTP or POP3 servers.  A :class:`~mailfeed.errors.MailfeedError` that reaches
this level is printed as one line and becomes its sysexits code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mailfeed.errors import EX_USAGE, MailfeedError

__all__ = ["SUBCOMMANDS", "Subcommand", "main"]


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: the module that implements it and a one-line summary."""

    module: str
    summary: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "mx": Subcommand("mailfeed.mx", "run the MX daemon: SMTP in, POP3 out"),
    "site": Subcommand("mailfeed.sitecmd", "add or list the MX host's sites"),
    "fetch": Subcommand("mailfeed.fetchcmd", "drain a POP3 mailbox into the local MTA"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: mailfeed [--version] COMMAND [ARGS...]", "", "commands:"]
    for name, sub in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}  {sub.summary}")
    lines.append("")
    lines.append("Run 'mailfeed COMMAND --help' for the options of one command.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mailfeed`` command line; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EX_USAGE
    if args[0] == "--version":
        from mailfeed import __version__

        print(f"mailfeed {__version__}")
        return 0
    name, rest = args[0], args[1:]
    sub = SUBCOMMANDS.get(name)
    if sub is None:
        print(f"mailfeed: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EX_USAGE
    try:
        module = importlib.import_module(sub.module)
    except ModuleNotFoundError as exc:
        if exc.name != sub.module:
            raise
        print(f"mailfeed: command {name!r} is not installed ({sub.module})", file=sys.stderr)
        return EX_USAGE

    parser = argparse.ArgumentParser(prog=f"mailfeed {name}", description=sub.summary)
    module.add_arguments(parser)
    try:
        options = parser.parse_args(rest)
    except SystemExit as exc:
        # argparse exits 2 on a usage error; sysexits calls that EX_USAGE.
        return EX_USAGE if exc.code not in (0, None) else 0
    try:
        return int(module.run(options))
    except MailfeedError as exc:
        print(f"mailfeed {name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
