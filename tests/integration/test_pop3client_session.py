"""POP3 client sessions: pipelining flights, TLS, login mechanisms, timeouts."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from mailfeed import pop3client
from mailfeed.pop3client import (
    Pop3AuthError,
    Pop3ServerError,
    Pop3Timeout,
    Pop3TlsError,
    Timeouts,
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
    Entry,
    Pop3Script,
    ScriptedPop3Server,
    Step,
    TlsMaterial,
    make_tls_material,
)

NO_PIPELINING = ("USER", "UIDL", "TOP")


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


def mailbox(count: int) -> list[tuple[str, bytes]]:
    return [
        (f"uid-{n}", b"Subject: message %d\r\n\r\n.leading dot\r\nbody %d\r\n" % (n, n))
        for n in range(1, count + 1)
    ]


async def drain(server: ScriptedPop3Server, window: int = 64) -> None:
    """UIDL+LIST, RETR all, DELE all, QUIT: the fetcher's flow."""
    client = await plain_client(server)
    await client.login(USER, PASSWORD)
    listing, sizes = await client.uidl_and_list()
    results, _ = await retrieve_all(client, sorted(listing.entries), sizes, window=window)
    assert all(result.ok for result in results)
    deleted = await client.delete_many(sorted(listing.entries))
    assert all(deleted.values())
    assert await client.quit()
    await session_end(server)


def drain_flights(count: int, *, capabilities: tuple[str, ...] | None = None,
                  window: int = 64) -> ScriptedPop3Server:
    async def scenario() -> ScriptedPop3Server:
        kwargs: dict[str, Any] = {}
        if capabilities is not None:
            kwargs["capabilities"] = capabilities
        script = Pop3Script.from_messages(mailbox(count), **kwargs)
        async with ScriptedPop3Server(script) as server:
            await drain(server, window)
        return server

    return run(scenario())


def test_pipelined_drain_flights_constant() -> None:
    small = drain_flights(3)
    large = drain_flights(40)
    assert len(small.flights) == len(large.flights)
    assert large.command_flights(["RETR"]) == 1
    assert large.command_flights(["DELE"]) == 1
    assert ["UIDL", "LIST"] in large.flights
    assert large.dele_received == list(range(1, 41))


def test_fetcher_flow_flights() -> None:
    """USER+PASS, UIDL+LIST, every RETR, every DELE with QUIT: four flights after CAPA."""
    async def scenario() -> ScriptedPop3Server:
        async with ScriptedPop3Server(Pop3Script.from_messages(mailbox(30))) as server:
            client = await plain_client(server)
            await client.login(USER, PASSWORD)
            listing, sizes = await client.uidl_and_list()
            results, _ = await retrieve_all(client, sorted(listing.entries), sizes,
                                            window=pop3client.DEFAULT_RETR_WINDOW)
            assert all(result.ok for result in results)
            acked, quit_ok = await client.delete_and_quit(sorted(listing.entries))
            assert quit_ok
            assert acked == {n: True for n in range(1, 31)}
            await session_end(server)
        return server

    server = run(scenario())
    assert server.flights[1] == ["USER site1", f"PASS {PASSWORD}"]
    assert ["UIDL", "LIST"] in server.flights
    assert server.command_flights(["RETR"]) == 1
    assert server.flights[-1] == [*(f"DELE {n}" for n in range(1, 31)), "QUIT"]
    assert len(server.flights) == 5
    assert server.dele_received == list(range(1, 31))


def test_delete_and_quit_window_splits_deletes() -> None:
    async def scenario() -> ScriptedPop3Server:
        async with ScriptedPop3Server(Pop3Script.from_messages(mailbox(5))) as server:
            client = await plain_client(server)
            await client.login(USER, PASSWORD)
            acked, quit_ok = await client.delete_and_quit([1, 2, 3, 4, 5], window=2)
            assert quit_ok
            assert all(acked.values())
            await session_end(server)
        return server

    server = run(scenario())
    assert server.flights[-3:] == [["DELE 1", "DELE 2"], ["DELE 3", "DELE 4"],
                                   ["DELE 5", "QUIT"]]


def test_pipelined_window_bounds_outstanding() -> None:
    server = drain_flights(20, window=4)
    retr_flights = [f for f in server.flights if f[0].startswith("RETR")]
    assert all(len(flight) <= 4 for flight in retr_flights)
    assert sum(len(flight) for flight in retr_flights) == 20
    assert len(retr_flights) <= 20 // 2 + 1


def test_lock_step_without_pipelining() -> None:
    server = drain_flights(5, capabilities=NO_PIPELINING)
    assert all(len(flight) == 1 for flight in server.flights)
    assert server.command_flights(["RETR"]) == 5
    assert server.command_flights(["DELE"]) == 5
    assert server.command_flights(["UIDL"]) == 1


