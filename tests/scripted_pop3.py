"""A scripted POP3 server on 127.0.0.1 for client tests.

It replays a dialogue file from the shared cases folder (format in its
README) or serves a mailbox built from ``(uidl, message bytes)`` pairs.  It
answers by command, not by position, because a client may pipeline, ask
STAT or TOP first, or order its DELEs differently:

* each ``C:``/``C?:``/``C~`` line of a dialogue owns the ``S:``, ``S<`` and
  ``!`` steps after it; the server runs them when that command arrives.  A
  command listed twice (CAPA before and after STLS) gets its entries in
  order, and the last one again after that;
* any other command gets a reply synthesised from the mailbox model: the
  messages named by the dialogue's UIDL reply and its RETR files, with LIST
  sizes counted from the unstuffed RETR bytes;
* mailbox commands before a successful login get ``-ERR``.

Everything the client sends is recorded: every line (``received``), the
lines of each read that carried commands (``flights``, one per TCP read, so
a pipelined batch is one flight), the DELE numbers and whether QUIT came.
This module is test support: it checks no credentials except the ones in
its script, and it trusts its own input files.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailfeed.scram import ScramCredentials, ScramError, ScramServer
from tests.support import CASES_DIR, unescape, write_self_signed_cert

DEFAULT_USER = "site1"
DEFAULT_PASSWORD = "pw-site1-example"
DEFAULT_GREETING = b"+OK mx.example.net POP3 ready\r\n"
DEFAULT_CAPABILITIES = ("USER", "UIDL", "TOP", "PIPELINING")
PLACEHOLDER_MESSAGE = b"Subject: scripted placeholder\r\n\r\nThis message has no case file.\r\n"
TRANSACTION_COMMANDS = frozenset({"STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "NOOP", "RSET"})


# -- message bytes --------------------------------------------------------


def stuff(content: bytes) -> bytes:
    """Return ``content`` as a byte-stuffed multi-line body with its terminator.

    Line ends pass unchanged; a last line without a line end gets CRLF.  Only
    LF ends a line, as for the client: a bare CR is content.
    """
    lines = re.findall(rb"[^\n]*\n|[^\n]+$", content)
    out = bytearray()
    for line in lines:
        if line.startswith(b"."):
            out += b"."
        out += line
    if lines and not lines[-1].endswith(b"\n"):
        out += b"\r\n"
    out += b".\r\n"
    return bytes(out)


def unstuff_wire(wire: bytes) -> bytes:
    """Return the unstuffed body of a complete RETR reply (status line dropped).

    An independent reference for the client's parser: it splits on LF and
    stops at the first line that is exactly ``.`` CRLF.
    """
    _, _, body = wire.partition(b"\n")
    out = bytearray()
    for line in body.splitlines(keepends=True):
        if line == b".\r\n":
            return bytes(out)
        out += line[1:] if line.startswith(b".") else line
    raise ValueError("RETR reply has no terminator")


def retr_reply(content: bytes) -> bytes:
    return b"+OK %d octets\r\n" % len(content) + stuff(content)


# -- TLS material ---------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """A throwaway self-signed certificate for localhost and 127.0.0.1."""

    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this certificate."""
        return ssl.create_default_context(cafile=str(self.cert_file))


def make_tls_material(directory: Path) -> TlsMaterial:
    cert_file = directory / "scripted-pop3-cert.pem"
    key_file = directory / "scripted-pop3-key.pem"
    write_self_signed_cert(cert_file, key_file)
    return TlsMaterial(cert_file, key_file)


# -- the script -----------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One server action: ``send`` bytes, ``close``, ``reset``, ``stall`` or ``tls``."""

    kind: str
    data: bytes = b""
    seconds: float = 0.0


@dataclass
class Entry:
    """The steps that answer one client command of a dialogue."""

    line: bytes | None
    pattern: re.Pattern[bytes] | None
    optional: bool
    steps: list[Step] = field(default_factory=list)


@dataclass
class ScriptedMessage:
    """A message of the mailbox model; ``wire`` is the exact RETR reply when known."""

    uidl: str | None
    content: bytes
    wire: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.content)

    def retr(self) -> bytes:
        return self.wire if self.wire is not None else retr_reply(self.content)


