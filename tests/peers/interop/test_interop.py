"""The interop matrix: mailfeed against Postfix, Dovecot, fetchmail, getmail6 and mpop.

One test per pair of :mod:`tests.peers.interop.matrix`; each records its
result for docs/interop.md.  Messages are real corpus messages, submitted or
stored as an MTA receives them (mbox ``From `` line dropped, CRLF line ends).
Retrieved and delivered bytes are compared after normalising line ends to
CRLF, because every Maildir writer here stores LF, and after removing exactly
the header fields that the peer adds itself.
"""

from __future__ import annotations

import io
import os
import poplib
import re
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailfeed.config import Limits, SiteConfig
from mailfeed.envelope import Envelope, parse_block
from mailfeed.spool import store_message
from tests.peers.dovecot import SiteDovecot, SpoolDovecot
from tests.peers.interop.conftest import (
    LDA_USER,
    MX_HOSTNAME,
    Interop,
    MailfeedMx,
    site_domain,
)
from tests.peers.mailflow import maildir_files, wait_for_maildir
from tests.peers.postfix import MxPostfix, SitePostfix, wait_until
from tests.support import (
    CORPUS_DIR,
    ROOT,
    as_run_user,
    chown_tree,
    is_root,
    need,
    need_corpus,
    run_user_ids,
    shared_tmpdir,
)

pytestmark = pytest.mark.peer

SENDER = "alice@example.net"
LINE_END = re.compile(rb"\r\n|\r|\n")
CLIENT_TIMEOUT = 60
DELIVERY_TIMEOUT = 60.0
# The largest corpus message the POP3 tests use, to keep them quick.
MAX_POP3_MESSAGE = 200_000


# --- message helpers ----------------------------------------------------------


def as_received_by_mta(raw: bytes) -> bytes:
    """Drop an mbox ``From `` line and make every line end CRLF, with a final CRLF."""
    if raw.startswith(b"From "):
        end = LINE_END.search(raw)
        raw = raw[end.end():] if end else b""
    text = LINE_END.sub(b"\r\n", raw)
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def normalise(data: bytes) -> bytes:
    """Make every line end CRLF and add a final CRLF when missing."""
    text = LINE_END.sub(b"\r\n", data)
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def split_field(data: bytes) -> tuple[bytes, bytes]:
    """Split off the first header field with its continuation lines."""
    position = 0
    while True:
        end = LINE_END.search(data, position)
        if end is None:
            return data, b""
        position = end.end()
        if data[position:position + 1] not in (b" ", b"\t"):
            return data[:position], data[position:]


def field_name(raw: bytes) -> str:
    return raw.split(b":", 1)[0].decode("ascii", "replace").lower()


def field_value(raw: bytes) -> str:
    return LINE_END.sub(b" ", raw.split(b":", 1)[1]).decode("utf-8", "replace").strip()


