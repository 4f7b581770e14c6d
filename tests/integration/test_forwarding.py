"""Forwarding and routing through a real proxy to real fake upstreams (docs/semantics.md,
docs/operations.md)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import mmh3
import pytest
from fakes import (
    FakeUpstream,
    MakeProxy,
    RawExchange,
    RawUpstream,
    delay,
    early_hints,
    echo,
    raw_connection,
    read_response,
    reply,
    send_and_close,
    stream,
    upgrade_echo,
    websocket_echo,
)

# -- helpers -----------------------------------------------------------------------------------


def request(method: str, target: str, *headers: str) -> bytes:
    """A request head as raw bytes, for what a client library would normalise or refuse."""
    lines = [f"{method} {target} HTTP/1.1", "Host: shop.example.com", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def versions_seen(
    session: aiohttp.ClientSession,
    url: str,
    requests: list[dict[str, str]],
    concurrency: int = 32,
) -> list[str]:
    """X-Version of the response to each request (one dict of headers per request), in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(headers: dict[str, str]) -> str:
        async with gate, session.get(url, headers=headers) as response:
            assert response.status == 200
            await response.read()
            return response.headers["X-Version"]

    return await asyncio.gather(*(one(h) for h in requests))


def documented_bucket(salt: str, key: str) -> int:
    """docs/semantics.md, Sticky hashing: mmh3 of `salt:key`, seed 0, unsigned, mod 10 000."""
    return int(mmh3.hash(f"{salt}:{key}", seed=0, signed=False)) % 10_000


# -- headers -----------------------------------------------------------------------------------


async def test_hop_by_hop_request_headers_never_reach_the_upstream_but_end_to_end_ones_do(
    make_proxy: MakeProxy, stable: FakeUpstream, raw_exchange: RawExchange
) -> None:
    proxy = await make_proxy()
    data = request(
        "GET",
        "/",
        "Connection: keep-alive, X-Secret",
        "Connection: close",
        "X-Secret: hop",
        "Keep-Alive: timeout=5",
        "Proxy-Connection: keep-alive",
        "TE: trailers",
        "Trailer: X-Checksum",
        "Upgrade: h2c",
        "Proxy-Authorization: Basic dXNlcjpwYXNz",
        "Authorization: Bearer end-to-end",
        "X-Request-Id: r-1",
        "Accept: text/plain",
    )

    answer = await raw_exchange(proxy.host, proxy.port, data)

    assert answer.startswith(b"HTTP/1.1 200 ")
    (seen,) = stable.received
    hop_by_hop = {
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    }
    assert seen.header_names() & hop_by_hop == set()
    assert seen.header("Authorization") == ["Bearer end-to-end"]
    assert seen.header("X-Request-Id") == ["r-1"]
    assert seen.header("Accept") == ["text/plain"]


async def test_x_forwarded_for_is_appended_to_and_proto_and_host_are_overwritten(
    make_proxy: MakeProxy, stable: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy()
    spoofed = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Host": "shop.example.com:8443",
    }

    async with session.get(proxy.url + "/", headers=spoofed) as response:
        assert response.status == 200

    (seen,) = stable.received
    assert seen.header("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Host") == ["shop.example.com:8443"]


