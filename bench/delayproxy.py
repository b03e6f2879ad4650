"""A TCP relay on 127.0.0.1 that models a slow link by delaying each direction.

The kernel on the benchmark machines has no ``netem`` queueing discipline, so
the benchmarks model a link with a round-trip time by relaying each TCP
connection through this proxy.  Every chunk read from one side is timestamped
and written to the other side at ``read time + delay``.  Chunks keep their
order, and the proxy adds no bandwidth limit: a large burst arrives
``delay`` seconds late, not later.  End of stream (a half close) is delayed
like data.  With ``--delay 0.05`` the round-trip time is 100 ms.

Per session the proxy records the bytes and chunks in each direction, the
time on the line (accept to the close of both directions) and the number of
client *flights*:

    A flight is a maximal run of client-to-server chunks such that the proxy
    delivered no server-to-client data to the client between two of them.

A client chunk counts when the proxy reads it from the client.  A server chunk
counts when the proxy writes it to the client, after its delay.  A client that
waits for a reply before each command makes one flight per command.  A client
that pipelines a whole batch and then waits makes one flight per batch.  A
client that keeps a window of commands in flight and tops it up as replies
arrive makes one flight per top-up even though it may never stall, so read
flights together with the time on the line.

Library use::

    async with DelayProxy("127.0.0.1", target_port, delay=0.05) as proxy:
        ...connect to proxy.port...
    proxy.sessions   # list of SessionStats

or, from synchronous code, :class:`ThreadedDelayProxy`.  Command line::

    python bench/delayproxy.py --listen 127.0.0.1:0 --target 127.0.0.1:PORT --delay 0.05

prints the listening address, then one JSON line per closed session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import TracebackType

__all__ = [
    "DelayProxy",
    "FlightCounter",
    "SessionStats",
    "ThreadedDelayProxy",
    "main",
]

log = logging.getLogger(__name__)

_SizeCallback = Callable[[int], None]

# Maximum bytes read from a socket at once.  Each read is relayed as one chunk.
READ_SIZE = 256 * 1024


class FlightCounter:
    """Counts client flights from the order of client reads and server deliveries."""

    def __init__(self) -> None:
        self.flights = 0
        # True when server data reached the client since the last client chunk,
        # and at the start, so that the first client chunk opens flight 1.
        self._reply_delivered = True

    def client_chunk(self, size: int) -> None:
        if size <= 0:
            return
        if self._reply_delivered:
            self.flights += 1
            self._reply_delivered = False

    def server_delivered(self, size: int) -> None:
        if size > 0:
            self._reply_delivered = True


@dataclass
class SessionStats:
    """Counters and times of one relayed connection, in bytes and monotonic seconds."""

    session: int
    started: float
    ended: float = 0.0
    client_bytes: int = 0
    server_bytes: int = 0
    client_chunks: int = 0
    server_chunks: int = 0
    flights: int = 0
    error: str = ""

    @property
    def duration(self) -> float:
        """Time on the line: accept to the close of both directions."""
        return max(0.0, self.ended - self.started)

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["duration"] = self.duration
        return data


@dataclass
class _Direction:
    name: str
    queue: asyncio.Queue[tuple[float, bytes]] = field(default_factory=asyncio.Queue)


class DelayProxy:
    """Relays each accepted connection to the target, delaying both directions."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        delay: float,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if delay < 0:
            raise ValueError(f"invalid delay {delay!r}: must be 0 or more seconds")
        self.target = (target_host, target_port)
        self.delay = delay
        self.listen = (listen_host, listen_port)
        self.port = 0
        self.sessions: list[SessionStats] = []
        self._server: asyncio.Server | None = None
        self._open = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._next_id = 1

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.debug("delay proxy listening on %s:%d, delay %.3fs", self.listen[0], self.port,
                  self.delay)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def wait_idle(self) -> None:
        """Wait until every accepted session has closed."""
        await self._idle.wait()

    async def __aenter__(self) -> DelayProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        stats = SessionStats(session=self._next_id, started=loop.time())
        self._next_id += 1
        self._open += 1
        self._idle.clear()
        counter = FlightCounter()
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError as exc:
            stats.error = f"connect to {self.target[0]}:{self.target[1]} failed: {exc}"
            log.warning("session %d: %s", stats.session, stats.error)
            client_w.close()
            self._finish(stats, loop.time())
            return

        def on_client_read(size: int) -> None:
            stats.client_bytes += size
            stats.client_chunks += 1 if size else 0
            counter.client_chunk(size)

        def on_server_read(size: int) -> None:
            stats.server_bytes += size
            stats.server_chunks += 1 if size else 0

        def on_deliver_to_client(size: int) -> None:
            counter.server_delivered(size)

        upstream = _Direction("client->server")
        downstream = _Direction("server->client")
        tasks = [
            asyncio.create_task(self._read(client_r, upstream, on_client_read)),
            asyncio.create_task(self._write(server_w, upstream, _ignore)),
            asyncio.create_task(self._read(server_r, downstream, on_server_read)),
            asyncio.create_task(self._write(client_w, downstream, on_deliver_to_client)),
        ]
        try:
            await asyncio.gather(*tasks)
        except (OSError, asyncio.IncompleteReadError) as exc:
            stats.error = f"{type(exc).__name__}: {exc}"
            log.debug("session %d ended with %s", stats.session, stats.error)
            for task in tasks:
                task.cancel()
        finally:
            for writer in (client_w, server_w):
                writer.close()
            stats.flights = counter.flights
            self._finish(stats, loop.time())

    def _finish(self, stats: SessionStats, now: float) -> None:
        stats.ended = now
        self.sessions.append(stats)
        self._open -= 1
        if self._open == 0:
            self._idle.set()

    async def _read(self, reader: asyncio.StreamReader, direction: _Direction,
                    on_read: _SizeCallback) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except ConnectionError:
                data = b""
            on_read(len(data))
            direction.queue.put_nowait((loop.time() + self.delay, data))
            if not data:
                return

    async def _write(self, writer: asyncio.StreamWriter, direction: _Direction,
                     on_deliver: _SizeCallback) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await direction.queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                # Pass the half close on; the peer may already be gone.
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            try:
                writer.write(data)
                on_deliver(len(data))
                await writer.drain()
            except ConnectionError:
                # The receiver closed: discard the rest of this direction.
                return


