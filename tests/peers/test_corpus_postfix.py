"""The whole corpus through real peers: Dovecot POP3, ``mailfeed fetch``, Postfix.

Every corpus message is stored in a Maildir spool that Dovecot serves over
POP3, with an envelope of 1 to 3 recipients in two domains of the site
Postfix (some with the null sender, some recipients named in no header).
One run of ``mailfeed fetch`` drains the spool and re-injects each message
over SMTP into Postfix, which delivers it into per-domain Maildirs.

Each recipient must then hold exactly its messages, once each.  A delivered
file must be Postfix's trace fields (Return-Path with the envelope sender,
X-Original-To, Delivered-To, Received) followed by the original message in
delivered form, which the test derives from the corpus file like this and
in no other way:

* a final LF is added to the spooled copy when missing, as an MTA does
  (see :func:`as_handed_over`);
* a leading mbox ``From `` line is dropped (the spool drops it);
* every CRLF and every bare CR becomes LF, and a final LF is added when
  missing (mailfeed sends CRLF over SMTP, Postfix stores LF);
* every Bcc, Content-Length, Resent-Bcc and Return-Path field of the header
  section is removed (Postfix's default ``message_drop_headers``);
* where the header section ends at a line that is neither a header field
  nor empty, an empty line is inserted before it (cleanup(8) does this).

The re-injection listener must not rewrite header addresses or add a
Message-Id: docs/examples/postfix-site/master.cf sets
``local_header_rewrite_clients`` empty for it.

Lines over 998 octets and 8-bit octets are compared as they are.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailfeed.config import Limits, SiteConfig
from mailfeed.envelope import Envelope
from mailfeed.spool import store_message
from tests.peers.dovecot import SpoolDovecot
from tests.peers.mailflow import maildir_files
from tests.peers.postfix import SitePostfix, wait_until
from tests.support import ROOT, chown_tree, need_corpus, script, shared_tmpdir

pytestmark = [pytest.mark.peer, pytest.mark.slow]

# The Dovecot POP3 user whose spool this test fills (one of HAND_FILLED_USERS).
POP3_USER = "hand5"
SENDERS = ("news@list.corpus.test", "someone@elsewhere.corpus.test")
# One message in NULL_SENDER_EVERY goes with the null sender, as bounces do.
NULL_SENDER_EVERY = 5
# One message in HIDDEN_EVERY has a recipient that no header field names.
HIDDEN_EVERY = 3
LOCAL_PARTS = ("alice", "bob", "carol")
FETCH_TIMEOUT = 900.0
DELIVERY_TIMEOUT = 600.0
LINE_END = re.compile(rb"\r\n|\r|\n")
# The first line of a header field as Postfix's is_header() matches it: a name
# of printable octets other than colon, optional blanks, then a colon.
HEADER_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
POSTFIX_TRACE = ("return-path", "x-original-to", "delivered-to", "received")
# Postfix's default message_drop_headers: cleanup(8) removes these fields.
DROPPED_FIELDS = frozenset({"bcc", "content-length", "resent-bcc", "return-path"})


@dataclass(frozen=True)
class Planned:
    """One corpus message and the envelope it is spooled with."""

    name: str
    envelope: Envelope


def as_handed_over(raw: bytes) -> bytes:
    """Return the corpus file as handed to the spool: unchanged.

    Four corpus files (CR-only line ends) end without a line end.  Dovecot
    appends CRLF on RETR that its LIST size leaves out, which the client
    must accept for these messages to be fetched at all.
    """
    return raw


def delivered_form(raw: bytes) -> bytes:
    """Return the corpus file as Postfix stores it after re-injection (see the module docstring)."""
    if raw.startswith(b"From "):
        raw = raw[raw.index(b"\n") + 1:] if b"\n" in raw else b""
    text = LINE_END.sub(b"\n", raw)
    if not text.endswith(b"\n"):
        text += b"\n"
    return drop_fields(text)


def split_field(data: bytes) -> tuple[bytes, bytes]:
    """Split off the first header field with its continuation lines (LF line ends)."""
    position = 0
    while True:
        end = data.find(b"\n", position)
        if end < 0:
            return data, b""
        position = end + 1
        if data[position:position + 1] not in (b" ", b"\t"):
            return data[:position], data[position:]


def field_name(raw: bytes) -> str:
    return raw.split(b":", 1)[0].decode("ascii", "replace").strip().lower()


def drop_fields(text: bytes) -> bytes:
    """Apply cleanup(8)'s header changes to an LF message.

    Remove every field of DROPPED_FIELDS from the header section, and end
    the header section with an empty line where a line that is no header
    field (and not empty) ends it, as Postfix does.
    """
    kept = []
    rest = text
    while rest and not rest.startswith(b"\n"):
        if not HEADER_FIELD.match(rest):
            kept.append(b"\n")
            break
        raw, rest = split_field(rest)
        if field_name(raw) not in DROPPED_FIELDS:
            kept.append(raw)
    return b"".join(kept) + rest


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hidden_local(message: bytes, index: int) -> str:
    """Return a local part that occurs nowhere in the message."""
    local = f"hidden{index}"
    lowered = message.lower()
    while local.encode() in lowered:
        local += "x"
    return local


def plan(files: list[Path], domains: tuple[str, str]) -> list[Planned]:
    """Give each corpus file an envelope: 1-3 recipients, some null senders, some hidden."""
    planned = []
    for index, path in enumerate(files):
        count = 1 + index % 3
        rcpts = [f"{LOCAL_PARTS[(index + k) % 3]}@{domains[(index + k) % 2]}"
                 for k in range(count)]
        if index % HIDDEN_EVERY == 0:
            rcpts[-1] = f"{hidden_local(path.read_bytes(), index)}@{domains[index % 2]}"
        sender = "" if index % NULL_SENDER_EVERY == 0 else SENDERS[index % 2]
        planned.append(Planned(path.name, Envelope(sender, tuple(rcpts))))
    return planned


def peel_trace(data: bytes) -> tuple[dict[str, bytes], bytes]:
    """Split off Postfix's four trace fields; return them by name and the rest."""
    fields: dict[str, bytes] = {}
    rest = data
    for name in POSTFIX_TRACE:
        raw, rest = split_field(rest)
        assert field_name(raw) == name, f"expected {name}, found {raw[:200]!r}"
        fields[name] = raw
    return fields, rest


