"""POP3 server over real sockets on 127.0.0.1: exact bytes for every command and state."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailfeed import pop3server
from mailfeed.config import SiteConfig
from mailfeed.maildrop import wire_size_of
from mailfeed.passwd import hash_password
from mailfeed.pop3server import (
    ALLOWED_COMMANDS,
    KNOWN_COMMANDS,
    Pop3Settings,
    State,
    _LoginThrottle,
    plaintext_allowed,
)
from mailfeed.scram import ScramClient
from tests.pop3harness import (
    PASSWORD,
    USER,
    Client,
    RunningServer,
    TlsFiles,
    fast_settings,
    make_maildir,
    make_tls_files,
    start_server,
)

MESSAGES = [
    b"Subject: one\n\nfirst body\n.\n",
    b"Subject: two\r\n\r\nsecond\r\nbody\r\n",
    b"Subject: three\n\nno final newline",
]
# Wire sizes: bare LF counts as CRLF, a missing final line end adds CRLF.
SIZES = [31, 30, 36]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    path = tmp_path / "site1"
    make_maildir(path, MESSAGES)
    return path


@pytest.fixture
def site(maildir: Path) -> SiteConfig:
    return SiteConfig("site1", "maildir", maildir)


@pytest.fixture
def server(site: SiteConfig) -> Iterator[RunningServer]:
    running = start_server({USER: site}, settings=fast_settings(max_bad_commands=100))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def files_in(maildir: Path) -> list[str]:
    return sorted(p.name for p in (maildir / "new").iterdir())


def sessions_ended(server: RunningServer) -> Callable[[], bool]:
    return lambda: server.call(lambda: server.server.session_count) == 0


# -- replies and their RFC grounding


def test_sizes_fixture_matches_rule() -> None:
    for data, size in zip(MESSAGES, SIZES, strict=True):
        expected = len(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        if not data.endswith(b"\n"):
            expected += 2
        assert size == expected


def test_reply_constants_follow_rfc() -> None:
    # RFC 1939 section 3: positive "+OK", negative "-ERR"; RFC 2449 section 8:
    # a response code in brackets follows "-ERR " directly.
    known_codes = {"IN-USE", "LOGIN-DELAY", "AUTH", "SYS/TEMP", "SYS/PERM"}
    names = [n for n in dir(pop3server) if n.startswith(("OK_", "ERR_"))]
    assert len(names) > 25
    for name in names:
        text = getattr(pop3server, name)
        if name.startswith("OK_"):
            assert text == "+OK" or text.startswith("+OK "), name
        else:
            assert text.startswith("-ERR "), name
            code = re.match(r"-ERR \[([^\]]+)\]", text)
            if code:
                assert code.group(1) in known_codes, name
        assert "\r" not in text, name
        assert "\n" not in text, name


def test_state_table_matches_rfc1939() -> None:
    assert ALLOWED_COMMANDS[State.AUTHORIZATION] == {
        "USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT"
    }
    assert ALLOWED_COMMANDS[State.TRANSACTION] == {
        "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT", "TOP", "UIDL", "CAPA"
    }
    assert ALLOWED_COMMANDS[State.UPDATE] == frozenset()


def test_settings_enforce_rfc_minimum_idle() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        Pop3Settings(idle_timeout=60)
    assert Pop3Settings(idle_timeout=60, enforce_rfc_idle_minimum=False).idle_timeout == 60
    with pytest.raises(ValueError, match="max_command_octets"):
        Pop3Settings(max_command_octets=200)


def test_greeting_has_apop_timestamp(server: RunningServer) -> None:
    client = Client(server.port)
    greeting = client.line()
    match = re.fullmatch(
        rb"\+OK mx\.example\.net POP3 server ready <([0-9a-f]{32})\.(\d+)@mx\.example\.net>\r\n",
        greeting,
    )
    assert match, greeting
    client.close()


# -- AUTHORIZATION state


def test_authorization_rejects_transaction_commands(server: RunningServer) -> None:
    client = Client(server.port)
    client.line()
    for command in sorted(KNOWN_COMMANDS - ALLOWED_COMMANDS[State.AUTHORIZATION]):
        reply = client.command(command.encode() + b" 1")
        assert reply == b"-ERR command not valid in this state\r\n", command
    assert client.command(b"XYZZY") == b"-ERR unknown command\r\n"
    assert client.command(b"PASS x") == b"-ERR send USER first\r\n"
    assert client.command(b"QUIT") == b"+OK mx.example.net POP3 server signing off\r\n"
    assert client.at_eof()


def test_capa_lists_extensions(server: RunningServer) -> None:
    client = Client(server.port)
    client.line()
    client.send(b"CAPA\r\n")
    assert client.multiline() == (
        b"+OK capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN SCRAM-SHA-256\r\n"
        b"RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nEXPIRE NEVER\r\nUIDL\r\n"
        b"IMPLEMENTATION mailfeed\r\n.\r\n"
    )
    client.close()


def test_login_failure_same_for_unknown_user(server: RunningServer) -> None:
    client = Client(server.port)
    assert client.login(USER, "wrong") == b"-ERR [AUTH] invalid user name or password\r\n"
    assert client.command(b"USER nobody") == b"+OK send PASS\r\n"
    assert client.command(b"PASS " + PASSWORD.encode()) == (
        b"-ERR [AUTH] invalid user name or password\r\n"
    )
    # A failed PASS needs a new USER (RFC 1939 section 7).
    assert client.command(b"PASS " + PASSWORD.encode()) == b"-ERR send USER first\r\n"
    assert client.command(b"USER " + USER.encode()) == b"+OK send PASS\r\n"
    assert client.command(b"PASS " + PASSWORD.encode()) == (
        b"+OK maildrop locked and ready, 3 messages (97 octets)\r\n"
    )
    client.close()


def test_login_delay_grows_per_address() -> None:
    throttle = _LoginThrottle(fast_settings(auth_failure_delay=0.5, auth_failure_max_delay=3.0))
    assert [throttle.failed("192.0.2.1") for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert throttle.failed("192.0.2.2") == 0.5
    throttle.succeeded("192.0.2.1")
    assert throttle.failed("192.0.2.1") == 0.5


def test_apop_rfc1939_example_and_login(site: SiteConfig) -> None:
    # RFC 1939 section 7 example: timestamp, secret "tanstaaf", and digest.
    example = hashlib.md5(b"<1896.697170952@dbc.mtview.ca.us>tanstaaf").hexdigest()
    assert example == "c4c9334bac560ecc979e58001b3e22fb"
    passwd = f"{USER}:{{PLAIN}}tanstaaf\nhashed:{hash_password('x', 'SHA512-CRYPT')}\n"
    running = start_server({USER: site, "hashed": site}, passwd_text=passwd)
    try:
        client = Client(running.port)
        greeting = client.line()
        timestamp = re.search(rb"<[^>]+>", greeting)
        assert timestamp
        wrong = hashlib.md5(timestamp.group() + b"tanstaaX").hexdigest()
        assert client.command(f"APOP {USER} {wrong}".encode()) == (
            b"-ERR [AUTH] invalid user name or password\r\n"
        )
        # APOP needs a plain secret: a hashed user cannot use it even with the right digest.
        digest = hashlib.md5(timestamp.group() + b"x").hexdigest()
        assert client.command(f"APOP hashed {digest}".encode()).startswith(b"-ERR [AUTH]")
        digest = hashlib.md5(timestamp.group() + b"tanstaaf").hexdigest()
        assert client.command(f"APOP {USER} {digest}".encode()) == (
            b"+OK maildrop locked and ready, 3 messages (97 octets)\r\n"
        )
        client.close()
    finally:
        running.stop()


def test_auth_plain_initial_and_continued(server: RunningServer) -> None:
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    client = Client(server.port)
    client.line()
    assert client.command(b"AUTH PLAIN " + base64.b64encode(b"\0site1\0bad")) == (
        b"-ERR [AUTH] invalid user name or password\r\n"
    )
    assert client.command(b"AUTH PLAIN") == b"+ \r\n"
    assert client.command(b"*") == b"-ERR authentication cancelled\r\n"
    assert client.command(b"AUTH PLAIN") == b"+ \r\n"
    assert client.command(b"not base64!") == b"-ERR malformed SASL response\r\n"
    assert client.command(b"AUTH PLAIN " + token).startswith(b"+OK maildrop locked")
    client.close()
    wait_until(sessions_ended(server))
    client = Client(server.port)
    client.line()
    assert client.command(b"AUTH PLAIN") == b"+ \r\n"
    assert client.command(token).startswith(b"+OK maildrop locked")
    client.close()


@pytest.mark.parametrize("stored", ["plain", "scram"])
def test_auth_scram_sha256(site: SiteConfig, stored: str) -> None:
    secret = "{PLAIN}" + PASSWORD if stored == "plain" else hash_password(PASSWORD, "SCRAM-SHA-256")
    running = start_server({USER: site}, passwd_text=f"{USER}:{secret}\n")
    try:
        for password, ok in (("wrong", False), (PASSWORD, True)):
            client = Client(running.port)
            client.line()
            scram = ScramClient(USER, password)
            first = base64.b64encode(scram.first().encode())
            reply = client.command(b"AUTH SCRAM-SHA-256 " + first)
            assert reply.startswith(b"+ ")
            server_first = base64.b64decode(reply[2:].strip()).decode()
            final = base64.b64encode(scram.final(server_first).encode())
            reply = client.command(final)
            if not ok:
                assert reply == b"-ERR [AUTH] invalid user name or password\r\n"
                client.close()
                continue
            assert reply.startswith(b"+ ")
            scram.check(base64.b64decode(reply[2:].strip()).decode())
            assert client.command(b"") == (
                b"+OK maildrop locked and ready, 3 messages (97 octets)\r\n"
            )
            client.close()
    finally:
        running.stop()


def test_second_login_in_use(server: RunningServer) -> None:
    first = Client(server.port)
    assert first.login().startswith(b"+OK")
    second = Client(server.port)
    assert second.login() == b"-ERR [IN-USE] maildrop is locked by another session\r\n"
    assert first.command(b"QUIT").startswith(b"+OK")
    wait_until(sessions_ended_except(server, 1))
    assert second.command(b"USER site1") == b"+OK send PASS\r\n"
    assert second.command(b"PASS " + PASSWORD.encode()).startswith(b"+OK maildrop locked")
    second.close()
    first.close()


def sessions_ended_except(server: RunningServer, count: int) -> Callable[[], bool]:
    return lambda: server.call(lambda: server.server.session_count) == count


# -- TRANSACTION state


def test_transaction_commands_exact(server: RunningServer, maildir: Path) -> None:
    client = Client(server.port)
    assert client.login() == b"+OK maildrop locked and ready, 3 messages (97 octets)\r\n"
    for command in ("USER x", "PASS x", "APOP x y", "AUTH PLAIN", "STLS"):
        assert client.command(command.encode()) == b"-ERR command not valid in this state\r\n"
    assert client.command(b"STAT") == b"+OK 3 97\r\n"
    client.send(b"LIST\r\n")
    assert client.multiline() == b"+OK 3 messages (97 octets)\r\n1 31\r\n2 30\r\n3 36\r\n.\r\n"
    assert client.command(b"LIST 2") == b"+OK 2 30\r\n"
    assert client.command(b"LIST 4") == b"-ERR no such message\r\n"
    assert client.command(b"LIST x") == b"-ERR invalid arguments: expected a message number\r\n"
    client.send(b"UIDL\r\n")
    assert client.multiline() == (
        b"+OK unique-id listing follows\r\n1 1700000000.M0P1.mx\r\n2 1700000001.M1P1.mx\r\n"
        b"3 1700000002.M2P1.mx\r\n.\r\n"
    )
    assert client.command(b"UIDL 3") == b"+OK 3 1700000002.M2P1.mx\r\n"
    client.send(b"RETR 1\r\n")
    assert client.multiline() == b"+OK 31 octets\r\nSubject: one\r\n\r\nfirst body\r\n..\r\n.\r\n"
    client.send(b"RETR 3\r\n")
    assert client.multiline() == (
        b"+OK 36 octets\r\nSubject: three\r\n\r\nno final newline\r\n.\r\n"
    )
    client.send(b"TOP 2 1\r\n")
    assert client.multiline() == (
        b"+OK top of message follows\r\nSubject: two\r\n\r\nsecond\r\n.\r\n"
    )
    client.send(b"TOP 2 0\r\n")
    assert client.multiline() == b"+OK top of message follows\r\nSubject: two\r\n\r\n.\r\n"
    client.send(b"TOP 1 99\r\n")
    assert client.multiline() == (
        b"+OK top of message follows\r\nSubject: one\r\n\r\nfirst body\r\n..\r\n.\r\n"
    )
    assert client.command(b"TOP 1") == (
        b"-ERR invalid arguments: TOP needs a message number and a line count\r\n"
    )
    assert client.command(b"NOOP") == b"+OK\r\n"
    assert client.command(b"DELE 2") == b"+OK message 2 deleted\r\n"
    assert client.command(b"DELE 2") == b"-ERR message 2 already deleted\r\n"
    assert client.command(b"RETR 2") == b"-ERR no such message\r\n"
    assert client.command(b"LIST 2") == b"-ERR no such message\r\n"
    assert client.command(b"STAT") == b"+OK 2 67\r\n"
    client.send(b"LIST\r\n")
    assert client.multiline() == b"+OK 2 messages (67 octets)\r\n1 31\r\n3 36\r\n.\r\n"
    assert client.command(b"RSET") == b"+OK maildrop has 3 messages (97 octets)\r\n"
    assert client.command(b"DELE 1") == b"+OK message 1 deleted\r\n"
    assert client.command(b"DELE 3") == b"+OK message 3 deleted\r\n"
    assert len(files_in(maildir)) == 3, "nothing is removed before QUIT"
    assert client.command(b"QUIT") == (
        b"+OK mx.example.net POP3 server signing off (1 messages left)\r\n"
    )
    assert client.at_eof()
    assert files_in(maildir) == ["1700000001.M1P1.mx,S=30,W=30"]


def test_dele_then_rset_removes_nothing(server: RunningServer, maildir: Path) -> None:
    client = Client(server.port)
    client.login()
    assert client.command(b"DELE 1") == b"+OK message 1 deleted\r\n"
    assert client.command(b"RSET") == b"+OK maildrop has 3 messages (97 octets)\r\n"
    assert client.command(b"QUIT") == (
        b"+OK mx.example.net POP3 server signing off (3 messages left)\r\n"
    )
    assert len(files_in(maildir)) == 3


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_killed_session_removes_nothing(
    server: RunningServer, maildir: Path, ending: str
) -> None:
    client = Client(server.port)
    client.login()
    for number in (1, 2, 3):
        assert client.command(b"DELE %d" % number).startswith(b"+OK")
    if ending == "reset":
        linger_zero = struct.pack("ii", 1, 0)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
    client.close()
    wait_until(sessions_ended(server))
    assert len(files_in(maildir)) == 3
    again = Client(server.port)
    assert again.login().startswith(b"+OK maildrop locked and ready, 3 messages")
    again.close()


def test_server_shutdown_removes_nothing(site: SiteConfig, maildir: Path) -> None:
    running = start_server({USER: site})
    client = Client(running.port)
    client.login()
    assert client.command(b"DELE 1").startswith(b"+OK")
    running.stop(graceful=False)
    assert client.at_eof()
    assert len(files_in(maildir)) == 3


def test_idle_timeout_removes_nothing(site: SiteConfig, maildir: Path) -> None:
    running = start_server({USER: site}, settings=fast_settings(idle_timeout=0.3))
    try:
        client = Client(running.port)
        client.login()
        assert client.command(b"DELE 1").startswith(b"+OK")
        # RFC 1939 section 3: autologout closes without a reply and without UPDATE.
        assert client.at_eof()
        assert len(files_in(maildir)) == 3
    finally:
        running.stop()


def test_login_timeout_closes(site: SiteConfig) -> None:
    running = start_server({USER: site}, settings=fast_settings(login_timeout=0.3))
    try:
        client = Client(running.port)
        client.line()
        assert client.at_eof()
    finally:
        running.stop()


# -- pipelining and limits


# Lines that test the stuffing and line-end rules across read boundaries.
READ_MESSAGES = [
    b"Subject: a\n\n.\n..\n.x\nbare\rcr\r\nmixed\n" * 50,
    b".starts with a dot\r\n\r\n" + b"x" * 300 + b"\n.\n",
    b"Subject: b\n\nends in cr\r",
]


def _retr_all(settings: Pop3Settings, path: Path) -> list[bytes]:
    running = start_server({USER: SiteConfig("site1", "maildir", path)}, settings=settings)
    try:
        client = Client(running.port)
        client.login()
        replies = []
        for number in range(1, len(READ_MESSAGES) + 1):
            client.send(b"RETR %d\r\n" % number)
            replies.append(client.multiline())
        client.close()
        return replies
    finally:
        running.stop()


def test_inline_and_threaded_reads_send_the_same_bytes(tmp_path: Path) -> None:
    make_maildir(tmp_path / "site1", READ_MESSAGES)
    # 0: every open and read in a thread; 7: inline only for no message, while
    # chunk_octets stays large; the default reads every message here inline.
    results = [_retr_all(fast_settings(inline_read_octets=octets), tmp_path / "site1")
               for octets in (0, 7, 64 * 1024)]
    assert results[0] == results[1] == results[2]
    first = results[0][0]
    body = READ_MESSAGES[0].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    body = body.replace(b"\r\n.", b"\r\n..")
    assert first == b"+OK %d octets\r\n" % wire_size_of(READ_MESSAGES[0]) + body + b".\r\n"
    assert results[0][2].endswith(b"ends in cr\r\r\n.\r\n")


def test_file_grown_past_inline_budget_is_sent_whole(tmp_path: Path) -> None:
    path = tmp_path / "site1"
    make_maildir(path, [b"Subject: grows\n\n.short\n"])
    settings = fast_settings(inline_read_octets=64)
    running = start_server({USER: SiteConfig("site1", "maildir", path)}, settings=settings)
    try:
        client = Client(running.port)
        client.login()
        # Listed at 26 octets; the file grows after the scan, past the inline budget.
        (file,) = (path / "new").iterdir()
        with file.open("ab") as out:
            out.write(b".more\n" * 100)
        client.send(b"RETR 1\r\n")
        assert client.multiline() == (
            b"+OK 26 octets\r\nSubject: grows\r\n\r\n..short\r\n" + b"..more\r\n" * 100
            + b".\r\n"
        )
        client.close()
    finally:
        running.stop()


def test_inline_read_octets_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="inline_read_octets = -1"):
        Pop3Settings(inline_read_octets=-1)


def test_pipelined_burst_answered_in_order(server: RunningServer) -> None:
    client = Client(server.port)
    client.login()
    commands = b"".join(b"NOOP\r\n" if i % 2 else b"LIST %d\r\n" % (i % 3 + 1)
                        for i in range(10_000))
    expected = b"".join(
        b"+OK\r\n" if i % 2 else b"+OK %d %d\r\n" % (i % 3 + 1, SIZES[i % 3])
        for i in range(10_000)
    )
    writes_before = server.call(lambda: server.server.stats.writes)
    client.send(commands)
    assert client.read_exact(len(expected)) == expected
    writes = server.call(lambda: server.server.stats.writes) - writes_before
    # One write per read of the burst, not one per command.
    assert writes < 100, writes
    client.close()


def test_command_line_limit(server: RunningServer) -> None:
    client = Client(server.port)
    client.login()
    line_255 = b"NOOP " + b"x" * 248 + b"\r\n"
    assert len(line_255) == 255
    client.send(line_255)
    assert client.line() == b"+OK\r\n"
    client.send(b"NOOP " + b"x" * 249 + b"\r\n")
    assert client.line() == b"-ERR command line over 255 octets\r\n"
    client.send(b"NOOP " + b"x" * 200_000 + b"\r\nSTAT\r\n")
    assert client.line() == b"-ERR command line over 255 octets\r\n"
    assert client.line() == b"+OK 3 97\r\n"
    client.close()


def test_bad_command_limit_disconnects(site: SiteConfig) -> None:
    running = start_server({USER: site}, settings=fast_settings(max_bad_commands=3))
    try:
        client = Client(running.port)
        client.line()
        client.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
        assert client.line() == b"-ERR unknown command\r\n"
        assert client.line() == b"-ERR unknown command\r\n"
        assert client.line() == b"-ERR too many invalid commands, closing the connection\r\n"
        assert client.at_eof()
    finally:
        running.stop()


def test_connection_limits(site: SiteConfig) -> None:
    settings = fast_settings(max_connections=3, max_connections_per_address=2)
    running = start_server({USER: site}, settings=settings)
    try:
        first, second = Client(running.port), Client(running.port)
        assert first.line().startswith(b"+OK")
        assert second.line().startswith(b"+OK")
        third = Client(running.port)
        assert third.line() == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
        assert third.at_eof()
        first.close()
        wait_until(sessions_ended_except(running, 1))
        fourth = Client(running.port)
        assert fourth.line().startswith(b"+OK")
        fourth.close()
        second.close()
    finally:
        running.stop()


def test_stalled_reader_bounded_output(tmp_path: Path) -> None:
    big = (b"x" * 998 + b"\n") * 16_000
    path = tmp_path / "big"
    make_maildir(path, [big])
    settings = fast_settings(output_flush_octets=64 * 1024)
    running = start_server({USER: SiteConfig("site1", "maildir", path)}, settings=settings)
    try:
        client = Client(running.port)
        client.login()
        client.send(b"RETR 1\r\n")

        def held() -> int:
            conn = next(iter(running.server._sessions))
            assert conn.transport is not None
            return conn.pending_output + conn.transport.get_write_buffer_size()

        def stalled() -> bool:
            conn = next(iter(running.server._sessions))
            return not conn._writable.is_set()

        # 16 MB is more than the kernel's socket buffers take, so the server must stall.
        wait_until(lambda: running.call(stalled))
        # Transport high-water mark (64 KiB) plus one flush batch plus one read chunk.
        assert running.call(held) <= 64 * 1024 + 64 * 1024 + 512 * 1024
        status = client.line()
        assert status == b"+OK %d octets\r\n" % (len(big) + 16_000)
        body = client.read_exact(len(big) + 16_000 + 3)
        assert body.endswith(b"\r\n.\r\n")
        client.close()
    finally:
        running.stop()


# -- TLS and the plaintext policy


def test_plaintext_policy_function() -> None:
    assert plaintext_allowed(tls_active=True, local_is_loopback=False, allow_plaintext=False)
    assert plaintext_allowed(tls_active=False, local_is_loopback=True, allow_plaintext=False)
    assert plaintext_allowed(tls_active=False, local_is_loopback=False, allow_plaintext=True)
    assert not plaintext_allowed(tls_active=False, local_is_loopback=False, allow_plaintext=False)
    assert pop3server.ip_is_loopback("127.0.0.2")
    assert pop3server.ip_is_loopback("::1")
    assert not pop3server.ip_is_loopback("192.0.2.1")


def test_plaintext_refused_off_loopback(site: SiteConfig, tls_files: TlsFiles) -> None:
    running = start_server({USER: site}, tls=tls_files, is_loopback=lambda _ip: False)
    try:
        client = Client(running.port)
        client.line()
        client.send(b"CAPA\r\n")
        capa = client.multiline()
        assert b"\r\nUSER\r\n" not in capa
        assert b"\r\nSASL SCRAM-SHA-256\r\n" in capa
        assert b"\r\nSTLS\r\n" in capa
        refused = b"-ERR [AUTH] plaintext authentication needs TLS here; use STLS\r\n"
        assert client.command(b"USER site1") == refused
        assert client.command(b"PASS " + PASSWORD.encode()) == refused
        assert client.command(b"APOP site1 " + b"0" * 32) == refused
        assert client.command(b"AUTH PLAIN " + base64.b64encode(b"\0site1\0x")) == refused
        assert client.command(b"STLS") == b"+OK begin TLS negotiation\r\n"
        client.starttls(tls_files.client_context())
        client.send(b"CAPA\r\n")
        capa = client.multiline()
        assert b"\r\nUSER\r\n" in capa
        assert b"\r\nSASL PLAIN SCRAM-SHA-256\r\n" in capa
        assert b"STLS" not in capa
        assert client.command(b"USER site1") == b"+OK send PASS\r\n"
        assert client.command(b"PASS " + PASSWORD.encode()).startswith(b"+OK maildrop locked")
        client.close()
    finally:
        running.stop()


def test_stls_discards_injected_command(site: SiteConfig, tls_files: TlsFiles) -> None:
    running = start_server({USER: site}, tls=tls_files)
    try:
        client = Client(running.port)
        client.line()
        client.send(b"STLS\r\nUSER site1\r\n")
        assert client.line() == b"+OK begin TLS negotiation\r\n"
        client.starttls(tls_files.client_context())
        # The injected USER got no reply and set no user name.
        assert client.command(b"PASS " + PASSWORD.encode()) == b"-ERR send USER first\r\n"
        assert client.command(b"STLS") == b"-ERR command not permitted when TLS active\r\n"
        assert client.command(b"USER site1") == b"+OK send PASS\r\n"
        assert client.command(b"PASS " + PASSWORD.encode()).startswith(b"+OK maildrop locked")
        client.close()
    finally:
        running.stop()


def test_stls_unavailable_without_context(server: RunningServer) -> None:
    client = Client(server.port)
    client.line()
    assert client.command(b"STLS") == b"-ERR STLS is not available on this listener\r\n"
    client.close()


def test_scram_hidden_when_a_user_cannot_use_it(site: SiteConfig) -> None:
    secret = hash_password(PASSWORD, "ARGON2ID")
    running = start_server({USER: site}, passwd_text=f"{USER}:{secret}\n")
    try:
        client = Client(running.port)
        client.line()
        client.send(b"CAPA\r\n")
        capa = client.multiline()
        assert b"SASL PLAIN\r\n" in capa
        assert b"SCRAM-SHA-256" not in capa
        client.send(b"AUTH\r\n")
        assert client.multiline().endswith(b"\r\nPLAIN\r\n.\r\n")
        reply = client.command(b"AUTH SCRAM-SHA-256")
        assert reply.startswith(b"-ERR")
        client.close()
    finally:
        running.stop()
