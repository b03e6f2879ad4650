"""End-to-end demonstration of mailfeed on a corpus of real messages.

Run it with ``make demo`` (or ``python demo/run.py``).  It starts everything
it needs on 127.0.0.1 and removes it again at the end:

1. a working folder with a throwaway TLS certificate and an MX configuration;
2. two sites, ``one`` (one.example) and ``two`` (two.example), added with
   ``mailfeed site add``;
3. ``mailfeed mx`` with SMTP and POP3 over implicit TLS on free ports, read
   from its ready file;
4. every corpus message submitted over SMTP (smtplib) with a generated
   envelope: one to four recipients, sometimes in both sites, sometimes the
   null sender, sometimes the same recipient twice;
5. a check of both spools: each stored message carries the block with the
   submitted sender and exactly the recipients of that site;
6. ``mailfeed fetch`` for each site over POP3S into ``maildir:DIR`` (one
   Maildir per recipient);
7. a check of every Maildir and every byte, then a report.  Each delivered
   copy must start with the Return-Path field of its envelope sender and the
   Delivered-To field of its recipient, which the Maildir target writes.

Exit status 0 only when every recipient received exactly the messages
addressed to it, once each, with their envelope senders, byte for byte (in
the normalised form described in docs/demo.md), and both spools and both
quarantines are empty.

Every recipient address is made up here and appears in no header of the
corpus messages, so each one is a blind-copy recipient: only the envelope
can route the mail to it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "messages"
CORPUS_ENV = "MAILFEED_DEMO_CORPUS"
LIMIT_ENV = "MAILFEED_DEMO_LIMIT"

MX_HOSTNAME = "mx.demo.example"
SITES = {"one": "one.example", "two": "two.example"}
# Local parts of the made-up recipients, per site domain.
MAILBOXES = ("alice", "bob", "carol", "dave")
SENDERS = ("news@list.demo.example", "someone@elsewhere.demo.example", "bounce+x=y@demo.example")
# One message in NULL_SENDER_EVERY goes with the null sender, as bounces do.
NULL_SENDER_EVERY = 7
# One message in DUPLICATE_RCPT_EVERY names one recipient twice in RCPT TO,
# the second time with the domain in upper case.  Only the domain is
# case-insensitive (RFC 5321 section 2.4), so the MX stores it once.
DUPLICATE_RCPT_EVERY = 11
MAX_RECIPIENTS = 4
# RFC 5321 section 4.5.3.1.6 limits lines to 998 octets plus CRLF.
SMTP_LINE_LIMIT = 998
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
FETCH_TIMEOUT = 600.0
SMTP_TIMEOUT = 120.0
SEED = 20241204

LINE_END = re.compile(rb"\r\n|\r|\n")
# The fields the Maildir target writes on top of each copy (RFC 5321 section
# 4.4 and RFC 9228), each with the line end it ends in.
RETURN_PATH = re.compile(rb"Return-Path: <(.*)>(?:\r\n|\r|\n)", re.DOTALL)
DELIVERED_TO = re.compile(rb"Delivered-To: (.*)(?:\r\n|\r|\n)", re.DOTALL)


class DemoFailure(Exception):
    """A step of the demo failed; the message names the step and the cause."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; clean up and stop."""


# --- normalisation ----------------------------------------------------------


def as_received_by_mta(raw: bytes) -> bytes:
    """Return a corpus file as an MTA receives it over SMTP.

    The mbox ``From `` separator line is dropped, every line end (CRLF, bare
    CR, bare LF) becomes CRLF, and a final CRLF is added when missing, as an
    SMTP client must send one before the terminating dot.
    """
    if raw.startswith(b"From "):
        end = LINE_END.search(raw)
        raw = raw[end.end():] if end else b""
    text = LINE_END.sub(b"\r\n", raw)
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def normalise(message: bytes) -> bytes:
    """Return the CRLF-normalised form used to compare submitted and delivered bytes.

    Every line end becomes CRLF and a final CRLF is added when missing.  Nothing
    else changes: header and body octets, dots and long lines are compared as they are.
    """
    text = LINE_END.sub(b"\r\n", message)
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_first_field(message: bytes) -> tuple[bytes, bytes]:
    """Split off the first header field with its folded continuation lines."""
    position = 0
    while True:
        end = LINE_END.search(message, position)
        if end is None:
            return message, b""
        position = end.end()
        if message[position:position + 1] not in (b" ", b"\t"):
            return message[:position], message[position:]


# --- plan -------------------------------------------------------------------


