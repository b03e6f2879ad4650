"""Helpers for POP3 client tests against the scripted server."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from mailfeed.pop3client import Pop3Client, RetrResult, TlsMode, connect
from tests.scripted_pop3 import ScriptedPop3Server

T = TypeVar("T")
USER = "site1"
PASSWORD = "pw-site1-example"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def plain_client(server: ScriptedPop3Server, **kwargs: Any) -> Pop3Client:
    return await connect(server.host, server.port, tls=TlsMode.NONE, **kwargs)


async def retrieve_all(
    client: Pop3Client, msgnums: Sequence[int], sizes: dict[int, int] | None = None,
    window: int = 64,
) -> tuple[list[RetrResult], dict[int, bytes]]:
    sinks: dict[int, io.BytesIO] = {}

    def open_sink(msgnum: int) -> io.BytesIO:
        sinks[msgnum] = io.BytesIO()
        return sinks[msgnum]

    results = [
        result
        async for result in client.retrieve(
            msgnums, open_sink=open_sink, expected_sizes=sizes, window=window
        )
    ]
    return results, {n: sink.getvalue() for n, sink in sinks.items()}


async def session_end(server: ScriptedPop3Server) -> None:
    """Wait until the server has finished its session (all lines recorded)."""
    await asyncio.wait_for(server.session_done.wait(), 10)
