"""Tests for bench/delayproxy.py: flight counting, order and byte integrity.

No assertion here is about time: the proxy's delays are exercised (a small
non-zero delay) but only what arrives, in which order, and how the flights
are counted are checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from bench.delayproxy import DelayProxy, FlightCounter, ThreadedDelayProxy

DELAY = 0.002


def test_flight_counter_lockstep() -> None:
    counter = FlightCounter()
    counter.server_delivered(20)  # greeting
    counter.client_chunk(6)
    counter.server_delivered(5)
    counter.client_chunk(6)
    assert counter.flights == 2


def test_flight_counter_burst_is_one_flight() -> None:
    counter = FlightCounter()
    for _ in range(100):
        counter.client_chunk(10)
    assert counter.flights == 1


def test_flight_counter_ignores_empty_chunks() -> None:
    counter = FlightCounter()
    counter.client_chunk(0)
    counter.server_delivered(0)
    assert counter.flights == 0
    counter.client_chunk(1)
    counter.server_delivered(0)
    counter.client_chunk(1)
    assert counter.flights == 1


def test_flight_counter_first_chunk_before_greeting() -> None:
    counter = FlightCounter()
    counter.client_chunk(3)
    counter.server_delivered(3)
    counter.server_delivered(3)
    counter.client_chunk(3)
    counter.client_chunk(3)
    assert counter.flights == 2


BIG = os.urandom(3 * 1024 * 1024 + 17)


async def _scripted_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"+OK hello\r\n")
    await writer.drain()
    # Flight 1: one command, one reply.
    line = await reader.readline()
    writer.write(b"+OK " + line)
    await writer.drain()
    # Flight 2: 200 numbered lines in one burst, answered once all arrived.
    lines = [await reader.readline() for _ in range(200)]
    writer.write(b"".join(b"+OK " + item for item in lines))
    await writer.drain()
    # Flight 3: a large upload, answered with its digest and a large download.
    upload = await reader.readexactly(len(BIG))
    writer.write(hashlib.sha256(upload).hexdigest().encode() + b"\r\n" + BIG)
    await writer.drain()
    # The client half-closes; all its data must arrive before the end of stream.
    tail = await reader.read()
    writer.write(b"tail " + str(len(tail)).encode() + b"\r\n")
    await writer.drain()
    writer.close()


async def _scripted_client(port: int) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = [await reader.readline()]
    writer.write(b"ONE\r\n")
    received.append(await reader.readline())
    for number in range(200):
        writer.write(b"LINE %d\r\n" % number)
    await writer.drain()
    received.extend([await reader.readline() for _ in range(200)])
    for offset in range(0, len(BIG), 65536):
        writer.write(BIG[offset:offset + 65536])
    await writer.drain()
    received.append(await reader.readline())
    received.append(await reader.readexactly(len(BIG)))
    writer.write(b"x" * 1000)
    writer.write_eof()
    received.append(await reader.read())
    writer.close()
    return received


async def _run_exchange() -> tuple[list[bytes], DelayProxy]:
    server = await asyncio.start_server(_scripted_server, "127.0.0.1", 0)
    target_port = server.sockets[0].getsockname()[1]
    async with DelayProxy("127.0.0.1", target_port, DELAY) as proxy:
        received = await _scripted_client(proxy.port)
        await asyncio.wait_for(proxy.wait_idle(), 30)
    server.close()
    await server.wait_closed()
    return received, proxy


def test_proxy_relays_in_order() -> None:
    received, _proxy = asyncio.run(_run_exchange())
    assert received[0] == b"+OK hello\r\n"
    assert received[1] == b"+OK ONE\r\n"
    assert received[2:202] == [b"+OK LINE %d\r\n" % n for n in range(200)]


def test_proxy_keeps_bytes_intact() -> None:
    received, _proxy = asyncio.run(_run_exchange())
    assert received[202] == hashlib.sha256(BIG).hexdigest().encode() + b"\r\n"
    assert received[203] == BIG
    assert received[204] == b"tail 1000\r\n"


def test_proxy_counts_flights_and_bytes() -> None:
    _received, proxy = asyncio.run(_run_exchange())
    assert len(proxy.sessions) == 1
    stats = proxy.sessions[0]
    assert stats.error == ""
    # ONE, the 200 lines, the upload, the 1000-byte tail.
    assert stats.flights == 4
    expected_up = 5 + sum(len(b"LINE %d\r\n" % n) for n in range(200)) + len(BIG) + 1000
    assert stats.client_bytes == expected_up
    expected_down = (11 + 9 + sum(len(b"+OK LINE %d\r\n" % n) for n in range(200))
                     + 66 + len(BIG) + 11)
    assert stats.server_bytes == expected_down
    assert stats.ended >= stats.started


def test_threaded_proxy_reports_sessions() -> None:
    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(serve_one, "127.0.0.1", 0))
    target_port = server.sockets[0].getsockname()[1]

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        data = await reader.read()
        writer.close()
        return data

    with ThreadedDelayProxy("127.0.0.1", target_port, DELAY) as proxy:
        assert loop.run_until_complete(client(proxy.port)) == b"ping"
        sessions = proxy.take_sessions()
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.close()
    assert [s.client_bytes for s in sessions] == [4]
    assert [s.flights for s in sessions] == [1]
