"""The interoperability matrix: its sections, their rows and columns, and result records.

Each interop test records one :class:`PairResult` as a JSON file in the
results folder (``MAILFEED_INTEROP_RESULTS``, by default ``build/interop``
in the checkout).  ``tests/peers/interop_report.py`` turns the folder into
docs/interop.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.support import ROOT

RESULTS_ENV = "MAILFEED_INTEROP_RESULTS"
DEFAULT_RESULTS = ROOT / "build" / "interop"


@dataclass(frozen=True)
class Section:
    """One table of the matrix: a row per server or path, a column per client or target."""

    key: str
    title: str
    row_label: str
    column_label: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    description: str


POP3 = Section(
    "pop3", "POP3 servers and clients", "server", "client",
    ("mailfeed mx", "Dovecot"),
    ("mailfeed fetch", "fetchmail", "getmail6", "mpop", "Python poplib"),
    "The client drains a mailbox of real corpus messages stored with their block. "
    "Each retrieved message must equal the stored block and message after line ends "
    "are normalised to CRLF and the header lines the client adds itself are removed. "
    "mailfeed fetch instead delivers each message, without its block, to one Maildir "
    "per envelope recipient, where each copy must start with the Return-Path of its "
    "envelope sender and the Delivered-To of its recipient. The mailbox must be "
    "empty afterwards.",
)
MX = Section(
    "mx", "MX delivery into the spool", "path", "spool",
    ("mailfeed mx SMTP", "Postfix + mailfeed-fwd"),
    ("Maildir", "mbox", "dovecot-lda"),
    "A message to several recipients (one of them in no header field) and a message "
    "with the null sender are sent over SMTP. Each must arrive in the site's spool "
    "once, with a block naming the sender and every recipient, followed by the MTA's "
    "Received field and the original message.",
)
SITE = Section(
    "site", "Site delivery after mailfeed fetch", "path", "target",
    ("mailfeed mx POP3 + mailfeed fetch",),
    ("SMTP to Postfix", "LMTP to Dovecot", "sendmail via Postfix", "Maildir"),
    "mailfeed fetch drains the mailbox of mailfeed mx and re-injects each message. "
    "Each final mailbox must hold the original bytes (after the trace fields of the "
    "MX and of the local MTA), and the Return-Path and Delivered-To fields of the "
    "local MTA, or of the Maildir target, must match the original envelope.",
)
SECTIONS = (POP3, MX, SITE)


@dataclass(frozen=True)
class PairResult:
    section: str
    row: str
    column: str
    outcome: str  # "passed", "failed", "skipped" or "peer changes bytes"
    detail: str
    notes: str
    test: str
    finished: float
    versions: dict[str, str]


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)


def result_file(section: str, row: str, column: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{section} {row} {column}".lower()).strip("-")
    return results_dir() / f"{slug}.json"


def write_result(result: PairResult) -> None:
    path = result_file(result.section, result.row, result.column)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result), indent=1) + "\n")
    tmp.replace(path)


def read_results(folder: Path) -> list[PairResult]:
    return [PairResult(**json.loads(path.read_text())) for path in sorted(folder.glob("*.json"))]


# Version commands of the peers; each prints its version on its first line.
VERSION_COMMANDS = {
    "Postfix": ["postconf", "-d", "mail_version"],
    "Dovecot": ["dovecot", "--version"],
    "fetchmail": ["fetchmail", "--version"],
    "getmail6": ["getmail", "--version"],
    "mpop": ["mpop", "--version"],
}


def peer_versions() -> dict[str, str]:
    """Return the first line of each peer's version output, or why it is missing."""
    versions = {}
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])
    for name, argv in VERSION_COMMANDS.items():
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                                 env={**os.environ, "PATH": path})
        except (OSError, subprocess.TimeoutExpired) as exc:
            versions[name] = f"not available ({exc})"
            continue
        lines = [line for line in (out.stdout + out.stderr).splitlines()
                 if line.strip() and "Running as root is discouraged" not in line]
        versions[name] = lines[0].strip() if lines else f"no output (exit {out.returncode})"
    return versions