def field_value(raw: bytes) -> str:
    return raw.split(b":", 1)[1].decode("utf-8", "replace").strip()


def common_prefix_length(first: bytes, second: bytes) -> int:
    """Return how many leading octets ``first`` and ``second`` share."""
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return index
    return min(len(first), len(second))


def first_difference(original: Path, candidates: list[Path], context: int = 80) -> str:
    """Describe where the closest delivered copy first differs from ``original``."""
    want = delivered_form(as_handed_over(original.read_bytes()))
    best, offset = b"", -1
    for path in candidates:
        _fields, rest = peel_trace(path.read_bytes())
        same = common_prefix_length(rest, want)
        if same > offset:
            best, offset = rest, same
    if offset < 0:
        return ""
    start = max(0, offset - context)
    return (f" at octet {offset}:\n  got      {best[start:offset + context]!r}"
            f"\n  expected {want[start:offset + context]!r}")


@pytest.fixture
def work() -> Iterator[Path]:
    path = shared_tmpdir("mailfeed-corpus-postfix-")
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def write_fetch_config(work: Path, port: int, password: str, domains: tuple[str, str],
                       reinject_port: int) -> Path:
    secret = work / "pop3.pass"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    config = work / "fetch.toml"
    config.write_text(f"""\
state = "{work / 'state.sqlite'}"
quarantine = "{work / 'quarantine'}"
local_domains = ["{domains[0]}", "{domains[1]}"]
delivery = "smtp://127.0.0.1:{reinject_port}"
dsn_reporting_mta = "site.corpus.test"

[[source]]
name = "mx"
host = "127.0.0.1"
port = {port}
tls = "none"
user = "{POP3_USER}"
password_file = "{secret}"
""")
    config.chmod(0o600)
    return config