def header_fields(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a message into its header fields and the rest (the empty line and body)."""
    fields = []
    rest = data
    while rest and not rest.startswith((b"\r\n", b"\n", b"\r")):
        raw, rest = split_field(rest)
        fields.append(raw)
    return fields, rest


def drop_fields(data: bytes, name: str) -> bytes:
    """Remove every header field called ``name`` (lower case) from a message."""
    fields, rest = header_fields(data)
    return b"".join(raw for raw in fields if field_name(raw) != name) + rest


def peel_until_mx(data: bytes, mx_marker: bytes) -> tuple[list[bytes], bytes, bytes]:
    """Remove the leading fields up to the MX's Received field (the first that has ``mx_marker``).

    Returns the fields above it, the MX's field and the rest of the message.
    """
    above: list[bytes] = []
    rest = data
    for _ in range(20):
        raw, rest = split_field(rest)
        if field_name(raw) == "received" and mx_marker in raw:
            return above, raw, rest
        above.append(raw)
    raise AssertionError(f"no Received field with {mx_marker!r} in {data[:600]!r}")


@dataclass(frozen=True)
class Corpus:
    """A few corpus messages with hard features: From_ line, bare CR, 8-bit, long lines."""

    messages: list[tuple[str, bytes]]

    def named(self, index: int) -> tuple[str, bytes]:
        return self.messages[index % len(self.messages)]


def pick_messages() -> list[tuple[str, bytes]]:
    files = need_corpus()
    sizes = sorted((path.stat().st_size, path) for path in files)
    wanted = [
        lambda raw: raw.startswith(b"From ") and re.search(rb"[\x80-\xff]", raw) is not None,
        lambda raw: re.search(rb"\r(?!\n)", raw) is not None,
        lambda raw: any(len(line) > 998 for line in LINE_END.split(raw)),
        lambda raw: re.search(rb"(?m)^\.", raw) is not None,
    ]
    chosen: list[tuple[str, bytes]] = []
    for test in wanted:
        for size, path in sizes:
            raw = path.read_bytes()
            if size <= MAX_POP3_MESSAGE and test(raw) and path.name not in dict(chosen):
                chosen.append((path.name, raw))
                break
    assert len(chosen) >= 3, f"the corpus in {CORPUS_DIR} lacks the wanted kinds of message"
    return chosen


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(pick_messages())


def hidden_recipient(domain: str, message: bytes) -> str:
    """A recipient address that occurs nowhere in the message, so no header names it."""
    local = "hidden"
    while local.encode() in message.lower():
        local += "x"
    return f"{local}@{domain}"


# --- POP3 servers and clients -------------------------------------------------


@dataclass
class Mailbox:
    """A filled POP3 mailbox: where it is served and what it holds."""

    port: int
    user: str
    password: str
    spool: Path
    stored: list[bytes]
    envelopes: list[Envelope]
    originals: list[bytes]


def fill_spool(site: SiteConfig, corpus: Corpus) -> tuple[list[bytes], list[Envelope], list[bytes]]:
    domain = site.domains[0]
    stored, envelopes, originals = [], [], []
    for index, (_name, raw) in enumerate(corpus.messages):
        original = as_received_by_mta(raw)
        sender = "" if index == 1 else SENDER
        rcpts = (f"bob@{domain}", hidden_recipient(domain, original))[: 1 + index % 2]
        envelope = Envelope(sender, tuple(rcpts))
        result = store_message(site, envelope, io.BytesIO(original), Limits())
        stored.append(Path(result.location).read_bytes())
        envelopes.append(envelope)
        originals.append(original)
    return stored, envelopes, originals


def spool_is_empty(spool: Path) -> bool:
    return not maildir_files(spool)


def mx_mailbox(mailfeed_mx: MailfeedMx, corpus: Corpus) -> Mailbox:
    site = mailfeed_mx.new_site()
    stored, envelopes, originals = fill_spool(site, corpus)
    return Mailbox(mailfeed_mx.pop3_port, site.name, mailfeed_mx.passwords[site.name],
                   site.path, stored, envelopes, originals)


_dovecot_users_used = 0


def dovecot_mailbox(dovecot: SpoolDovecot, corpus: Corpus) -> Mailbox:
    global _dovecot_users_used
    _dovecot_users_used += 1
    user = f"d{_dovecot_users_used:02d}"
    assert user != LDA_USER, "all Dovecot POP3 users are in use: add more"
    spool = dovecot.spool_root / user
    site = SiteConfig(user, "maildir", spool, (site_domain(user),))
    stored, envelopes, originals = fill_spool(site, corpus)
    chown_tree(spool)
    return Mailbox(dovecot.instance.pop3_port, user, dovecot.password(user), spool, stored,
                   envelopes, originals)


def run_as_user(argv: list[str], home: Path) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C"}
    try:
        return subprocess.run(as_run_user(argv), capture_output=True, env=env,
                              timeout=CLIENT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"") + (exc.stderr or b"")
        raise AssertionError(f"{argv[0]} timed out after {CLIENT_TIMEOUT} s; its output:\n"
                             f"{output.decode(errors='replace')}") from None


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    if is_root():
        os.chown(path, *run_user_ids())
    return path


def make_maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    chown_tree(path)
    return path


def retrieve_fetchmail(box: Mailbox, work: Path) -> tuple[list[bytes], str]:
    need("fetchmail", "safecat")
    maildir = make_maildir(work / "Maildir")
    rc = write_private(work / "fetchmailrc", f"""\
set no bouncemail
poll 127.0.0.1 service {box.port} protocol POP3
    user "{box.user}" there with password "{box.password}" is "mail" here
    sslproto '' no rewrite fetchall nokeep
    mda "/usr/bin/safecat {maildir}/tmp {maildir}/new"
""")
    result = run_as_user(["fetchmail", "-f", str(rc), "-i", str(work / "fetchids"),
                          "--pidfile", str(work / "fetchmail.pid"), "--nosyslog", "-N"], work)
    log = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"fetchmail exited with {result.returncode}:\n{log}"
    return [path.read_bytes() for path in maildir_files(maildir)], log


def retrieve_getmail(box: Mailbox, work: Path) -> tuple[list[bytes], str]:
    need("getmail")
    maildir = make_maildir(work / "Maildir")
    rc = write_private(work / "getmailrc", f"""\
[retriever]
type = SimplePOP3Retriever
server = 127.0.0.1
port = {box.port}
username = {box.user}
password = {box.password}

[destination]
type = Maildir
path = {maildir}/

[options]
delete = true
read_all = true
received = false
delivered_to = false
verbose = 0
""")
    result = run_as_user(["getmail", f"--rcfile={rc}", f"--getmaildir={work}"], work)
    log = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"getmail exited with {result.returncode}:\n{log}"
    return [path.read_bytes() for path in maildir_files(maildir)], log


def retrieve_mpop(box: Mailbox, work: Path) -> tuple[list[bytes], str]:
    need("mpop")
    maildir = make_maildir(work / "Maildir")
    rc = write_private(work / "mpoprc", f"""\
account default
host 127.0.0.1
port {box.port}
tls off
auth user
user {box.user}
password {box.password}
delivery maildir {maildir}
keep off
received_header off
uidls_file {work}/uidls
""")
    result = run_as_user(["mpop", "-C", str(rc), "-q"], work)
    log = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"mpop exited with {result.returncode}:\n{log}"
    return [path.read_bytes() for path in maildir_files(maildir)], log


def retrieve_poplib(box: Mailbox, _work: Path) -> tuple[list[bytes], str]:
    client = poplib.POP3("127.0.0.1", box.port, timeout=CLIENT_TIMEOUT)
    client.user(box.user)
    client.pass_(box.password)
    count, _size = client.stat()
    messages = []
    for number in range(1, count + 1):
        _status, lines, _octets = client.retr(number)
        messages.append(b"\r\n".join(lines) + b"\r\n")
        client.dele(number)
    client.quit()
    return messages, ""


RETRIEVERS = {
    "fetchmail": retrieve_fetchmail,
    "getmail6": retrieve_getmail,
    "mpop": retrieve_mpop,
    "Python poplib": retrieve_poplib,
}

def without_fetchmail_received(data: bytes) -> bytes:
    """Remove the one Received field fetchmail 6.4 inserts (it has no option to omit it)."""
    fields, rest = header_fields(data)
    ours = [raw for raw in fields if field_name(raw) == "received"
            and raw.startswith(b"Received: from 127.0.0.1 ") and b"with POP3 (fetchmail-" in raw]
    assert len(ours) == 1, f"fetchmail added {len(ours)} Received fields: {data[:400]!r}"
    return b"".join(raw for raw in fields if raw is not ours[0]) + rest


def as_getmail_writes(stored: bytes) -> bytes:
    """Return ``stored`` as getmail6 6.18 writes it to a Maildir.

    With received and delivered_to off, getmail6 still removes every
    Return-Path field and writes one on top: ``<address>`` from the first
    Return-Path field, else from Sender, else ``<unknown>``.
    """
    fields, _rest = header_fields(stored)
    values = {}
    for raw in fields:
        values.setdefault(field_name(raw), field_value(raw))
    address = values.get("return-path") or values.get("sender") or "unknown"
    address = address.strip().removeprefix("<").removesuffix(">")
    return f"Return-Path: <{address}>\r\n".encode() + drop_fields(stored, "return-path")


def unfold_header(data: bytes) -> bytes:
    """Unfold every header field (RFC 5322 section 2.2.3: remove each CRLF before WSP)."""
    fields, rest = header_fields(normalise(data))
    return b"".join(re.sub(rb"\r\n(?=[ \t])", b"", raw) for raw in fields) + rest


def check_blocks_after_return_path(retrieved: list[bytes], envelopes: list[Envelope]) -> None:
    """Each message must start with one Return-Path field and then the stored block."""
    found = []
    for data in retrieved:
        assert data.startswith(b"Return-Path: "), data[:200]
        found.append(parse_block(data, allowed_above=frozenset({"return-path"})).envelope)
    key = lambda envelope: (envelope.sender, envelope.recipients)  # noqa: E731
    assert sorted(found, key=key) == sorted(envelopes, key=key)


def common_prefix_length(first: bytes, second: bytes) -> int:
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return index
    return min(len(first), len(second))


def describe_difference(got: list[bytes], want: list[bytes], context: int = 100) -> str:
    """Show where the first unmatched retrieved message differs from its closest expected one."""
    extra = [data for data in got if data not in want]
    missing = [data for data in want if data not in got]
    if not extra or not missing:
        return f"{len(extra)} unexpected and {len(missing)} missing messages\n"
    data = extra[0]
    best = max(missing, key=lambda other: common_prefix_length(data, other))
    offset = common_prefix_length(data, best)
    start = max(0, offset - context)
    return (f"First difference at octet {offset}:\n"
            f"  got      {data[start:offset + context]!r}\n"
            f"  expected {best[start:offset + context]!r}\n")


CLIENT_NOTES = {
    "fetchmail": "fetchmail inserts its own Received field; the comparison removes it.",
    "getmail6": "getmail6 moves the message's Return-Path field (or <unknown>) to the top "
                "and folds long header fields again; the comparison expects the move and "
                "compares header fields unfolded (the body must be byte-exact).",
    "mpop": "mpop runs with received_header off and adds nothing.",
}


def fetch_config(work: Path, box: Mailbox, delivery: str, local_domain: str) -> Path:
    config = work / "fetch.toml"
    secret = work / "pop3.pass"
    secret.write_text(box.password + "\n")
    secret.chmod(0o600)
    config.write_text(f"""\
state = "{work / 'state.sqlite'}"
quarantine = "{work / 'quarantine'}"
local_domains = ["{local_domain}"]
delivery = "{delivery}"
dsn_reporting_mta = "site.interop.test"

[[source]]
name = "mx"
host = "127.0.0.1"
port = {box.port}
tls = "none"
user = "{box.user}"
password_file = "{secret}"
""")
    return config


def run_fetch(config: Path, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {})}
    result = subprocess.run([sys.executable, "-m", "mailfeed.cli", "fetch", "--config",
                             str(config)], capture_output=True, env=full_env,
                            timeout=CLIENT_TIMEOUT, check=False)
    log = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"mailfeed fetch exited with {result.returncode}:\n{log}"
    return log


@pytest.fixture
def work() -> Iterator[Path]:
    path = shared_tmpdir("mailfeed-interop-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


POP3_SERVERS = ["mailfeed mx", "Dovecot"]
POP3_CLIENTS = ["mailfeed fetch", "fetchmail", "getmail6", "mpop", "Python poplib"]


@pytest.mark.parametrize("client", POP3_CLIENTS)
@pytest.mark.parametrize("server", POP3_SERVERS)
def test_pop3_pair(server: str, client: str, interop: Interop, corpus: Corpus, work: Path,
                   request: pytest.FixtureRequest) -> None:
    interop.pair("pop3", server, client)
    if server == "mailfeed mx":
        mx: MailfeedMx = request.getfixturevalue("mailfeed_mx")
        box = mx_mailbox(mx, corpus)
        server_log = mx.log_tail
    else:
        dovecot: SpoolDovecot = request.getfixturevalue("interop_dovecot")
        box = dovecot_mailbox(dovecot, corpus)
        server_log = dovecot.instance.log_tail
    try:
        drain_and_compare(client, box, work, interop)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- {server} log ---\n{server_log()}") from None


def drain_and_compare(client: str, box: Mailbox, work: Path, interop: Interop) -> None:
    """Let ``client`` drain ``box``; check what it delivered and that the mailbox is empty."""
    if client == "mailfeed fetch":
        domain = box.envelopes[0].recipients[0].rpartition("@")[2]
        run_fetch(fetch_config(work, box, f"maildir:{work / 'mail'}", domain))
        delivered_to: dict[str, list[bytes]] = {}
        for envelope, original in zip(box.envelopes, box.originals, strict=True):
            for rcpt in envelope.recipients:
                # The Maildir target writes the envelope on top of each copy.
                trace = f"Return-Path: <{envelope.sender}>\nDelivered-To: {rcpt}\n".encode()
                delivered_to.setdefault(rcpt.lower(), []).append(normalise(trace + original))
        delivered = {folder.name: sorted(normalise(p.read_bytes()) for p in maildir_files(folder))
                     for folder in (work / "mail").iterdir()}
        assert sorted(delivered) == sorted(delivered_to)
        for rcpt, messages in delivered_to.items():
            assert delivered[rcpt] == sorted(messages), f"{rcpt} got other bytes"
    else:
        if client in CLIENT_NOTES:
            interop.note(CLIENT_NOTES[client])
        retrieved, log = RETRIEVERS[client](box, work)
        assert len(retrieved) == len(box.stored), log
        if client == "fetchmail":
            retrieved = [without_fetchmail_received(data) for data in retrieved]
        expected = box.stored
        if client == "getmail6":
            check_blocks_after_return_path(retrieved, box.envelopes)
            expected = [unfold_header(as_getmail_writes(data)) for data in box.stored]
            retrieved = [unfold_header(data) for data in retrieved]
        got = sorted(normalise(data) for data in retrieved)
        want = sorted(normalise(data) for data in expected)
        if client == "getmail6" and got != want:
            pytest.xfail("getmail6 writes the message through Python's email package, which "
                         "changes bytes beyond its Return-Path field; the blocks are intact. "
                         + describe_difference(got, want, context=24).replace("\n", " "))
        assert got == want, describe_difference(got, want) + log
    assert spool_is_empty(box.spool), f"{client} left messages in {box.spool}"


# --- MX delivery into the spool -----------------------------------------------


@dataclass
class SpoolCase:
    """What an MX delivery test sends: two messages and their envelopes."""

    domain: str
    multi: bytes
    multi_rcpts: list[str]
    bounce: bytes
    bounce_rcpts: list[str]


def spool_case(domain: str, corpus: Corpus) -> SpoolCase:
    multi = as_received_by_mta(corpus.named(0)[1])
    bounce = as_received_by_mta(corpus.named(1)[1])
    rcpts = [f"bob@{domain}", f"erin@{domain}", hidden_recipient(domain, multi)]
    return SpoolCase(domain, multi, rcpts, bounce, [f"list-bounces@{domain}"])


def submit(port: int, sender: str, recipients: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        options = ["BODY=8BITMIME"] if re.search(rb"[\x80-\xff]", data) else []
        refused = smtp.sendmail(sender, recipients, data, mail_options=options)
    assert not refused, f"recipients refused: {refused}"


def read_mboxrd(path: Path) -> list[bytes]:
    """Split an mboxrd file into messages, without From_ lines, unquoting >From lines."""
    messages: list[list[bytes]] = []
    for line in path.read_bytes().splitlines(keepends=True):
        if line.startswith(b"From "):
            messages.append([])
            continue
        assert messages, f"{path} does not start with a From_ line"
        if re.match(rb">+From ", line):
            line = line[1:]
        messages[-1].append(line)
    # Each message ends with an empty separator line before the next From_ line.
    result = []
    for lines in messages:
        data = b"".join(lines)
        if data.endswith(b"\n\n"):
            data = data[:-1]
        result.append(data)
    return result


def check_spooled(stored: list[bytes], case: SpoolCase, mta_marker: bytes,
                  drops_return_path: bool) -> None:
    """Each of the two messages is stored once with its block, the MTA's Received, the original.

    With ``drops_return_path`` the original is expected without its Return-Path fields.
    """
    def expected(original: bytes) -> bytes:
        return drop_fields(original, "return-path") if drops_return_path else original

    assert len(stored) == 2, f"expected 2 spooled messages, found {len(stored)}"
    by_sender = {}
    for data in stored:
        block = parse_block(data)
        by_sender[block.envelope.sender] = (block, data[block.length:])
    assert sorted(by_sender) == ["", SENDER]

    block, message = by_sender[SENDER]
    assert block.envelope.recipients == tuple(case.multi_rcpts)
    received, rest = split_field(message)
    assert field_name(received) == "received", received
    assert mta_marker in received, received
    assert normalise(rest) == expected(case.multi)

    block, message = by_sender[""]
    assert block.envelope.recipients == tuple(case.bounce_rcpts)
    received, rest = split_field(message)
    assert field_name(received) == "received", received
    assert mta_marker in received, received
    assert normalise(rest) == expected(case.bounce)


# Postfix 3.7's cleanup(8) removes Return-Path fields from received mail
# (message_drop_headers = bcc, content-length, resent-bcc, return-path).
POSTFIX_RETURN_PATH_NOTE = ("Postfix removes the Return-Path fields of the original message "
                            "(message_drop_headers); the comparison expects that.")
MX_PATHS = ["mailfeed mx SMTP", "Postfix + mailfeed-fwd"]
MX_SPOOLS = ["Maildir", "mbox", "dovecot-lda"]
POSTFIX_EXAMPLES = {
    "Maildir": "mailfeed/mx-maildir.toml",
    "mbox": "mailfeed/mx-mbox.toml",
    "dovecot-lda": "mailfeed/mx-dovecot-lda.toml",
}


@pytest.mark.parametrize("spool", MX_SPOOLS)
@pytest.mark.parametrize("path", MX_PATHS)
def test_mx_pair(path: str, spool: str, interop: Interop, corpus: Corpus,
                 request: pytest.FixtureRequest) -> None:
    interop.pair("mx", path, spool)
    if path == "mailfeed mx SMTP":
        mx: MailfeedMx = request.getfixturevalue("mailfeed_mx")
        name = {"Maildir": None, "mbox": "mbox", "dovecot-lda": "lda"}[spool]
        site = mx.new_site() if name is None else mx.sites[name]
        domain = site.domains[0]
        port = mx.smtp_port
        marker = f"by {MX_HOSTNAME} (mailfeed)".encode()
        spool_path = site.path
        diagnostics = mx.log_tail
    else:
        postfix: MxPostfix = request.getfixturevalue("postfix_mx")
        substitutions = None
        if spool == "dovecot-lda":
            dovecot: SpoolDovecot = request.getfixturevalue("dovecot_spool")
            substitutions = {"/etc/dovecot/dovecot.conf": str(dovecot.instance.config_file)}
        mx_site = postfix.new_site(POSTFIX_EXAMPLES[spool], substitutions)
        domain = mx_site.domain
        port = postfix.instance.smtp_port
        marker = f"by {postfix.instance.hostname} (Postfix)".encode()
        spool_path = postfix.spool_root / mx_site.name if spool == "dovecot-lda" else mx_site.path
        diagnostics = postfix.instance.log_tail

    case = spool_case(domain, corpus)
    submit(port, SENDER, case.multi_rcpts, case.multi)
    submit(port, "", case.bounce_rcpts, case.bounce)

    if spool == "mbox":
        def probe() -> list[bytes] | None:
            found = read_mboxrd(spool_path) if spool_path.exists() else []
            return found if len(found) >= 2 else None
    else:
        def probe() -> list[bytes] | None:
            found = maildir_files(spool_path)
            return [p.read_bytes() for p in found] if len(found) >= 2 else None

    stored = wait_until(probe, timeout=DELIVERY_TIMEOUT, what=f"2 messages in {spool_path}",
                        diagnostics=diagnostics)
    postfix_row = path != "mailfeed mx SMTP"
    if postfix_row:
        interop.note(POSTFIX_RETURN_PATH_NOTE)
    check_spooled(stored, case, marker, drops_return_path=postfix_row)


# --- site delivery after mailfeed fetch ---------------------------------------

SITE_TARGETS = ["SMTP to Postfix", "LMTP to Dovecot", "sendmail via Postfix", "Maildir"]


def expected_trace(target: str, *, single: bool) -> list[str]:
    """The fields the local MTA puts above the MX's Received field, in order."""
    if target in ("SMTP to Postfix", "sendmail via Postfix"):
        return ["return-path", "x-original-to", "delivered-to", "received"]
    if target == "LMTP to Dovecot":
        # Dovecot 2.3 LMTP adds Delivered-To only when the transaction has a
        # single recipient; the per-recipient Maildir shows the recipient.
        return ["return-path", "delivered-to", "received"] if single else [
            "return-path", "received"]
    # The Maildir target, like Postfix's virtual(8), adds no Received field.
    return ["return-path", "delivered-to"]


@pytest.mark.parametrize("target", SITE_TARGETS)
def test_site_pair(target: str, interop: Interop, corpus: Corpus, work: Path,
                   mailfeed_mx: MailfeedMx, request: pytest.FixtureRequest) -> None:
    interop.pair("site", "mailfeed mx POP3 + mailfeed fetch", target)
    site = mailfeed_mx.new_site()
    domain = site.domains[0]
    case = spool_case(domain, corpus)
    submit(mailfeed_mx.smtp_port, SENDER, case.multi_rcpts, case.multi)
    submit(mailfeed_mx.smtp_port, "", case.bounce_rcpts, case.bounce)
    box = Mailbox(mailfeed_mx.pop3_port, site.name, mailfeed_mx.passwords[site.name],
                  site.path, [], [], [])

    env: dict[str, str] = {}
    if target in ("SMTP to Postfix", "sendmail via Postfix"):
        postfix: SitePostfix = request.getfixturevalue("postfix_site")
        if target == "SMTP to Postfix":
            delivery = f"smtp://127.0.0.1:{postfix.reinject_port}"
        else:
            delivery = f"sendmail:{postfix.sendmail}"

        def mailbox_of(rcpt: str) -> list[Path]:
            # All recipients of a domain share one Maildir, so Delivered-To identifies each copy.
            total = len(case.multi_rcpts) + len(case.bounce_rcpts)
            files = postfix.wait_for_messages(rcpt, total)
            return [path for path in files if delivered_to(path) == rcpt.lower()]
    elif target == "LMTP to Dovecot":
        dovecot: SiteDovecot = request.getfixturevalue("dovecot_site")
        delivery = f"lmtp://127.0.0.1:{dovecot.instance.lmtp_port}"

        def mailbox_of(rcpt: str) -> list[Path]:
            return wait_for_maildir(dovecot.maildir(rcpt), 1, _NoLog(dovecot))  # type: ignore[arg-type]
    else:
        delivery = f"maildir:{work / 'mail'}"

        def mailbox_of(rcpt: str) -> list[Path]:
            return maildir_files(work / "mail" / rcpt.lower())

    via_postfix = target in ("SMTP to Postfix", "sendmail via Postfix")
    if via_postfix:
        interop.note(POSTFIX_RETURN_PATH_NOTE)
    run_fetch(fetch_config(work, box, delivery, domain), env)
    assert spool_is_empty(site.path)

    marker = f"by {MX_HOSTNAME} (mailfeed)".encode()
    for sender, rcpts, original in ((SENDER, case.multi_rcpts, case.multi),
                                    ("", case.bounce_rcpts, case.bounce)):
        for rcpt in rcpts:
            files = mailbox_of(rcpt)
            assert len(files) == 1, f"{rcpt}: {len(files)} messages"
            above, _mx_field, rest = peel_until_mx(files[0].read_bytes(), marker)
            if via_postfix:
                original = drop_fields(original, "return-path")
            assert normalise(rest) == original, f"{rcpt}: the message changed"
            trace = [field_name(raw) for raw in above]
            assert trace == expected_trace(target, single=len(rcpts) == 1), above
            fields = {field_name(raw): field_value(raw) for raw in above}
            if "return-path" in fields:
                assert fields["return-path"] == f"<{sender}>"
            for name in ("delivered-to", "x-original-to"):
                if name in fields:
                    assert fields[name].lower() == rcpt.lower()
            if target == "Maildir":
                assert b"".join(above) == (f"Return-Path: <{sender}>\n"
                                           f"Delivered-To: {rcpt}\n").encode()


def delivered_to(path: Path) -> str | None:
    """The first Delivered-To address of a message file, in lower case."""
    fields, _rest = header_fields(path.read_bytes())
    for raw in fields:
        if field_name(raw) == "delivered-to":
            return field_value(raw).lower()
    return None


class _NoLog:
    """Adapts a SiteDovecot to the ``log_tail`` that wait_for_maildir expects."""

    def __init__(self, dovecot: SiteDovecot) -> None:
        self.log_tail = dovecot.instance.log_tail