@dataclass
class Submission:
    """One corpus message and the envelope it is submitted with."""

    source: Path
    data: bytes
    sender: str
    recipients: list[str]

    @property
    def unique_recipients(self) -> list[str]:
        # The site's mailboxes: its local delivery ignores case.
        return list(dict.fromkeys(rcpt.lower() for rcpt in self.recipients))


def rcpt_key(address: str) -> str:
    """Return the address with its domain in lower case: its local part is case-sensitive."""
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}"


def plan_envelopes(files: Sequence[Path], seed: int) -> list[Submission]:
    """Give each message a reproducible envelope: varied senders and recipients."""
    rng = random.Random(seed)
    addresses = [f"{box}@{domain}" for domain in SITES.values() for box in MAILBOXES]
    plan = []
    for index, path in enumerate(files):
        sender = "" if index % NULL_SENDER_EVERY == 0 else rng.choice(SENDERS)
        count = rng.randint(1, MAX_RECIPIENTS)
        recipients = rng.sample(addresses, count)
        if index % DUPLICATE_RCPT_EVERY == 0:
            local, _, domain = recipients[0].rpartition("@")
            recipients.append(f"{local}@{domain.upper()}")
        plan.append(Submission(path, as_received_by_mta(path.read_bytes()), sender, recipients))
    return plan


def site_of(address: str) -> str:
    domain = address.rpartition("@")[2].lower()
    for name, site_domain in SITES.items():
        if site_domain == domain:
            return name
    raise ValueError(f"no site for {address!r}")


# --- processes and files ----------------------------------------------------


def mailfeed_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "mailfeed.cli", *args]


