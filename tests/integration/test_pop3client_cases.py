"""POP3 client against replayed case dialogues and every RETR wire file."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from mailfeed.pop3client import (
    Pop3ProtocolError,
    Pop3TlsError,
    TlsMode,
    connect,
)
from tests.integration.pop3_helpers import (
    PASSWORD,
    USER,
    plain_client,
    retrieve_all,
    run,
    session_end,
)
from tests.scripted_pop3 import (
    Pop3Script,
    ScriptedMessage,
    ScriptedPop3Server,
    TlsMaterial,
    make_tls_material,
    unstuff_wire,
)
from tests.support import CASES_DIR, case_bytes

CREDENTIAL_COMMANDS = ("USER", "PASS", "APOP", "AUTH")
MAILBOX_COMMANDS = ("STAT", "LIST", "UIDL", "RETR", "TOP", "DELE")


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


def delivered_form(data: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


@pytest.mark.parametrize("variant", ["H01a", "H01b"])
def test_h01_starttls_failure_sends_no_credentials(
    variant: str, tls_material: TlsMaterial
) -> None:
    async def scenario() -> None:
        script = Pop3Script.from_dialogue(f"{variant}.pop3-dialogue.txt")
        async with ScriptedPop3Server(script, tls=tls_material) as server:
            with pytest.raises(Pop3TlsError) as caught:
                await connect(
                    server.host, server.port, tls=TlsMode.STARTTLS,
                    ssl_context=tls_material.client_context(),
                )
            await session_end(server)
            for verb in CREDENTIAL_COMMANDS + MAILBOX_COMMANDS:
                assert not server.sent(verb), f"client sent {verb}"
            message = str(caught.value)
            if variant == "H01a":
                assert "does not list STLS" in message
            else:
                assert "-ERR TLS is not available right now" in message

    run(scenario())


def test_h01c_forged_reply_never_read(
    tls_material: TlsMaterial, caplog: pytest.LogCaptureFixture
) -> None:
    trace: list[tuple[str, str]] = []

    async def scenario() -> None:
        script = Pop3Script.from_dialogue("H01c.pop3-dialogue.txt")
        async with ScriptedPop3Server(script, tls=tls_material) as server:
            client = await connect(
                server.host, server.port, tls=TlsMode.STARTTLS,
                ssl_context=tls_material.client_context(),
                trace=lambda direction, text: trace.append((direction, text)),
            )
            assert client.tls_active
            # Only the CAPA asked under TLS lists TOP.
            assert set(client.capabilities) == {"USER", "UIDL", "TOP", "PIPELINING"}
            assert server.tls_established == 1
            await client.login(USER, PASSWORD)
            listing = await client.uidl_all()
            assert listing.entries == {1: "h01-uid-1"}
            results, bodies = await retrieve_all(client, [1])
            assert results[0].ok
            assert bodies[1] == case_bytes("H01.retr-1.eml")
            assert await client.delete_many([1]) == {1: True}
            assert await client.quit()
        # The server's reply lines as the client read them, in order.
        server_lines = [text for direction, text in trace if direction == "S"]
        assert server_lines[:3] == [
            "+OK mx.example.net POP3 ready",
            "+OK Capability list follows",
            "+OK Begin TLS negotiation",
        ]
        assert server_lines[3] == "+OK Capability list follows"
        assert server_lines.count("+OK Logged in.") == 1
        client_lines = [text for direction, text in trace if direction == "C"]
        assert client_lines[:4] == ["CAPA", "STLS", "CAPA", "USER site1"]

    with caplog.at_level(logging.WARNING, logger="mailfeed.pop3client"):
        run(scenario())
    assert "dropped 16 octets received after the STLS reply" in caplog.text


def test_injection_after_synthesised_stls(tls_material: TlsMaterial) -> None:
    async def scenario() -> None:
        script = Pop3Script.from_messages([("uid-1", b"Subject: x\r\n\r\nbody\r\n")])
        async with ScriptedPop3Server(
            script, tls=tls_material, inject_after={"STLS": b"+OK Logged in.\r\n"}
        ) as server:
            client = await connect(
                server.host, server.port, tls=TlsMode.STARTTLS,
                ssl_context=tls_material.client_context(),
            )
            assert "STLS" not in client.capabilities
            assert "PIPELINING" in client.capabilities
            await client.login(USER, PASSWORD)
            assert await client.stat() == (1, len(b"Subject: x\r\n\r\nbody\r\n"))
            await client.close()

    run(scenario())


def test_h03_defects_named_good_entries_kept() -> None:
    async def scenario() -> None:
        script = Pop3Script.from_dialogue("H03.pop3-dialogue.txt")
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server)
            await client.login(USER, PASSWORD)
            listing = await client.uidl_all()
            assert sorted(listing.entries) == [6, 7]
            reasons = " | ".join(reason for _, reason in listing.defects)
            assert "message 1: unique-id longer than 70 octets" in reasons
            assert "message 2: no unique-id" in reasons
            assert "UIDL line 'x3 not-a-message-number' unparseable" in reasons
            assert "messages 4 and 5: duplicate unique-id dup-0004" in reasons
            results, bodies = await retrieve_all(client, sorted(listing.entries))
            assert [r.ok for r in results] == [True, True]
            assert bodies[6] == case_bytes("H03.retr-6.eml")
            assert bodies[7] == case_bytes("H03.retr-7.eml")
            assert await client.delete_many([6, 7]) == {6: True, 7: True}
            assert await client.quit()
            await session_end(server)
        assert server.dele_received == [6, 7]
        for msgnum in range(1, 6):
            assert f"RETR {msgnum}" not in server.received
            assert f"DELE {msgnum}" not in server.received

    run(scenario())


def test_h04_plus_err_after_pass_is_failure() -> None:
    async def scenario() -> None:
        script = Pop3Script.from_dialogue("H04.pop3-dialogue.txt")
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server)
            with pytest.raises(Pop3ProtocolError) as caught:
                await client.login(USER, PASSWORD)
            assert "'+ERR internal error while opening the mailbox'" in str(caught.value)
            with pytest.raises(Pop3ProtocolError):
                await client.uidl_all()
            await session_end(server)
        for verb in MAILBOX_COMMANDS:
            assert not server.sent(verb), f"client sent {verb}"

    run(scenario())


@pytest.mark.parametrize(
    ("dialogue", "expected_file"),
    [("H05", "H05.retr-1.eml"), ("H05b", "H05b.spool.eml"), ("H18", "H18.retr-1.eml")],
)
def test_dialogue_retrieves_exact_bytes(dialogue: str, expected_file: str) -> None:
    expected = delivered_form(case_bytes(expected_file))

    async def scenario() -> None:
        script = Pop3Script.from_dialogue(f"{dialogue}.pop3-dialogue.txt")
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server)
            await client.login(USER, PASSWORD)
            listing, sizes = await client.uidl_and_list()
            results, bodies = await retrieve_all(client, list(listing.entries), sizes)
            assert results[0].ok, results[0].error
            assert bodies[1] == expected
            assert results[0].size == len(expected)
            assert await client.delete_many([1]) == {1: True}
            assert await client.quit()

    run(scenario())


def _h18b_script() -> Pop3Script:
    return Pop3Script.from_dialogue("H18b.pop3-dialogue.txt")


@pytest.mark.parametrize("limit", [1_100_002, 2_000_000])
def test_h18b_long_line_within_limit(limit: int) -> None:
    wire = case_bytes("H18b.retr-1.wire")

    async def scenario() -> None:
        async with ScriptedPop3Server(_h18b_script()) as server:
            client = await plain_client(server, max_line_length=limit)
            await client.login(USER, PASSWORD)
            _listing, sizes = await client.uidl_and_list()
            results, bodies = await retrieve_all(client, [1], sizes)
            assert results[0].ok, results[0].error
            assert bodies[1] == unstuff_wire(wire)
            assert bodies[1].endswith(case_bytes("H18b.eml"))
            assert max(len(line) for line in bodies[1].splitlines(keepends=True)) == 1_100_002
            await client.close()

    run(scenario())


def test_h18b_over_limit_fails_and_stays_in_sync(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        script = _h18b_script()
        script.messages[2] = ScriptedMessage("h18b-uid-2", b"Subject: short\r\n\r\nok\r\n")
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server, max_line_length=1_048_576)
            await client.login(USER, PASSWORD)
            sizes = await client.list_all()
            results, bodies = await retrieve_all(client, [1, 2], sizes)
            assert not results[0].ok
            assert results[0].error is not None
            assert "max_line_length=1048576" in results[0].error
            assert "1100002 octets" in results[0].error
            assert results[1].ok
            assert bodies[2] == b"Subject: short\r\n\r\nok\r\n"
            assert await client.stat() == (2, sizes[1] + sizes[2])
            assert await client.quit()
            await session_end(server)
        assert not server.sent("DELE")

    with caplog.at_level(logging.WARNING, logger="mailfeed.pop3client"):
        run(scenario())
    assert "max_line_length=1048576" in caplog.text


def _wire_cases() -> list[tuple[str, str | None]]:
    cases: list[tuple[str, str | None]] = []
    for wire in sorted(CASES_DIR.glob("*.wire")):
        name = wire.name
        if ".retr-" in name:
            expected = name.replace(".wire", ".eml")
        else:
            expected = name.replace(".wire", ".retr.eml")
        if not (CASES_DIR / expected).exists():
            spool = name.split(".")[0] + ".spool.eml"
            expected = spool if (CASES_DIR / spool).exists() else None
        cases.append((name, expected))
    return cases


@pytest.mark.parametrize(("wire_name", "expected_name"), _wire_cases())
def test_every_wire_file_retrieves_to_its_message(
    wire_name: str, expected_name: str | None
) -> None:
    wire = case_bytes(wire_name)
    reference = unstuff_wire(wire)
    if expected_name is not None:
        assert reference == delivered_form(case_bytes(expected_name)) or reference == b""

    async def scenario() -> None:
        script = Pop3Script.from_messages([("uid-1", reference)])
        script.messages[1].wire = wire
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server, max_line_length=2_000_000)
            await client.login(USER, PASSWORD)
            sizes = await client.list_all()
            results, bodies = await retrieve_all(client, [1], sizes)
            assert results[0].ok, results[0].error
            assert bodies.get(1, b"") == reference
            if expected_name is not None and reference:
                assert bodies[1] == delivered_form(case_bytes(expected_name))
            await client.close()

    run(scenario())


def test_wire_case_list_covers_folder() -> None:
    names = [name for name, _ in _wire_cases()]
    assert len(names) == len(list(Path(CASES_DIR).glob("*.wire")))
    assert len(names) >= 30