@dataclass
class Pop3Script:
    """What the server plays: opening steps, entries by command, a mailbox."""

    opening: list[Step]
    entries: list[Entry]
    messages: dict[int, ScriptedMessage]
    capabilities: list[str] | None = None
    user: str = DEFAULT_USER
    password: str = DEFAULT_PASSWORD
    apop_timestamp: str | None = None
    sasl: dict[str, ScramCredentials | None] = field(default_factory=dict)
    inject_after: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_dialogue(cls, name: str, cases_dir: Path = CASES_DIR) -> Pop3Script:
        """Load ``name`` (a file in ``cases_dir``), resolving ``S<`` files there."""
        text = (cases_dir / name).read_text(encoding="latin-1")
        opening: list[Step] = []
        entries: list[Entry] = []
        for raw in text.splitlines():
            if not raw or raw.startswith("#"):
                continue
            prefix, _, payload = raw.partition(" ")
            steps = entries[-1].steps if entries else opening
            if prefix in ("C:", "C?:"):
                line = unescape(payload).rstrip(b"\r\n")
                entries.append(Entry(line, None, prefix == "C?:"))
            elif prefix == "C~":
                entries.append(Entry(None, re.compile(payload.encode("latin-1")), False))
            elif prefix == "S:":
                steps.append(Step("send", unescape(payload)))
            elif prefix == "S<":
                steps.append(Step("send", (cases_dir / payload.strip()).read_bytes()))
            elif prefix == "!":
                steps.append(_directive(payload))
            else:
                raise ValueError(f"{name}: unknown dialogue line {raw[:60]!r}")
        messages = _mailbox_from_entries(entries, name, cases_dir)
        return cls(opening, entries, messages)

    @classmethod
    def from_messages(
        cls,
        messages: Sequence[tuple[str, bytes]],
        *,
        capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        greeting: bytes = DEFAULT_GREETING,
        sasl: Sequence[str] = (),
        apop_timestamp: str | None = None,
    ) -> Pop3Script:
        """Build a mailbox of ``(uidl, content)`` pairs with synthesised replies.

        ``sasl`` lists mechanisms to offer (PLAIN, SCRAM-SHA-256); an APOP
        timestamp is appended to the greeting when given.
        """
        if apop_timestamp is not None:
            greeting = greeting.rstrip(b"\r\n") + b" " + apop_timestamp.encode() + b"\r\n"
        caps = list(capabilities)
        if sasl:
            caps.append("SASL " + " ".join(sasl))
        mechanisms: dict[str, ScramCredentials | None] = {}
        for mechanism in sasl:
            mechanisms[mechanism.upper()] = (
                ScramCredentials.from_password(password)
                if mechanism.upper() == "SCRAM-SHA-256"
                else None
            )
        mailbox = {
            number: ScriptedMessage(uidl, content)
            for number, (uidl, content) in enumerate(messages, start=1)
        }
        return cls(
            [Step("send", greeting)],
            [],
            mailbox,
            capabilities=caps,
            user=user,
            password=password,
            apop_timestamp=apop_timestamp,
            sasl=mechanisms,
        )


def _directive(payload: str) -> Step:
    words = payload.split()
    if words == ["close"]:
        return Step("close")
    if words == ["reset"]:
        return Step("reset")
    if words == ["tls-handshake"]:
        return Step("tls")
    if len(words) == 2 and words[0] == "stall":
        return Step("stall", seconds=float(words[1]))
    raise ValueError(f"unknown dialogue directive {payload!r}")