def _ignore(size: int) -> None:
    del size


class ThreadedDelayProxy:
    """A :class:`DelayProxy` running its own event loop in a thread, for synchronous callers."""

    def __init__(self, target_host: str, target_port: int, delay: float) -> None:
        self._proxy = DelayProxy(target_host, target_port, delay)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="delay-proxy")

    @property
    def port(self) -> int:
        return self._proxy.port

    @property
    def delay(self) -> float:
        return self._proxy.delay

    def start(self) -> int:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._proxy.start(), self._loop).result(10)

    def take_sessions(self, timeout: float = 30.0) -> list[SessionStats]:
        """Wait until no session is open, then return and forget the closed sessions."""
        asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self._proxy.wait_idle(), timeout), self._loop
        ).result(timeout + 1)

        async def take() -> list[SessionStats]:
            sessions = list(self._proxy.sessions)
            self._proxy.sessions.clear()
            return sessions

        return asyncio.run_coroutine_threadsafe(take(), self._loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._proxy.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ThreadedDelayProxy:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected HOST:PORT")
    return host, int(port)


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    proxy = DelayProxy(target[0], target[1], delay, listen_host=listen[0], listen_port=listen[1])
    await proxy.start()
    print(f"listening on {listen[0]}:{proxy.port}", flush=True)
    reported = 0
    while True:
        await asyncio.sleep(0.2)
        while reported < len(proxy.sessions):
            print(json.dumps(proxy.sessions[reported].as_dict()), flush=True)
            reported += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", type=_parse_address, default=("127.0.0.1", 0),
                        help="address to listen on, HOST:PORT (port 0: any free port)")
    parser.add_argument("--target", type=_parse_address, required=True,
                        help="address to relay to, HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.05,
                        help="delay of each direction in seconds (RTT is twice this)")
    args = parser.parse_args(argv)
    if args.delay < 0:
        parser.error(f"invalid --delay {args.delay}: must be 0 or more seconds")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.listen, args.target, args.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())