def test_retr_err_and_size_mismatch_fail_one_message() -> None:
    async def scenario() -> None:
        script = Pop3Script.from_messages(mailbox(3))
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server)
            await client.login(USER, PASSWORD)
            sizes = await client.list_all()
            sizes[2] += 1
            results, _ = await retrieve_all(client, [1, 2, 9, 3], sizes)
            assert [r.ok for r in results] == [True, False, False, True]
            assert "size mismatch: LIST gave" in (results[1].error or "")
            assert "-ERR no such message" in (results[2].error or "")
            assert await client.quit()

    run(scenario())


def test_closed_iterator_replies_are_discarded() -> None:
    async def scenario() -> None:
        script = Pop3Script.from_messages(mailbox(6))
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server)
            await client.login(USER, PASSWORD)
            iterator = client.retrieve(
                [1, 2, 3, 4, 5, 6], open_sink=lambda n: io.BytesIO()
            )
            first = await anext(iterator)
            assert first.ok
            await iterator.aclose()  # type: ignore[attr-defined]
            assert await client.stat() == (6, sum(len(m) for _, m in mailbox(6)))
            assert await client.quit()

    run(scenario())


def test_connection_reset_mid_reply_yields_then_raises() -> None:
    async def scenario() -> None:
        script = Pop3Script.from_messages(mailbox(2))
        script.entries.append(
            Entry(b"RETR 2", None, False, [Step("send", b"+OK\r\npartial\r\n"), Step("reset")])
        )
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server)
            await client.login(USER, PASSWORD)
            results = []
            with pytest.raises(pop3client.Pop3ProtocolError):
                async for result in client.retrieve([1, 2], open_sink=lambda n: _sink()):
                    results.append(result)
            assert [r.ok for r in results] == [True, False]
            assert not await client.quit()

    run(scenario())


def _sink() -> io.BytesIO:
    return io.BytesIO()


# -- timeouts -----------------------------------------------------------------


def test_greeting_timeout() -> None:
    async def scenario() -> None:
        script = Pop3Script.from_messages([])
        script.opening = [Step("stall", 30)]
        async with ScriptedPop3Server(script) as server:
            with pytest.raises(Pop3Timeout) as caught:
                await plain_client(server, timeouts=Timeouts(greeting=0.2))
            assert caught.value.phase == "greeting"

    run(scenario())


def test_command_and_data_timeouts() -> None:
    async def scenario() -> None:
        script = Pop3Script.from_messages(mailbox(2))
        script.entries += [
            Entry(b"RETR 1", None, False, [Step("send", b"+OK\r\nline\r\n.\r"), Step("stall", 30)]),
            Entry(b"STAT", None, False, [Step("stall", 30)]),
        ]
        timeouts = Timeouts(command=0.2, data=0.2)
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server, timeouts=timeouts)
            await client.login(USER, PASSWORD)
            with pytest.raises(Pop3Timeout) as caught:
                async for result in client.retrieve([1], open_sink=lambda n: _sink()):
                    assert not result.ok
            assert caught.value.phase == "data"
            assert "CR without LF" in str(caught.value)
            with pytest.raises(Pop3Timeout):
                await client.stat()  # the session stays broken by the first timeout
            client2 = await plain_client(server, timeouts=timeouts)
            await client2.login(USER, PASSWORD)
            with pytest.raises(Pop3Timeout) as caught:
                await client2.stat()
            assert caught.value.phase == "command"

    run(scenario())


def test_retr_streaming_without_end_hits_message_deadline() -> None:
    async def scenario() -> None:
        script = Pop3Script.from_messages(mailbox(1))
        # A line every 20 ms for 20 s: never silent for the data timeout.
        endless = [Step("send", b"+OK\r\n")]
        for _ in range(1000):
            endless += [Step("send", b"more of the same line\r\n"), Step("stall", 0.02)]
        script.entries.append(Entry(b"RETR 1", None, False, endless))
        timeouts = Timeouts(data=5, message=0.3)
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(server, timeouts=timeouts)
            await client.login(USER, PASSWORD)
            results = []
            with pytest.raises(Pop3Timeout) as caught:
                async for result in client.retrieve([1], open_sink=lambda n: _sink()):
                    results.append(result)
            assert caught.value.phase == "message"
            assert "RETR 1 did not end within limits.timeouts.message = 0.3 s" in str(
                caught.value)
            assert [(r.ok, r.failure) for r in results] == [
                (False, pop3client.RetrFailure.BROKEN)]

    run(scenario())


# -- TLS ------------------------------------------------------------------------