def write_certificate(folder: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MX_HOSTNAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName(MX_HOSTNAME),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = folder / "mx-cert.pem"
    key_path = folder / "mx-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def write_secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    return path


def run_checked(argv: Sequence[str], what: str, timeout: float) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != 0:
        raise DemoFailure(f"{what} exited with {result.returncode}:\n"
                          f"{result.stdout}{result.stderr}")
    return result.stdout


@dataclass
class Workspace:
    """The demo's folder tree and the processes it started."""

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def mx_config(self) -> Path:
        return self.root / "mx" / "mx.toml"

    @property
    def ready_file(self) -> Path:
        return self.root / "mx" / "ready.json"

    def spool(self, site: str) -> Path:
        return self.root / "mx" / "spool" / site

    def site_dir(self, site: str) -> Path:
        return self.root / f"site-{site}"

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        self.processes.clear()


def write_mx_config(ws: Workspace, cert: Path, key: Path, max_size: int) -> None:
    (ws.root / "mx" / "spool").mkdir(parents=True)
    ws.mx_config.write_text(f"""\
spool_root = "{ws.root / 'mx' / 'spool'}"

[limits]
max_message_size = {max_size}
max_recipients = 100

[mx]
hostname = "{MX_HOSTNAME}"
smtp_listen = ["127.0.0.1:0"]
pop3_listen = []
pop3s_listen = ["127.0.0.1:0"]
tls_cert = "{cert}"
tls_key = "{key}"
passwd_file = "passwd"
min_free_space = 1048576
""")


def add_sites(ws: Workspace) -> dict[str, str]:
    """Run ``mailfeed site add`` for each site; return each site's password."""
    passwords = {}
    for site, domain in SITES.items():
        password = f"demo-{site}-{os.urandom(6).hex()}"
        secret = write_secret(ws.root / "mx" / f"{site}.pass", password)
        run_checked(mailfeed_argv("site", "add", site, "--config", str(ws.mx_config),
                                  "--domain", domain, "--password-file", str(secret)),
                    f"mailfeed site add {site}", timeout=60)
        passwords[site] = password
    return passwords


def start_mx(ws: Workspace) -> dict[str, int]:
    """Start ``mailfeed mx``; return the first bound port of each listener from its ready file."""
    log = (ws.root / "mx" / "mx.log").open("ab")
    process = subprocess.Popen(
        mailfeed_argv("mx", "--config", str(ws.mx_config), "--ready-file", str(ws.ready_file)),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    ws.processes.append(process)
    deadline = time.monotonic() + READY_TIMEOUT
    while not ws.ready_file.exists():
        if process.poll() is not None:
            raise DemoFailure(f"mailfeed mx exited with {process.returncode}:\n"
                              + (ws.root / "mx" / "mx.log").read_text(errors="replace"))
        if time.monotonic() > deadline:
            raise DemoFailure(f"mailfeed mx wrote no ready file within {READY_TIMEOUT:.0f} s")
        time.sleep(0.02)
    ready = json.loads(ws.ready_file.read_text())
    return {name: int(ready[name][0][1]) for name in ("smtp", "pop3s") if ready.get(name)}


def write_fetch_config(ws: Workspace, site: str, port: int, cert: Path, password: str) -> Path:
    folder = ws.site_dir(site)
    (folder / "mail").mkdir(parents=True)
    secret = write_secret(folder / "pop3.pass", password)
    path = folder / "fetch.toml"
    path.write_text(f"""\
state = "{folder / 'state.sqlite'}"
quarantine = "{folder / 'quarantine'}"
local_domains = ["{SITES[site]}"]
delivery = "maildir:{folder / 'mail'}"
dsn_reporting_mta = "{site}.demo.example"

[[source]]
name = "mx"
host = "127.0.0.1"
port = {port}
tls = "implicit"
ca_file = "{cert}"
user = "{site}"
password_file = "{secret}"
""")
    return path


# --- submission and checks --------------------------------------------------


def submit_all(plan: Sequence[Submission], port: int) -> None:
    """Submit every message over one SMTP session; raise DemoFailure on the first refusal."""
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="submitter.demo.example",
                          timeout=SMTP_TIMEOUT)
    try:
        client.ehlo()
        eight_bit = client.has_extn("8bitmime")
        for item in plan:
            options = ["BODY=8BITMIME"] if eight_bit and re.search(rb"[\x80-\xff]", item.data) \
                else []
            try:
                refused = client.sendmail(item.sender, item.recipients, item.data,
                                          mail_options=options)
            except smtplib.SMTPException as exc:
                raise DemoFailure(f"{item.source.name}: SMTP submission failed: {exc}") from None
            if refused:
                raise DemoFailure(f"{item.source.name}: recipients refused: {refused}")
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()


def stored_files(spool: Path) -> Iterator[Path]:
    for sub in ("new", "cur"):
        yield from sorted((spool / sub).iterdir())


# (sender, digest of the normalised message, recipients with lower-case domains)
EnvelopeKey = tuple[str, str, tuple[str, ...]]


def expected_per_site(plan: Sequence[Submission]) -> dict[str, collections.Counter[EnvelopeKey]]:
    """Count the expected spool entries of each site by sender, message and recipients."""
    expected: dict[str, collections.Counter[EnvelopeKey]] = {
        site: collections.Counter() for site in SITES}
    for item in plan:
        by_site: dict[str, list[str]] = {}
        for rcpt in item.recipients:
            by_site.setdefault(site_of(rcpt), []).append(rcpt)
        for site, rcpts in by_site.items():
            unique = tuple(dict.fromkeys(rcpt_key(rcpt) for rcpt in rcpts))
            expected[site][(item.sender, digest(item.data), unique)] += 1
    return expected


def check_spool(ws: Workspace, site: str, expected: collections.Counter[EnvelopeKey]) -> list[str]:
    """Compare the blocks and messages in a site's spool with the submitted envelopes."""
    from mailfeed.envelope import BlockDefect, InvalidAddress, parse_block

    problems = []
    found: collections.Counter[EnvelopeKey] = collections.Counter()
    for path in stored_files(ws.spool(site)):
        data = path.read_bytes()
        try:
            block = parse_block(data)
        except (BlockDefect, InvalidAddress) as exc:
            problems.append(f"spool {site}/{path.name}: no valid block: {exc}")
            continue
        received, message = split_first_field(data[block.length:])
        if not received.startswith(b"Received: from ") or MX_HOSTNAME.encode() not in received:
            problems.append(f"spool {site}/{path.name}: no Received field of {MX_HOSTNAME} "
                            "after the block")
        envelope = block.envelope
        key = (envelope.sender, digest(normalise(message)),
               tuple(rcpt_key(r) for r in envelope.recipients))
        found[key] += 1
    for key, count in (expected - found).items():
        problems.append(f"spool {site}: missing {count} message(s) with sender <{key[0]}>, "
                        f"recipients {list(key[2])}")
    for key, count in (found - expected).items():
        problems.append(f"spool {site}: {count} unexpected message(s) with sender <{key[0]}>, "
                        f"recipients {list(key[2])}")
    return problems


def fetch_sites(ws: Workspace) -> list[str]:
    """Run ``mailfeed fetch`` for every site at once; return their summary lines."""
    processes = {}
    for site in SITES:
        config = ws.site_dir(site) / "fetch.toml"
        process = subprocess.Popen(mailfeed_argv("fetch", "--config", str(config)),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        ws.processes.append(process)
        processes[site] = process
    summaries = []
    failures = []
    for site, process in processes.items():
        stdout, stderr = process.communicate(timeout=FETCH_TIMEOUT)
        summaries.append(f"site {site}: {stdout.decode(errors='replace').strip()}")
        if process.returncode != 0:
            failures.append(f"mailfeed fetch for site {site} exited with {process.returncode}:\n"
                            f"{stdout.decode(errors='replace')}{stderr.decode(errors='replace')}")
    if failures:
        raise DemoFailure("\n".join(failures))
    return summaries


# (envelope sender, digest of the normalised message)
CopyKey = tuple[str, str]


def read_copy(data: bytes, rcpt: str) -> tuple[str | None, bytes, list[str]]:
    """Split a delivered file into its envelope sender and the message as submitted.

    The file must start with ``Return-Path: <SENDER>``, then
    ``Delivered-To:`` naming ``rcpt`` (in any case, as the folder name is in
    lower case), then the Received field of the MX.  Exactly these three
    fields are removed.  Returns the sender (None without a Return-Path
    field), the rest of the file and what is wrong with the three fields.
    """
    problems = []
    field, rest = split_first_field(data)
    match = RETURN_PATH.fullmatch(field)
    sender = match.group(1).decode("utf-8", "replace") if match else None
    if match is None:
        problems.append("does not start with a Return-Path field")
    else:
        data = rest
    field, rest = split_first_field(data)
    match = DELIVERED_TO.fullmatch(field)
    if match is None:
        problems.append("has no Delivered-To field after Return-Path")
    else:
        data = rest
        if match.group(1).decode("utf-8", "replace").lower() != rcpt:
            problems.append(f"has Delivered-To {match.group(1)!r}, not the recipient {rcpt}")
    field, rest = split_first_field(data)
    if not field.startswith(b"Received: from ") or MX_HOSTNAME.encode() not in field:
        problems.append(f"has no Received field of {MX_HOSTNAME} after Delivered-To")
    else:
        data = rest
    return sender, data, problems


def check_maildirs(ws: Workspace, plan: Sequence[Submission]) -> tuple[list[str], int, int]:
    """Compare every delivered file with the submitted messages and senders of its recipient.

    Returns the problems, the number of delivered files and their octets.
    """
    expected: dict[str, collections.Counter[CopyKey]] = collections.defaultdict(
        collections.Counter)
    names: dict[str, str] = {}
    for item in plan:
        names[digest(item.data)] = item.source.name
        for rcpt in item.unique_recipients:
            expected[rcpt][(item.sender, digest(item.data))] += 1

    problems: list[str] = []
    delivered: dict[str, collections.Counter[CopyKey]] = collections.defaultdict(
        collections.Counter)
    files = octets = 0
    for site in SITES:
        mail_root = ws.site_dir(site) / "mail"
        for folder in sorted(mail_root.iterdir()):
            rcpt = folder.name
            if site_of(rcpt) != site:
                problems.append(f"{rcpt}: delivered by site {site}, which does not serve it")
            for path in stored_files(folder):
                data = path.read_bytes()
                files += 1
                octets += len(data)
                sender, message, wrong = read_copy(data, rcpt)
                problems += [f"{rcpt}/{path.name}: {what}" for what in wrong]
                if sender is not None:
                    delivered[rcpt][(sender, digest(normalise(message)))] += 1

    for rcpt in sorted(set(expected) | set(delivered)):
        for (sender, key), count in (expected[rcpt] - delivered[rcpt]).items():
            problems.append(f"{rcpt}: {names[key]} from <{sender}> missing or changed "
                            f"({count} copy/copies)")
        for (sender, key), count in (delivered[rcpt] - expected[rcpt]).items():
            if key not in names:
                what = f"unknown message from <{sender}>"
            elif (sender, key) in expected[rcpt]:
                what = f"{names[key]} delivered too often"
            else:
                what = f"{names[key]} delivered with the wrong sender <{sender}>"
            problems.append(f"{rcpt}: {what} ({count} extra)")
    return problems, files, octets


def check_empty(ws: Workspace) -> list[str]:
    """Report messages left in a spool or a quarantine after the fetch."""
    problems = []
    for site in SITES:
        left = list(stored_files(ws.spool(site)))
        if left:
            problems.append(f"spool {site}: {len(left)} message(s) left on the MX after fetch")
        quarantine = ws.site_dir(site) / "quarantine"
        if quarantine.exists():
            held = [p for p in quarantine.rglob("*") if p.is_file()]
            if held:
                problems.append(f"site {site}: {len(held)} file(s) in quarantine {quarantine}")
    return problems


# --- main -------------------------------------------------------------------


@dataclass
class Report:
    messages: int = 0
    recipients: int = 0
    submitted_octets: int = 0
    delivered_files: int = 0
    delivered_octets: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    fetch_output: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def print(self, out: TextIO = sys.stdout, max_problems: int = 30) -> None:
        lines = [
            "mailfeed demo report",
            f"  messages submitted   {self.messages}",
            f"  envelope recipients  {self.recipients} (after removing duplicate RCPTs)",
            f"  octets submitted     {self.submitted_octets}",
            f"  files delivered      {self.delivered_files}",
            f"  octets delivered     {self.delivered_octets}",
        ]
        for step, seconds in self.timings.items():
            lines.append(f"  {step:<20} {seconds:.1f} s")
        for line in self.fetch_output:
            lines.append(f"  fetch: {line}")
        if self.problems:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines.extend(f"  - {problem}" for problem in self.problems[:max_problems])
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        else:
            lines.append("OK: every recipient received exactly its messages, once, intact, "
                         "with their envelope senders")
        print("\n".join(lines), file=out)


def corpus_files(folder: Path, limit: int | None) -> list[Path]:
    files = sorted(folder.glob("*.eml"))
    if not files:
        raise DemoFailure(f"no *.eml files in {folder}: pass --corpus DIR or set {CORPUS_ENV}")
    return files[:limit] if limit else files


def run_demo(args: argparse.Namespace, report: Report) -> None:
    files = corpus_files(Path(args.corpus), args.limit)
    plan = plan_envelopes(files, args.seed)
    report.messages = len(plan)
    report.recipients = sum(len(item.unique_recipients) for item in plan)
    report.submitted_octets = sum(len(item.data) for item in plan)
    long_lines = sum(1 for item in plan
                     if any(len(line) > SMTP_LINE_LIMIT for line in item.data.split(b"\r\n")))
    print(f"demo: {len(plan)} messages from {args.corpus} "
          f"({long_lines} with lines over {SMTP_LINE_LIMIT} octets)", flush=True)

    if args.workdir:
        root = Path(args.workdir)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise DemoFailure(f"the work folder {root} is not empty: give an empty or new one")
    else:
        root = Path(tempfile.mkdtemp(prefix="mailfeed-demo-"))
    ws = Workspace(root)
    started = time.monotonic()
    try:
        cert, key = write_certificate(root)
        max_size = max(len(item.data) for item in plan) * 2
        write_mx_config(ws, cert, key, max_size)
        passwords = add_sites(ws)
        bound = start_mx(ws)
        smtp_port, pop3s_port = bound["smtp"], bound["pop3s"]
        print(f"demo: mailfeed mx (pid {ws.processes[0].pid}) listening: SMTP "
              f"127.0.0.1:{smtp_port}, POP3S 127.0.0.1:{pop3s_port}; work folder {root}",
              flush=True)
        report.timings["setup"] = time.monotonic() - started

        step = time.monotonic()
        submit_all(plan, smtp_port)
        report.timings["SMTP submission"] = time.monotonic() - step

        expected = expected_per_site(plan)
        for site in SITES:
            report.problems += check_spool(ws, site, expected[site])

        step = time.monotonic()
        for site in SITES:
            write_fetch_config(ws, site, pop3s_port, cert, passwords[site])
        report.fetch_output = fetch_sites(ws)
        report.timings["POP3 fetch"] = time.monotonic() - step

        step = time.monotonic()
        problems, report.delivered_files, report.delivered_octets = check_maildirs(ws, plan)
        report.problems += problems
        report.problems += check_empty(ws)
        report.timings["checks"] = time.monotonic() - step
    finally:
        ws.stop_all()
        report.timings["total"] = time.monotonic() - started
        if args.keep:
            print(f"demo: kept the work folder {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=os.environ.get(CORPUS_ENV, str(DEFAULT_CORPUS)),
                        help=f"folder of *.eml messages (default: ${CORPUS_ENV} or "
                             f"{DEFAULT_CORPUS})")
    limit = os.environ.get(LIMIT_ENV)
    parser.add_argument("--limit", type=int, default=int(limit) if limit else None,
                        help=f"submit only the first N messages (default: ${LIMIT_ENV} or all)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of the envelope generator")
    parser.add_argument("--workdir",
                        help="use this empty or new folder instead of a temporary one; "
                             "it is deleted at the end unless --keep")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (spools, Maildirs, logs) at the end")
    return parser.parse_args(argv)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    report = Report()
    try:
        run_demo(args, report)
    except Interrupted as exc:
        print(f"demo: interrupted by {exc}; stopped everything it started", file=sys.stderr)
        return 130
    except (DemoFailure, OSError, subprocess.TimeoutExpired, ssl.SSLError) as exc:
        report.problems.append(str(exc))
    report.print()
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