async def test_hop_by_hop_response_headers_are_stripped_before_the_client(
    make_proxy: MakeProxy,
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: X-Secret, keep-alive\r\n"
        b"X-Secret: upstream-internal\r\n"
        b"Keep-Alive: timeout=30\r\n"
        b"Proxy-Authenticate: Basic realm=upstream\r\n"
        b"X-Kept: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    async with RawUpstream(send_and_close(answer)) as upstream:
        proxy = await make_proxy(stable={"upstreams": [upstream.url]})
        async with raw_connection(proxy) as (reader, writer):
            writer.write(request("GET", "/"))
            response = await read_response(reader)

    names = {name.lower() for name, _ in response.headers}
    assert response.status == 200
    assert response.body == b"ok"
    assert names & {"x-secret", "keep-alive", "proxy-authenticate"} == set()
    assert all("x-secret" not in v.lower() for v in response.header("Connection"))
    assert response.header("X-Kept") == ["yes"]


async def test_several_set_cookie_headers_reach_the_client_separately_and_in_order(
    make_proxy: MakeProxy, stable: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    cookies = [
        "session=abc; Path=/; HttpOnly",
        "theme=dark; Expires=Wed, 21 Oct 2037 07:28:00 GMT",
        "lang=en",
    ]
    stable.answer_with(reply(headers=[("Set-Cookie", c) for c in cookies]))
    proxy = await make_proxy()

    async with session.get(proxy.url + "/") as response:
        assert response.headers.getall("Set-Cookie") == cookies


async def test_the_request_target_reaches_the_upstream_byte_for_byte(
    make_proxy: MakeProxy, stable: FakeUpstream, raw_exchange: RawExchange
) -> None:
    proxy = await make_proxy()
    target = "/a/../b/%2e%2E/c?x=%41&y=a%2Fb&&z"

    answer = await raw_exchange(proxy.host, proxy.port, request("GET", target, "Connection: close"))

    assert answer.startswith(b"HTTP/1.1 200 ")
    assert [r.path_qs for r in stable.received] == [target]


# -- bodies and framing ------------------------------------------------------------------------


async def test_a_content_length_request_body_arrives_intact(
    make_proxy: MakeProxy, stable: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    stable.answer_with(echo())
    proxy = await make_proxy()
    body = bytes(range(256)) * 1000

    async with session.post(proxy.url + "/upload", data=body) as response:
        echoed = await response.read()

    (seen,) = stable.received
    assert seen.header("Content-Length") == [str(len(body))]
    assert seen.body == body
    assert echoed == body


async def test_a_chunked_request_body_arrives_intact(
    make_proxy: MakeProxy, stable: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    stable.answer_with(echo())
    proxy = await make_proxy()
    pieces = [b"first;", b"", b"x" * 70_000, b"\r\n0\r\n\r\n", b"last"]

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with session.post(proxy.url + "/upload", data=chunks()) as response:
        echoed = await response.read()

    (seen,) = stable.received
    assert seen.body == b"".join(pieces)
    assert echoed == b"".join(pieces)


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
async def test_a_streamed_response_reaches_an_http11_client_intact(
    make_proxy: MakeProxy, stable: FakeUpstream, content_length: bool
) -> None:
    stable.answer_with(stream(300_000, content_length=content_length, chunk=7_000))
    proxy = await make_proxy()

    async with raw_connection(proxy) as (reader, writer):
        writer.write(request("GET", "/big"))
        response = await read_response(reader)

    assert response.status == 200
    assert len(response.body) == 300_000
    assert hashlib.sha256(response.body).hexdigest() == stable.streamed_sha256


async def test_a_close_delimited_response_reaches_an_http11_client_intact(
    make_proxy: MakeProxy,
) -> None:
    body = b"no length, no chunking: the upstream ends the body by closing" * 100
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n" + body
    async with RawUpstream(send_and_close(answer)) as upstream:
        proxy = await make_proxy(stable={"upstreams": [upstream.url]})
        async with raw_connection(proxy) as (reader, writer):
            # Two requests on one connection: the re-framed body must end where it ends.
            writer.write(request("GET", "/one") + request("GET", "/two"))
            first = await read_response(reader)
            second = await read_response(reader)

    assert (first.status, first.body) == (200, body)
    assert (second.status, second.body) == (200, body)


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
async def test_an_http10_client_gets_a_complete_response_it_can_parse(
    make_proxy: MakeProxy,
    stable: FakeUpstream,
    raw_exchange: RawExchange,
    content_length: bool,
) -> None:
    stable.answer_with(stream(100_000, content_length=content_length, chunk=10_000))
    proxy = await make_proxy()

    data = b"GET /old HTTP/1.0\r\nHost: shop.example.com\r\n\r\n"

    answer = await raw_exchange(proxy.host, proxy.port, data)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 "))
    assert b"transfer-encoding" not in head.lower()  # HTTP/1.0 has no chunked coding
    assert len(body) == 100_000
    assert hashlib.sha256(body).hexdigest() == stable.streamed_sha256


async def test_an_http10_request_without_host_reaches_the_upstream_as_valid_http11(
    make_proxy: MakeProxy, stable: FakeUpstream, raw_exchange: RawExchange
) -> None:
    proxy = await make_proxy()

    answer = await raw_exchange(proxy.host, proxy.port, b"GET /old HTTP/1.0\r\n\r\n")

    # HTTP/1.0 may omit Host, but the proxy speaks HTTP/1.1 upstream, where it is required
    # (RFC 9112 §3.2); an upstream rejects the request without it.
    assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 "))
    assert answer.endswith(b"stable /old")
    (seen,) = stable.received
    assert len(seen.header("Host")) == 1


async def test_head_gets_the_content_length_and_no_body_and_the_connection_then_serves_a_get(
    make_proxy: MakeProxy, stable: FakeUpstream
) -> None:
    proxy = await make_proxy()
    expected = b"stable /page"

    async with raw_connection(proxy) as (reader, writer):
        writer.write(request("HEAD", "/page"))
        head = await read_response(reader, head_request=True)
        writer.write(request("GET", "/page", "Connection: close"))
        get = await read_response(reader)
        rest = await reader.read()

    assert head.status == 200
    assert head.header("Content-Length") == [str(len(expected))]
    assert (get.status, get.body) == (200, expected)
    assert rest == b""
    assert [r.method for r in stable.received] == ["HEAD", "GET"]


@pytest.mark.parametrize("status", [204, 304])
async def test_a_bodiless_status_has_no_body_and_the_connection_stays_usable(
    make_proxy: MakeProxy, stable: FakeUpstream, status: int
) -> None:
    stable.answer_with(reply(status, headers=[("ETag", '"v1"')]), path="/empty")
    proxy = await make_proxy()

    async with raw_connection(proxy) as (reader, writer):
        writer.write(request("GET", "/empty"))
        empty = await read_response(reader)
        writer.write(request("GET", "/after", "Connection: close"))
        after = await read_response(reader)
        rest = await reader.read()

    assert empty.status == status
    assert empty.header("Transfer-Encoding") == []
    assert (after.status, after.body) == (200, b"stable /after")
    assert rest == b""


async def test_early_hints_reach_the_client_before_the_final_response(
    make_proxy: MakeProxy, stable: FakeUpstream
) -> None:
    stable.answer_with(early_hints())
    proxy = await make_proxy()

    async with raw_connection(proxy) as (reader, writer):
        writer.write(request("GET", "/hinted"))
        response = await read_response(reader)

    assert response.interim == [103]
    assert (response.status, response.body) == (200, b"stable /hinted")


async def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(
    make_proxy: MakeProxy, stable: FakeUpstream
) -> None:
    stable.answer_with(echo())
    proxy = await make_proxy()

    async with raw_connection(proxy) as (reader, writer):
        writer.write(request("POST", "/form", "Expect: 100-continue", "Content-Length: 5"))
        async with asyncio.timeout(2):
            interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"hello")
        response = await read_response(reader)

    assert interim.startswith(b"HTTP/1.1 100 ")
    assert (response.status, response.body) == (200, b"hello")
    (seen,) = stable.received
    assert "expect" not in seen.header_names()
    assert seen.body == b"hello"


# -- connections -------------------------------------------------------------------------------


async def test_sequential_requests_on_one_client_connection_reuse_one_upstream_connection(
    make_proxy: MakeProxy, stable: FakeUpstream
) -> None:
    proxy = await make_proxy()
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as client:
        for index in range(20):
            async with client.get(f"{proxy.url}/{index}") as response:
                assert await response.read() == f"stable /{index}".encode()

    assert len(stable.received) == 20
    assert len(stable.peers) == 1


async def test_pipelined_requests_on_one_connection_are_answered_in_order(
    make_proxy: MakeProxy, stable: FakeUpstream
) -> None:
    stable.answer_with(delay(0.2), path="/slow")  # a proxy answering out of order would put it last
    proxy = await make_proxy()
    targets = ["/slow", "/fast", "/third"]

    async with raw_connection(proxy) as (reader, writer):
        writer.write(b"".join(request("GET", t) for t in targets))
        responses = [await read_response(reader) for _ in targets]

    assert [r.body for r in responses] == [f"stable {t}".encode() for t in targets]


async def test_websocket_messages_pass_both_ways_through_the_proxy(
    make_proxy: MakeProxy, stable: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    stable.answer_with(websocket_echo())
    proxy = await make_proxy()

    async with session.ws_connect(proxy.url + "/ws") as ws:
        greeting = await ws.receive_str(timeout=2)
        await ws.send_str("ping")
        echoed_text = await ws.receive_str(timeout=2)
        await ws.send_bytes(b"\x00\x01binary\xff")
        echoed_bytes = await ws.receive_bytes(timeout=2)

    assert greeting == "hello from upstream"
    assert echoed_text == "echo: ping"
    assert echoed_bytes == b"\x00\x01binary\xff"


async def test_an_upgraded_connection_is_a_byte_tunnel_in_both_directions(
    make_proxy: MakeProxy,
) -> None:
    async with RawUpstream(upgrade_echo()) as upstream:
        proxy = await make_proxy(stable={"upstreams": [upstream.url]})
        async with raw_connection(proxy) as (reader, writer):
            writer.write(request("GET", "/tunnel", "Connection: Upgrade", "Upgrade: echo"))
            switched = await read_response(reader)
            writer.write(b"\x00not http at all\r\n\r\n")
            async with asyncio.timeout(2):
                echoed = await reader.readexactly(len(b"\x00not http at all\r\n\r\n"))

    assert switched.status == 101
    assert echoed == b"\x00not http at all\r\n\r\n"
    assert b"upgrade: echo" in upstream.requests[0].lower()


# -- routing -----------------------------------------------------------------------------------


async def test_weight_10_sends_about_a_tenth_of_keyless_requests_to_the_canary(
    make_proxy: MakeProxy,
    stable: FakeUpstream,
    canary: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    proxy = await make_proxy(split={"weight": 10}, rng=random.Random(1).random)
    total = 10_000

    versions = Counter(await versions_seen(session, proxy.url + "/", [{}] * total, 64))

    # Binomial(10 000, 0.1): sd 30, so 4.5 sd is ±135.
    assert abs(versions["canary"] - 1_000) <= 135, versions
    assert versions["canary"] + versions["stable"] == total
    assert len(canary.received) == versions["canary"]
    assert len(stable.received) == versions["stable"]


async def test_an_empty_sticky_header_falls_back_to_the_sticky_cookie(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    sticky = {"header": "X-User-ID", "cookie": "uid"}
    proxy = await make_proxy(split={"weight": 50, "salt": "shop", "sticky": sticky})
    keys = [f"user-{n}" for n in range(12)]
    requests = [{"X-User-ID": "", "Cookie": f"uid={key}"} for key in keys for _ in range(5)]
    versions = await versions_seen(session, proxy.url + "/", requests)
    for headers, version in zip(requests, versions, strict=True):
        key = headers["Cookie"].split("=", 1)[1]
        assert version == ("canary" if documented_bucket("shop", key) < 5_000 else "stable")


@pytest.mark.parametrize("carrier", ["header", "cookie"])
async def test_a_sticky_key_always_reaches_the_version_its_documented_bucket_names(
    make_proxy: MakeProxy, session: aiohttp.ClientSession, carrier: str
) -> None:
    sticky = {"header": "X-User-ID", "cookie": "uid"}
    proxy = await make_proxy(split={"weight": 50, "salt": "shop", "sticky": sticky})
    keys = [f"user-{n}" for n in range(12)]

    def carried(key: str) -> dict[str, str]:
        return {"X-User-ID": key} if carrier == "header" else {"Cookie": f"a=b; uid={key}"}

    requests = [carried(key) for key in keys for _ in range(20)]
    versions = await versions_seen(session, proxy.url + "/", requests)

    by_key: dict[str, set[str]] = {}
    for headers, version in zip(requests, versions, strict=True):
        key = headers.get("X-User-ID") or headers["Cookie"].rsplit("=", 1)[1]
        by_key.setdefault(key, set()).add(version)
    expected = {
        key: {"canary" if documented_bucket("shop", key) < 5_000 else "stable"} for key in keys
    }
    assert by_key == expected
    assert {v for vs in expected.values() for v in vs} == {"stable", "canary"}  # both exercised


async def test_the_canary_share_of_distinct_sticky_keys_is_near_the_weight(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(split={"weight": 10, "sticky": {"header": "X-User-ID"}})
    requests = [{"X-User-ID": f"customer-{n}"} for n in range(2_000)]

    versions = Counter(await versions_seen(session, proxy.url + "/", requests))

    # Binomial(2 000, 0.1): sd 13.4, so 4.5 sd is ±60.
    assert abs(versions["canary"] - 200) <= 60, versions


@pytest.mark.parametrize(
    "case",
    [(0, "always", "canary"), (100, "never", "stable")],
    ids=["always-at-weight-0", "never-at-weight-100"],
)
@pytest.mark.parametrize("carrier", ["header", "cookie"])
async def test_a_force_override_wins_over_the_sticky_key_and_the_weight(
    make_proxy: MakeProxy,
    session: aiohttp.ClientSession,
    case: tuple[int, str, str],
    carrier: str,
) -> None:
    weight, force, expected = case
    split = {
        "weight": weight,
        "sticky": {"header": "X-User-ID", "cookie": "uid"},
        "force": {"header": "X-Canary", "cookie": "canary"},
    }
    proxy = await make_proxy(split=split)
    forced = {"X-Canary": force} if carrier == "header" else {"Cookie": f"canary={force}"}
    requests = [{"X-User-ID": f"user-{n}", **forced} for n in range(20)]

    versions = set(await versions_seen(session, proxy.url + "/", requests))

    assert versions == {expected}


async def test_an_aborted_route_sends_even_forced_and_sticky_users_to_stable(
    make_proxy: MakeProxy,
    canary: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    split = {
        "weight": 100,
        "sticky": {"header": "X-User-ID", "cookie": "uid"},
        "force": {"header": "X-Canary", "cookie": "canary"},
    }
    proxy = await make_proxy(split=split)
    holder = proxy.holder
    holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="test")
    requests = [
        {"X-Canary": "always"},
        {"Cookie": "canary=always"},
        {"X-User-ID": "user-1"},
        {"Cookie": "uid=user-2"},
        {},
    ]

    versions = await versions_seen(session, proxy.url + "/", requests)

    assert versions == ["stable"] * len(requests)
    assert canary.received == []


async def test_a_request_matching_no_route_gets_404_and_reaches_no_upstream(
    make_proxy: MakeProxy,
    stable: FakeUpstream,
    canary: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    proxy = await make_proxy(match={"host": "shop.example.com", "path_prefix": "/shop"})

    statuses = []
    for host, path in [("other.example.com", "/shop"), ("shop.example.com", "/elsewhere")]:
        async with session.get(proxy.url + path, headers={"Host": host}) as response:
            statuses.append(response.status)

    assert statuses == [404, 404]
    assert stable.received == canary.received == []
    assert proxy.holder.outcomes.rejected[404] == 2


@pytest.mark.parametrize("api_first", [True, False], ids=["api-first", "catch-all-first"])
async def test_the_first_matching_route_wins_not_the_longest_prefix(
    make_proxy: MakeProxy,
    stable: FakeUpstream,
    session: aiohttp.ClientSession,
    api_first: bool,
) -> None:
    async with FakeUpstream("api") as api:
        api_route: dict[str, object] = {
            "name": "api",
            "match": {"host": "shop.example.com", "path_prefix": "/api"},
            "stable": {"upstreams": [api.url]},
        }
        shop_route: dict[str, object] = {
            "name": "shop",
            "match": {"host": "shop.example.com", "path_prefix": "/"},
            "stable": {"upstreams": [stable.url]},
        }
        routes = [api_route, shop_route] if api_first else [shop_route, api_route]
        proxy = await make_proxy(routes=routes)

        seen = {}
        for path in ["/api/orders", "/cart"]:
            # Host matching ignores case and port (docs/semantics.md, Route match).
            headers = {"Host": "SHOP.Example.com:8080"}
            async with session.get(proxy.url + path, headers=headers) as response:
                seen[path] = response.headers["X-Version"]

    assert seen == {"/api/orders": "api" if api_first else "stable", "/cart": "stable"}
