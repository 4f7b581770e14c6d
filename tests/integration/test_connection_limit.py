"""The client connection cap (`limits.max_connections`; nginx `worker_connections`, HAProxy
`maxconn`): past it a new connection gets a 503 and is closed, while the connections already
open keep being served, and a freed place is usable again."""

from __future__ import annotations

import asyncio
import contextlib

from fakes import MakeProxy, ProxyHandle, close_writer, eventually, read_response

GET = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n"


async def open_and_serve(proxy: ProxyHandle) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection that has had one request answered (so the proxy holds it)."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(GET)
    response = await read_response(reader)
    assert response.status == 200
    return reader, writer


async def test_a_connection_past_the_cap_gets_503_and_the_open_ones_keep_working(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(limits={"max_connections": 3})
    async with contextlib.AsyncExitStack() as stack:
        held = []
        for _ in range(3):
            reader, writer = await open_and_serve(proxy)
            stack.push_async_callback(close_writer, writer)
            held.append((reader, writer))

        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        stack.push_async_callback(close_writer, writer)
        writer.write(GET)
        refused = await read_response(reader)
        assert refused.status == 503
        assert refused.header("connection") == ["close"]
        assert b"connection limit" in refused.body
        assert await reader.read() == b""  # and closed
        assert proxy.holder.outcomes.rejected[503] == 1

        for held_reader, held_writer in held:  # the open ones are unaffected
            held_writer.write(GET)
            assert (await read_response(held_reader)).status == 200


async def test_a_place_freed_by_a_closing_client_is_usable_again(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(limits={"max_connections": 1})
    _, first = await open_and_serve(proxy)
    await close_writer(first)
    await eventually(lambda: not proxy.server.connections)

    reader, writer = await open_and_serve(proxy)  # asserts 200
    await close_writer(writer)
    del reader


async def test_refused_connections_do_not_reach_an_upstream(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(limits={"max_connections": 1})
    reader, writer = await open_and_serve(proxy)
    try:
        seen_before = len(proxy.holder.outcomes.requests)
        requests_before = sum(proxy.holder.outcomes.requests.values())
        for _ in range(5):
            extra_reader, extra_writer = await asyncio.open_connection(proxy.host, proxy.port)
            extra_writer.write(GET)
            assert (await read_response(extra_reader)).status == 503
            await close_writer(extra_writer)
        assert sum(proxy.holder.outcomes.requests.values()) == requests_before
        assert len(proxy.holder.outcomes.requests) == seen_before
        assert proxy.holder.outcomes.rejected[503] == 5
    finally:
        await close_writer(writer)
    del reader