def test_implicit_tls_verifies_with_ca(tls_material: TlsMaterial) -> None:
    async def scenario() -> None:
        script = Pop3Script.from_messages(mailbox(1))
        async with ScriptedPop3Server(script, tls=tls_material, implicit_tls=True) as server:
            client = await connect(
                server.host, server.port, tls=TlsMode.IMPLICIT,
                ssl_context=pop3client.client_ssl_context(str(tls_material.cert_file)),
                server_hostname="localhost",
            )
            assert client.tls_active
            await client.login(USER, PASSWORD)
            assert await client.quit()

    run(scenario())


@pytest.mark.parametrize("mode", [TlsMode.IMPLICIT, TlsMode.STARTTLS])
def test_tls_untrusted_certificate_stops_before_credentials(
    mode: TlsMode, tls_material: TlsMaterial
) -> None:
    async def scenario() -> None:
        script = Pop3Script.from_messages(mailbox(1))
        async with ScriptedPop3Server(
            script, tls=tls_material, implicit_tls=mode is TlsMode.IMPLICIT
        ) as server:
            with pytest.raises(Pop3TlsError) as caught:
                await connect(server.host, server.port, tls=mode)  # system store only
            assert "certificate verify failed" in str(caught.value)
            if mode is TlsMode.STARTTLS:
                await session_end(server)
                assert server.sent("STLS")
            # With implicit TLS the failed handshake never reaches the session handler.
            for verb in ("USER", "PASS", "APOP", "AUTH"):
                assert not server.sent(verb)
            assert server.tls_established == 0

    run(scenario())


def test_plaintext_to_remote_host_refused_before_connect() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def no_connect(*args: object, **kwargs: object) -> Any:
            raise AssertionError("connect() opened a connection")

        loop.create_connection = no_connect  # type: ignore[method-assign]
        with pytest.raises(Pop3TlsError, match="not a loopback address"):
            await connect("mx.example.net", 110, tls=TlsMode.NONE)

    run(scenario())


# -- login mechanisms -----------------------------------------------------------


def login_with(
    script: Pop3Script, password: str = PASSWORD
) -> tuple[ScriptedPop3Server, list[str]]:
    trace: list[str] = []

    async def scenario() -> ScriptedPop3Server:
        async with ScriptedPop3Server(script) as server:
            client = await plain_client(
                server, trace=lambda direction, text: trace.append(f"{direction} {text}")
            )
            try:
                await client.login(USER, password)
                assert await client.stat() == (1, len(mailbox(1)[0][1]))
            finally:
                await client.close()
        return server

    return run(scenario()), trace


def test_login_prefers_scram() -> None:
    script = Pop3Script.from_messages(mailbox(1), sasl=["PLAIN", "SCRAM-SHA-256"])
    server, trace = login_with(script)
    assert server.received[1].startswith("AUTH SCRAM-SHA-256 ")
    assert not server.sent("PASS")
    assert not any(PASSWORD in line for line in trace)
    assert "C AUTH SCRAM-SHA-256 ********" in trace


def test_login_plain_on_loopback() -> None:
    script = Pop3Script.from_messages(mailbox(1), sasl=["PLAIN"])
    server, trace = login_with(script)
    assert server.received[1].startswith("AUTH PLAIN ")
    assert not any(PASSWORD in line for line in trace)


def test_login_apop_with_valid_timestamp() -> None:
    script = Pop3Script.from_messages(mailbox(1), apop_timestamp="<1896.697170952@mx.example.net>")
    server, trace = login_with(script)
    assert server.received[1].startswith("APOP site1 ")
    assert "C APOP site1 ********" in trace


def test_login_invalid_timestamp_falls_to_user_pass() -> None:
    script = Pop3Script.from_messages(mailbox(1), apop_timestamp="<not-a-msg-id>")
    server, trace = login_with(script)
    assert server.received[1:3] == ["USER site1", f"PASS {PASSWORD}"]
    assert "C PASS ********" in trace


@pytest.mark.parametrize("sasl", [[], ["SCRAM-SHA-256"], ["PLAIN"]])
def test_login_wrong_password_auth_error(sasl: list[str]) -> None:
    script = Pop3Script.from_messages(mailbox(1), sasl=sasl)
    with pytest.raises(Pop3AuthError) as caught:
        login_with(script, password="wrong")
    assert caught.value.code == "AUTH"


def test_server_error_carries_response_code() -> None:
    script = Pop3Script.from_messages(mailbox(1))
    script.entries.append(
        Entry(b"PASS " + PASSWORD.encode(), None, False,
              [Step("send", b"-ERR [IN-USE] Do you have another POP session running?\r\n")])
    )
    with pytest.raises(Pop3ServerError) as caught:
        login_with(script)
    assert caught.value.code == "IN-USE"
    assert "another POP session" in str(caught.value)