def _mailbox_from_entries(
    entries: list[Entry], name: str, cases_dir: Path
) -> dict[int, ScriptedMessage]:
    """Build the mailbox model from a dialogue's UIDL reply and RETR files."""
    uidls: dict[int, str | None] = {}
    wires: dict[int, bytes] = {}
    for entry in entries:
        if entry.line == b"UIDL":
            reply = b"".join(step.data for step in entry.steps if step.kind == "send")
            for line in reply.split(b"\r\n")[1:]:
                parts = line.split()
                if parts and parts[0].isdigit():
                    uidl = parts[1].decode("latin-1") if len(parts) > 1 else None
                    uidls.setdefault(int(parts[0]), uidl)
        elif entry.line is not None and entry.line.startswith(b"RETR "):
            number = int(entry.line.split()[1])
            sends = [step.data for step in entry.steps if step.kind == "send"]
            if sends:
                wires.setdefault(number, sends[0])
    case = name.split(".")[0]
    messages: dict[int, ScriptedMessage] = {}
    for number in sorted(set(uidls) | set(wires)):
        wire = wires.get(number)
        if wire is not None:
            content = unstuff_wire(wire)
        else:
            eml = cases_dir / f"{case}.retr-{number}.eml"
            content = eml.read_bytes() if eml.exists() else PLACEHOLDER_MESSAGE
        messages[number] = ScriptedMessage(uidls.get(number), content, wire)
    if not messages:
        # Dialogues that stop before UIDL still have a mailbox: the case's message.
        eml = cases_dir / f"{case}.retr-1.eml"
        if eml.exists():
            messages[1] = ScriptedMessage(f"{case.lower()}-uid-1", eml.read_bytes())
    return messages


# -- the server -----------------------------------------------------------


class ScriptedPop3Server:
    """Serve one :class:`Pop3Script` on 127.0.0.1 port 0.

    ``tls`` is the certificate used by ``! tls-handshake``, by a synthesised
    STLS, and by every connection when ``implicit_tls`` is set.  Use it as an
    async context manager; ``port`` is known after start.
    """

    def __init__(
        self,
        script: Pop3Script,
        *,
        tls: TlsMaterial | None = None,
        implicit_tls: bool = False,
        inject_after: dict[str, bytes] | None = None,
    ) -> None:
        self.script = script
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.inject_after = {**script.inject_after, **(inject_after or {})}
        self.host = "127.0.0.1"
        self.port = 0
        self.received: list[str] = []
        self.flights: list[list[str]] = []
        self.dele_received: list[int] = []
        self.quit_received = False
        self.sessions = 0
        self.tls_established = 0
        self.tls_failures: list[str] = []
        self.session_done = asyncio.Event()
        self._consumed: dict[int, int] = {}
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedPop3Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> int:
        context = None
        if self.implicit_tls:
            assert self.tls is not None, "implicit TLS needs TLS material"
            context = self.tls.server_context()
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def sent(self, verb: str) -> bool:
        """True when any received line starts with ``verb`` (case-insensitive)."""
        prefix = verb.upper()
        return any(
            line.upper() == prefix or line.upper().startswith(prefix + " ")
            for line in self.received
        )

    def command_flights(self, verbs: Sequence[str]) -> int:
        """Count the flights that carried at least one of ``verbs``."""
        wanted = {verb.upper() for verb in verbs}
        count = 0
        for flight in self.flights:
            if any(line.split(" ")[0].upper() in wanted for line in flight):
                count += 1
        return count

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        session = _Session(self, reader, writer)
        try:
            await session.run()
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            session.note_error(exc)
        finally:
            if not writer.is_closing():
                writer.close()
            self.session_done.set()

    def take_entry(self, line: bytes) -> Entry | None:
        """Return the dialogue entry answering ``line``, or None."""
        matches = [
            index
            for index, entry in enumerate(self.script.entries)
            if entry.line is not None and entry.line == line
        ]
        if not matches:
            matches = [
                index
                for index, entry in enumerate(self.script.entries)
                if entry.line is not None and entry.line.upper() == line.upper()
            ]
        if not matches:
            matches = [
                index
                for index, entry in enumerate(self.script.entries)
                if entry.pattern is not None and entry.pattern.fullmatch(line)
            ]
        if not matches:
            return None
        key = matches[0]
        used = self._consumed.get(key, 0)
        self._consumed[key] = used + 1
        return self.script.entries[matches[min(used, len(matches) - 1)]]


