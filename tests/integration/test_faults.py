"""Upstream faults and client misbehaviour: what the client sees and what the proxy counts
(docs/operations.md, Forwarding; docs/metrics.md, canary_proxy_upstream_errors_total)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from fakes import (
    FakeUpstream,
    MakeProxy,
    RawUpstream,
    eventually,
    hold_until_closed,
    raw_connection,
    read_response,
    reset,
    send_and_close,
    stall,
    unused_port,
)

GET = b"GET /item HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"


async def status_of(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        await response.read()
        return response.status


# -- upstream faults ---------------------------------------------------------------------------


async def test_a_refused_upstream_gets_502_and_counts_a_connect_error(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(stable={"upstreams": [f"http://127.0.0.1:{unused_port()}"]})

    assert await status_of(session, proxy.url + "/") == 502
    assert proxy.holder.outcomes.upstream_errors == {("shop", "stable", "connect"): 1}
    assert proxy.holder.outcomes.requests[("shop", "stable", 502)] == 1


async def test_once_every_instance_of_the_version_is_cooling_down_the_proxy_answers_503(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    dead = [f"http://127.0.0.1:{unused_port()}" for _ in range(2)]
    proxy = await make_proxy(stable={"upstreams": dead})

    first = await status_of(session, proxy.url + "/")
    second = await status_of(session, proxy.url + "/")

    assert (first, second) == (502, 503)
    assert proxy.holder.outcomes.requests[("shop", "stable", 503)] == 1


async def test_a_refusing_instance_is_skipped_for_a_live_one_and_every_request_succeeds(
    make_proxy: MakeProxy, stable: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstreams = [f"http://127.0.0.1:{unused_port()}", stable.url]
    proxy = await make_proxy(stable={"upstreams": upstreams})

    statuses = [await status_of(session, f"{proxy.url}/{n}") for n in range(10)]

    assert statuses == [200] * 10
    assert len(stable.received) == 10


async def test_an_upstream_that_never_answers_gets_504_after_the_response_header_timeout(
    make_proxy: MakeProxy, stable: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    stable.answer_with(stall())
    proxy = await make_proxy(timeouts={"response_header": "300ms"})

    started = time.monotonic()
    status = await status_of(session, proxy.url + "/")
    elapsed = time.monotonic() - started

    assert status == 504
    assert 0.3 <= elapsed < 5  # fired at the deadline, not at a far later default
    assert proxy.holder.outcomes.upstream_errors == {("shop", "stable", "timeout"): 1}
    await stable.wait_until(lambda u: u.cancelled == 1)  # the stalled exchange was closed


async def test_an_upstream_that_resets_before_the_headers_gets_502(
    make_proxy: MakeProxy, stable: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    stable.answer_with(reset())
    proxy = await make_proxy()

    assert await status_of(session, proxy.url + "/") == 502
    assert proxy.holder.outcomes.upstream_errors == {("shop", "stable", "reset"): 1}


async def test_an_upstream_dying_mid_body_makes_an_http_client_fail_the_read(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
    async with RawUpstream(send_and_close(answer)) as upstream:
        proxy = await make_proxy(stable={"upstreams": [upstream.url]})
        async with session.get(proxy.url + "/") as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


# -- client faults -----------------------------------------------------------------------------


async def test_a_client_leaving_while_the_upstream_stalls_is_a_499_and_cancels_the_exchange(
    make_proxy: MakeProxy, stable: FakeUpstream
) -> None:
    stable.answer_with(stall())
    proxy = await make_proxy()

    async with raw_connection(proxy) as (_, writer):
        writer.write(GET)
        await stable.wait_until(lambda u: len(u.received) == 1)

    outcomes = proxy.holder.outcomes
    await eventually(lambda: outcomes.requests[("shop", "stable", 499)] == 1, every=0.01)
    await stable.wait_until(lambda u: u.cancelled == 1)  # the upstream saw its connection close
    assert outcomes.upstream_errors == {}
    assert sum(outcomes.requests.values()) == 1


async def test_a_client_leaving_closes_the_upstream_connection_instead_of_pooling_it(
    make_proxy: MakeProxy,
) -> None:
    async with RawUpstream(hold_until_closed()) as upstream:
        proxy = await make_proxy(stable={"upstreams": [upstream.url]})
        async with raw_connection(proxy) as (_, writer):
            writer.write(GET)
            await eventually(lambda: len(upstream.requests) == 1, every=0.01)

        async with asyncio.timeout(3):
            await upstream.closed_by_peer.wait()
    assert proxy.holder.outcomes.requests == {("shop", "stable", 499): 1}
    assert proxy.holder.outcomes.upstream_errors == {}


async def test_a_client_that_sends_a_partial_head_and_stalls_gets_408_and_is_closed(
    make_proxy: MakeProxy, stable: FakeUpstream
) -> None:
    proxy = await make_proxy(timeouts={"client_header": "300ms"})

    async with raw_connection(proxy) as (reader, writer):
        writer.write(b"GET /slow HTTP/1.1\r\nHost: shop.example.com\r\nX-Partial: ")
        started = time.monotonic()
        response = await read_response(reader, within=3)
        rest = await asyncio.wait_for(reader.read(), 3)
        elapsed = time.monotonic() - started

    assert response.status == 408
    assert response.header("Connection") == ["close"]
    assert rest == b""  # closed by the proxy
    assert 0.25 <= elapsed < 5  # the deadline, not the 5 s read limit of this test
    assert stable.received == []


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(timeouts={"idle": "300ms", "client_header": "5s"})

    async with raw_connection(proxy) as (reader, writer):
        writer.write(GET)
        response = await read_response(reader)
        idle_from = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 8)
        idle_for = time.monotonic() - idle_from

    assert response.status == 200
    assert rest == b""
    assert 0.25 <= idle_for < 8