def test_whole_corpus_dovecot_fetch_postfix(dovecot_spool: SpoolDovecot,
                                            postfix_site: SitePostfix, work: Path) -> None:
    files = need_corpus()
    domains = (postfix_site.new_domain(), postfix_site.new_domain())
    planned = plan(files, domains)
    started = time.monotonic()

    spool = dovecot_spool.spool_root / POP3_USER
    site = SiteConfig(POP3_USER, "maildir", spool, domains)
    expected: dict[str, Counter[tuple[str, str]]] = {}
    names_by_digest: dict[str, str] = {}
    for item in planned:
        raw = as_handed_over((files[0].parent / item.name).read_bytes())
        store_message(site, item.envelope, io.BytesIO(raw), Limits(max_message_size=0))
        want = digest(delivered_form(raw))
        names_by_digest[want] = item.name
        for rcpt in item.envelope.recipients:
            expected.setdefault(rcpt.lower(), Counter())[(item.envelope.sender, want)] += 1
    chown_tree(spool)
    copies = sum(sum(c.values()) for c in expected.values())
    stored_at = time.monotonic()

    config = write_fetch_config(work, dovecot_spool.instance.pop3_port,
                                dovecot_spool.password(POP3_USER), domains,
                                postfix_site.reinject_port)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([script("mailfeed"), "fetch", "--config", str(config)],
                            capture_output=True, env=env, timeout=FETCH_TIMEOUT, check=False)
    log = (result.stdout + result.stderr).decode(errors="replace")
    notable = "\n".join(line for line in log.splitlines() if " INFO " not in line)
    assert result.returncode == 0, f"mailfeed fetch exited with {result.returncode}:\n{notable}"
    fetched_at = time.monotonic()
    assert not maildir_files(spool), "the Dovecot spool is not empty after the fetch"

    maildirs = [postfix_site.maildir(f"x@{domain}") for domain in domains]

    def all_delivered() -> list[Path] | None:
        found = [path for folder in maildirs for path in maildir_files(folder)]
        return found if len(found) >= copies else None

    delivered = wait_until(all_delivered, timeout=DELIVERY_TIMEOUT,
                           what=f"{copies} delivered copies",
                           diagnostics=postfix_site.instance.log_tail)
    delivered_at = time.monotonic()

    got: dict[str, Counter[tuple[str, str]]] = {}
    bodies: dict[str, Path] = {}
    problems: list[str] = []
    for path in delivered:
        fields, rest = peel_trace(path.read_bytes())
        rcpt = field_value(fields["delivered-to"]).lower()
        if field_value(fields["x-original-to"]).lower() != rcpt:
            problems.append(f"{path.name}: X-Original-To differs from Delivered-To")
        if b"(Postfix)" not in fields["received"]:
            problems.append(f"{path.name}: the Received field is not Postfix's")
        sender = field_value(fields["return-path"])
        assert sender.startswith("<"), fields["return-path"]
        assert sender.endswith(">"), fields["return-path"]
        key = digest(rest)
        bodies.setdefault(key, path)
        got.setdefault(rcpt, Counter())[(sender[1:-1], key)] += 1

    assert sorted(got) == sorted(expected)
    for rcpt, want in expected.items():
        missing = want - got[rcpt]
        extra = got[rcpt] - want
        for sender, key in missing.elements():
            name = names_by_digest[key]
            problems.append(f"{rcpt}: {name} from <{sender}> missing or changed"
                            + first_difference(files[0].parent / name,
                                               [bodies[k] for _s, k in extra]))
        if extra:
            problems.append(f"{rcpt}: {sum(extra.values())} unexpected copies")
    print(f"\n{len(planned)} messages, {copies} copies to {len(expected)} recipients; "
          f"spool {stored_at - started:.1f} s, fetch {fetched_at - stored_at:.1f} s, "
          f"Postfix done {delivered_at - fetched_at:.1f} s later")
    assert not problems, "\n".join(problems[:40])