class _Session:
    """One connection: reads flights, answers each command in order."""

    def __init__(
        self, server: ScriptedPop3Server, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.script = server.script
        self.reader = reader
        self.writer = writer
        self.authenticated = False
        self.pending_user: str | None = None
        self.deleted: set[int] = set()
        self.sasl: _SaslExchange | None = None
        self.closed = False
        self.tls_started_now = False

    def note_error(self, exc: BaseException) -> None:
        if isinstance(exc, ssl.SSLError):
            self.server.tls_failures.append(str(exc))

    async def run(self) -> None:
        if self.server.implicit_tls:
            self.server.tls_established += 1
        await self.play(self.script.opening, "")
        buffer = b""
        while not self.closed:
            data = await self.reader.read(65536)
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            flight = [line.rstrip(b"\r") for line in lines]
            if flight:
                self.server.flights.append([line.decode("latin-1") for line in flight])
            for line in flight:
                if self.closed:
                    return
                self.server.received.append(line.decode("latin-1"))
                await self.answer(line)
                if self.tls_started_now:
                    # Lines read before TLS started are dropped, as a server must.
                    self.tls_started_now = False
                    buffer = b""
                    break

    async def answer(self, line: bytes) -> None:
        if self.sasl is not None:
            await self.send(self.sasl.step(self, line))
            return
        verb = line.split(b" ")[0].decode("latin-1").upper()
        if verb == "DELE":
            with contextlib.suppress(IndexError, ValueError):
                self.server.dele_received.append(int(line.split()[1]))
        if verb == "QUIT":
            self.server.quit_received = True
        entry = self.server.take_entry(line)
        if entry is not None:
            await self.play(entry.steps, verb)
            return
        await self.synthesise(verb, line)

    async def play(self, steps: Sequence[Step], verb: str) -> None:
        pending = b""
        for step in steps:
            if step.kind == "send":
                pending += step.data
                continue
            if pending:
                await self.send(pending, verb)
                pending = b""
            await self.act(step)
            if self.closed:
                return
        if pending:
            await self.send(pending, verb)

    async def send(self, data: bytes, verb: str = "") -> None:
        if verb in ("PASS", "APOP") or (verb == "AUTH" and not data.startswith(b"+ ")):
            self.authenticated = data.startswith((b"+OK\r\n", b"+OK "))
        self.writer.write(data + self.server.inject_after.get(verb, b""))
        await self.writer.drain()

    async def act(self, step: Step) -> None:
        if step.kind == "close":
            self.writer.close()
            self.closed = True
        elif step.kind == "reset":
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
            self.closed = True
        elif step.kind == "stall":
            await asyncio.sleep(step.seconds)
        elif step.kind == "tls":
            await self.start_tls()

    async def start_tls(self) -> None:
        assert self.server.tls is not None, "the dialogue needs TLS material"
        try:
            await self.writer.start_tls(self.server.tls.server_context())
        except (ssl.SSLError, OSError, ConnectionError) as exc:
            self.server.tls_failures.append(str(exc) or type(exc).__name__)
            self.closed = True
            return
        self.server.tls_established += 1
        self.tls_started_now = True

    async def synthesise(self, verb: str, line: bytes) -> None:
        words = line.decode("latin-1").split(" ")
        args = words[1:]
        script = self.script
        if verb in TRANSACTION_COMMANDS and not self.authenticated:
            await self.send(b"-ERR not logged in\r\n")
            return
        if verb == "CAPA":
            if script.capabilities is None:
                await self.send(b"-ERR unknown command\r\n")
                return
            caps = list(script.capabilities)
            if self.server.tls is not None and not self.server.implicit_tls and (
                self.tls_active() is False
            ):
                caps.append("STLS")
            body = "".join(f"{cap}\r\n" for cap in caps).encode()
            await self.send(b"+OK Capability list follows\r\n" + body + b".\r\n")
        elif verb == "STLS" and self.server.tls is not None:
            await self.send(b"+OK Begin TLS negotiation\r\n", "STLS")
            await self.start_tls()
        elif verb == "USER" and args:
            self.pending_user = " ".join(args)
            await self.send(b"+OK\r\n", "USER")
        elif verb == "PASS" and self.pending_user is not None:
            good = self.pending_user == script.user and " ".join(args) == script.password
            await self.send(_login_reply(good), "PASS")
        elif verb == "APOP" and len(args) == 2 and script.apop_timestamp is not None:
            digest = hashlib.md5(
                (script.apop_timestamp + script.password).encode(), usedforsecurity=False
            ).hexdigest()
            await self.send(_login_reply(args[0] == script.user and args[1] == digest), "APOP")
        elif verb == "AUTH" and args and args[0].upper() in script.sasl:
            self.sasl = _SaslExchange(args[0].upper(), script)
            await self.send(self.sasl.begin(self, args[1] if len(args) > 1 else None))
        elif verb == "QUIT":
            await self.send(b"+OK Bye\r\n", "QUIT")
            self.writer.close()
            self.closed = True
        else:
            await self.send(self.mailbox_reply(verb, args))

    def tls_active(self) -> bool:
        return self.writer.get_extra_info("sslcontext") is not None

    def mailbox_reply(self, verb: str, args: list[str]) -> bytes:
        messages = {n: m for n, m in self.script.messages.items() if n not in self.deleted}
        number = int(args[0]) if args and args[0].isdigit() else None
        message = messages.get(number) if number is not None else None
        if verb in ("NOOP", "RSET"):
            if verb == "RSET":
                self.deleted.clear()
            return b"+OK\r\n"
        if verb == "STAT":
            total = sum(m.size for m in messages.values())
            return b"+OK %d %d\r\n" % (len(messages), total)
        if verb in ("LIST", "UIDL") and not args:
            lines = [
                f"{n} {m.size if verb == 'LIST' else m.uidl}\r\n".encode("latin-1")
                for n, m in sorted(messages.items())
                if verb == "LIST" or m.uidl is not None
            ]
            return b"+OK\r\n" + b"".join(lines) + b".\r\n"
        if message is None:
            return b"-ERR no such message\r\n"
        assert number is not None
        if verb == "LIST":
            return b"+OK %d %d\r\n" % (number, message.size)
        if verb == "UIDL":
            return f"+OK {number} {message.uidl}\r\n".encode("latin-1")
        if verb == "RETR":
            return message.retr()
        if verb == "TOP" and len(args) == 2 and args[1].isdigit():
            return b"+OK\r\n" + stuff(_top(message.content, int(args[1])))
        if verb == "DELE":
            self.deleted.add(number)
            return b"+OK Marked to be deleted.\r\n"
        return b"-ERR unknown command\r\n"


def _login_reply(good: bool) -> bytes:
    return b"+OK Logged in.\r\n" if good else b"-ERR [AUTH] Authentication failed.\r\n"


def _top(content: bytes, lines: int) -> bytes:
    head, sep, body = content.partition(b"\r\n\r\n")
    if not sep:
        return content
    return head + sep + b"".join(body.splitlines(keepends=True)[:lines])


class _SaslExchange:
    """Server side of AUTH PLAIN and AUTH SCRAM-SHA-256 (RFC 5034)."""

    def __init__(self, mechanism: str, script: Pop3Script) -> None:
        self.mechanism = mechanism
        self.script = script
        self.scram: ScramServer | None = None
        self.stage = 0

    def begin(self, session: _Session, initial: str | None) -> bytes:
        if initial is None:
            return b"+ \r\n"
        return self.step(session, initial.encode("ascii"))

    def step(self, session: _Session, line: bytes) -> bytes:
        if line == b"*":
            return self.finish(session, b"-ERR AUTH cancelled\r\n")
        try:
            decoded = base64.b64decode(line, validate=True).decode("utf-8")
        except ValueError:
            return self.finish(session, b"-ERR invalid base64\r\n")
        if self.mechanism == "PLAIN":
            parts = decoded.split("\0")
            good = len(parts) == 3 and parts[1:] == [self.script.user, self.script.password]
            return self.finish(session, _login_reply(good))
        return self.scram_step(session, decoded)

    def scram_step(self, session: _Session, decoded: str) -> bytes:
        credentials = self.script.sasl[self.mechanism]
        try:
            if self.stage == 0:
                self.scram = ScramServer(
                    lambda user: credentials if user == self.script.user else None
                )
                self.stage = 1
                return _challenge(self.scram.first(decoded))
            if self.stage == 1:
                assert self.scram is not None
                self.stage = 2
                return _challenge(self.scram.final(decoded))
        except ScramError:
            return self.finish(session, _login_reply(False))
        return self.finish(session, _login_reply(True))

    def finish(self, session: _Session, reply: bytes) -> bytes:
        session.sasl = None
        session.authenticated = reply.startswith(b"+OK")
        return reply


def _challenge(text: str) -> bytes:
    return b"+ " + base64.b64encode(text.encode("utf-8")) + b"\r\n"
