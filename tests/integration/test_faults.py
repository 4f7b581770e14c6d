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
    RawExchange,
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


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
GET_CLOSE = b"GET /item HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nZ\r\n0\r\n\r\n",
        b"ffffffffffffffffff\r\nZ\r\n0\r\n\r\n",
        b"1\nZ\r\n0\r\n\r\n",
        b"1\r\nZ\n0\r\n\r\n",
        b"1\r\nZZ\r\n0\r\n\r\n",
        b"1\r\nZ\r\n0\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["bad-size", "overflow", "bare-lf", "bare-lf-after-data", "size-mismatch", "cl-trailer"],
)
async def test_a_malformed_chunked_body_in_the_read_of_its_head_gets_502(
    make_proxy: MakeProxy, raw_exchange: RawExchange, body: bytes
) -> None:
    """Nothing of the response has reached the client yet, so it can still get a 502 instead
    of a head and then a reset."""
    async with RawUpstream(send_and_close(CHUNKED_HEAD + body)) as upstream:
        proxy = await make_proxy(stable={"upstreams": [upstream.url]})
        received = await raw_exchange(proxy.host, proxy.port, GET_CLOSE)

    assert received.startswith(b"HTTP/1.1 502 "), received
    assert received.endswith(b"\r\n\r\nBad Gateway\n"), received
    assert proxy.holder.outcomes.upstream_errors == {("shop", "stable", "protocol"): 1}
    assert proxy.holder.outcomes.requests == {("shop", "stable", 502): 1}


@pytest.mark.parametrize(
    ("answer", "limit"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * (1 << 20) + b"\r\nContent-Length: 0\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\n" + b"X-F: v\r\n" * 20_000 + b"Content-Length: 0\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\n" + b"X-F: v\r\n" * 101 + b"Content-Length: 0\r\n\r\n", None),
        (b"HTTP/1.1 200 " + b"R" * (1 << 20) + b"\r\nContent-Length: 0\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 1100 + b"\r\nContent-Length: 0\r\n\r\n", 1024),
    ],
    ids=["one-mib-field", "20000-fields", "101-fields", "long-status-line", "over-set-limit"],
)
async def test_a_response_head_over_the_limit_gets_502_and_counts_a_protocol_error(
    make_proxy: MakeProxy, raw_exchange: RawExchange, answer: bytes, limit: int | None
) -> None:
    limits = None if limit is None else {"max_response_header_bytes": limit}
    async with RawUpstream(send_and_close(answer)) as upstream:
        proxy = await make_proxy(stable={"upstreams": [upstream.url]}, limits=limits)
        received = await raw_exchange(proxy.host, proxy.port, GET_CLOSE)

    assert received.startswith(b"HTTP/1.1 502 "), received[:200]
    assert len(received) < 1000
    assert proxy.holder.outcomes.upstream_errors == {("shop", "stable", "protocol"): 1}


async def test_a_response_head_within_the_limit_is_forwarded(
    make_proxy: MakeProxy, raw_exchange: RawExchange
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 900 + b"\r\nContent-Length: 2\r\n\r\nok"
    async with RawUpstream(send_and_close(answer)) as upstream:
        proxy = await make_proxy(
            stable={"upstreams": [upstream.url]}, limits={"max_response_header_bytes": 1024}
        )
        received = await raw_exchange(proxy.host, proxy.port, GET_CLOSE)

    assert received.startswith(b"HTTP/1.1 200 "), received[:200]
    assert received.endswith(b"\r\n\r\nok")
    assert proxy.holder.outcomes.upstream_errors == {}


async def test_a_trailer_never_becomes_a_field_of_the_next_response(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    """llhttp reports trailer fields through the same callback as head fields."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + b"2\r\nok\r\n0\r\nX-Trailer: leaked\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with RawUpstream(script) as upstream:
        proxy = await make_proxy(stable={"upstreams": [upstream.url]})
        for _ in range(2):
            async with session.get(proxy.url + "/") as response:
                assert await response.read() == b"ok"
                assert "X-Trailer" not in response.headers
        assert len(upstream.requests) == 1  # both requests went over one pooled connection
