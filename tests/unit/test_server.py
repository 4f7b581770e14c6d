"""The client protocol (`ClientConnection`) fed malformed and hostile requests as exact bytes
on the transport-free harness (docs/operations.md, Responses the proxy makes itself).

Every rejected request must get the expected proxy-made status with a short plain-text body
(never a traceback), `Connection: close` and then the end of the connection, and must never
reach an upstream: the harness's upstream sees no connection. A few of these cases also run end
to end on sockets in tests/integration/test_malformed.py.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Iterator, Sequence
from typing import Final

import pytest
from harness import Client, Proxy, chunked_payload, one_route_config, responses, status_of
from hostile import (
    BAD_CODING,
    BAD_REQUEST,
    CHUNK_CASES,
    CHUNKED,
    CONTROL,
    HOST,
    LIMITS,
    MAX_BODY_BYTES,
    REJECTED_CASES,
    SMUGGLING_CASES,
    TRACEBACK_MARKERS,
    check_proxy_made,
    get,
    post,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CLIENT_HEADER_SECONDS = 1.0
TIMEOUTS = {"client_header": "1s", "idle": "2s", "response_header": "2s", "connect": "1s"}
FAST_TIMEOUTS = {
    "client_header": "200ms",
    "idle": "300ms",
    "response_header": "500ms",
    "connect": "500ms",
}


def no_internal_errors(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    """Client garbage must never hit a bug: no logged error, no 500 (a loop error already
    fails the step that raised it)."""
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not logged, f"errors logged: {logged!r}"
    assert proxy.holder.outcomes.rejected[500] == 0, proxy.holder.outcomes


@pytest.fixture
def proxy(caplog: pytest.LogCaptureFixture) -> Iterator[Proxy]:
    proxy = Proxy(one_route_config(timeouts=TIMEOUTS, limits=LIMITS))
    yield proxy
    no_internal_errors(proxy, caplog)


def assert_proxy_made(client: Client, statuses: Collection[int]) -> int:
    """One short plain-text proxy response with an expected status, then the end of the
    connection (a FIN: a half-close while the proxy drains what the client still sends)."""
    status = check_proxy_made(client.received, statuses)
    assert client.ended, f"connection not closed after {client.received!r}"
    assert not client.reset, f"connection reset after {client.received!r}"
    return status


def assert_upstream_untouched(proxy: Proxy) -> None:
    assert proxy.upstream.connections == 0, f"upstream was contacted: {proxy.upstream.data!r}"
    assert proxy.upstream.data == b""


def assert_no_upstream_connection_kept(proxy: Proxy) -> None:
    """The proxy has let go of every upstream connection (none is kept after a partial body)."""
    upstream = proxy.upstream
    assert upstream.ended == upstream.connections, "upstream connection with a partial body kept"


def assert_control(proxy: Proxy) -> None:
    """A valid request on a new connection is still served."""
    client = proxy.converse(CONTROL)
    assert status_of(client.received) == 200, f"valid control request failed: {client.received!r}"
    assert client.received.endswith(b"ok\n")


def assert_rejected(
    proxy: Proxy, request: bytes | Sequence[bytes], statuses: Collection[int]
) -> Client:
    client = proxy.converse(*([request] if isinstance(request, bytes) else request))
    status = assert_proxy_made(client, statuses)
    assert_upstream_untouched(proxy)
    assert proxy.holder.outcomes.rejected[status] >= 1, proxy.holder.outcomes
    assert_control(proxy)
    return client


def test_a_valid_request_is_forwarded_and_answered(proxy: Proxy) -> None:
    client = proxy.converse(CONTROL)
    assert status_of(client.received) == 200, client.received
    assert client.ended
    assert proxy.upstream.connections == 1
    assert proxy.upstream.data.startswith(b"GET /control HTTP/1.1\r\n")
    assert proxy.holder.outcomes.requests[("shop", "stable", 200)] == 1


@pytest.mark.parametrize(("request_bytes", "statuses"), REJECTED_CASES)
def test_a_malformed_request_gets_a_proxy_made_error_and_reaches_no_upstream(
    proxy: Proxy, request_bytes: bytes, statuses: frozenset[int]
) -> None:
    assert_rejected(proxy, request_bytes, statuses)


# -- A6: chunk-size abuse ------------------------------------------------------------------


@pytest.mark.parametrize("body", CHUNK_CASES)
@pytest.mark.parametrize("late", [False, True], ids=["with-head", "after-upstream-connected"])
def test_a_bad_chunk_size_gets_400_and_the_upstream_never_gets_a_complete_body(
    proxy: Proxy, body: bytes, late: bool
) -> None:
    """The head is routed (and may be forwarded) before the bad chunk shows up."""
    client = proxy.converse(*([post(CHUNKED), body] if late else [post(CHUNKED, body=body)]))
    assert_proxy_made(client, BAD_REQUEST)
    assert proxy.holder.outcomes.rejected[400] >= 1, proxy.holder.outcomes
    assert_no_upstream_connection_kept(proxy)
    for peer in proxy.upstream.peers:
        data = peer.received
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            _, complete = chunked_payload(data, head_end + 4)
            assert not complete, f"upstream got a complete chunked body: {data!r}"
    assert_control(proxy)


# -- A7: pipelined smuggling ---------------------------------------------------------------


@pytest.mark.parametrize("payload", SMUGGLING_CASES)
def test_a_smuggled_second_request_gets_one_error_and_never_reaches_the_upstream(
    proxy: Proxy, payload: bytes
) -> None:
    client = assert_rejected(proxy, payload, BAD_CODING)
    assert client.received.count(b"HTTP/1.1 ") == 1
    assert b"/admin" not in proxy.upstream.data


# -- A13: underscores ----------------------------------------------------------------------


def test_a_field_with_an_underscore_in_its_name_is_not_forwarded(proxy: Proxy) -> None:
    request = get(
        b"/u",
        b"X_Secret: 1\r\nx_forwarded_for: 6.6.6.6\r\nX-Fine: ok\r\n",
        b"Connection: close\r\n",
    )
    client = proxy.converse(request)
    assert status_of(client.received) == 200, client.received
    upstream = proxy.upstream.data
    assert upstream.startswith(b"GET /u HTTP/1.1\r\n"), upstream
    assert b"X-Fine: ok" in upstream
    assert b"x_secret" not in upstream.lower()
    assert b"x_forwarded_for" not in upstream.lower()
    assert b"6.6.6.6" not in upstream


# -- C2: body size -------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_gets_413_before_any_100_continue(proxy: Proxy) -> None:
    request = post(b"Content-Length: %d\r\n" % (MAX_BODY_BYTES + 1), b"Expect: 100-continue\r\n")
    client = assert_rejected(proxy, request, {413})
    assert not client.received.startswith(b"HTTP/1.1 100"), client.received
    assert b" 100 " not in client.received


# -- D2: slow clients ----------------------------------------------------------------------


def test_a_head_dribbled_byte_by_byte_gets_408_at_the_header_deadline(proxy: Proxy) -> None:
    stream = b"GET / HTTP/1.1\r\n" + HOST + b"X-Slow: " + b"s" * 40 + b"\r\n\r\n"
    client = proxy.connect()
    started = proxy.loop.time()
    for byte in (stream[i : i + 1] for i in range(len(stream))):
        if client.received or not client.open:
            break
        client.send(byte)
        proxy.advance(0.1)
    status = assert_proxy_made(client, {408})
    # The whole dribble would take ~9 s: the deadline holds regardless of progress.
    elapsed = proxy.loop.time() - started
    assert CLIENT_HEADER_SECONDS <= elapsed <= CLIENT_HEADER_SECONDS + 0.2, elapsed
    assert_upstream_untouched(proxy)
    assert proxy.holder.outcomes.rejected[status] >= 1


# -- fuzzing -------------------------------------------------------------------------------

FUZZ_BASE = (
    b"POST /fuzz?q=1 HTTP/1.1\r\n"
    + HOST
    + b"Content-Length: 5\r\nX-A: b\r\nConnection: close\r\n\r\nhello"
)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(FUZZ_BASE)
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.one_of(st.sampled_from(b"\r\n\t \x00\x0b:;,#_%\xff0"), st.integers(0, 255)))
        if kind == "insert":
            data.insert(position, byte)
        elif position < len(data):
            if kind == "replace":
                data[position] = byte
            else:
                del data[position]
    if draw(st.integers(0, 9)) == 0:
        del data[draw(st.integers(0, len(data))) :]  # incomplete: must time out, not hang
    return bytes(data) + draw(st.binary(max_size=64))


@st.composite
def segmented(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=3)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_requests_never_crash_or_hang(
    caplog: pytest.LogCaptureFixture, data: st.DataObject
) -> None:
    proxy = Proxy(one_route_config(timeouts=FAST_TIMEOUTS, limits=LIMITS))
    request_bytes = data.draw(mutated_requests(), label="request")
    segments = data.draw(segmented(request_bytes), label="segments")
    client = proxy.connect()
    for segment in segments:
        if client.received or not client.open:
            break
        client.send(segment)
        proxy.advance(0.002)
    proxy.advance(2.0)
    assert client.ended or client.reset, f"hung on {request_bytes!r}: {client.received!r}"
    for marker in TRACEBACK_MARKERS:
        assert marker not in client.received, f"{request_bytes!r} -> {client.received!r}"
    status = status_of(client.received)
    if client.received:
        assert status is not None, f"{request_bytes!r} -> {client.received!r}"
    assert status != 500, f"{request_bytes!r} -> {client.received!r}"
    no_internal_errors(proxy, caplog)
    assert_control(proxy)


# -- pipelining and limits on one connection -----------------------------------------------


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_an_upgrade_request_with_a_body_is_refused_and_poisons_no_pooled_connection(
    proxy: Proxy, framing: bytes
) -> None:
    refused = proxy.converse(
        b"POST /ws HTTP/1.1\r\nHost: shop.example.com\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
        + framing
    )
    victim = proxy.converse(get(b"/victim", b"Connection: close\r\n"))

    assert_proxy_made(refused, BAD_REQUEST)
    (peer,) = proxy.upstream.peers
    assert peer.received.startswith(b"GET /victim ")  # the upgrade never reached the upstream
    assert peer.received.count(b" HTTP/1.1\r\n") == 1
    [(status, _, body)], _ = responses(victim.received)
    assert (status, body) == (200, b"ok\n")


def test_a_pipelined_oversized_chunked_body_is_refused_only_after_the_previous_response() -> None:
    proxy = Proxy(one_route_config(limits={"max_body_bytes": 10}))
    proxy.upstream.answer = None
    client = proxy.connect()
    client.send(
        get(b"/first")
        + b"POST /second HTTP/1.1\r\nHost: shop.example.com\r\n"
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"4\r\nabcd\r\n" * 5
        + b"0\r\n\r\n"
    )
    assert client.received == b"", "the 413 went out before the response it follows"
    (peer,) = proxy.upstream.peers
    peer.send(ok(b"stable /first"))

    [first, refused], rest = responses(client.received)
    assert (first[0], first[2]) == (200, b"stable /first")
    assert refused[0] == 413
    assert rest == b""
    assert client.ended
    assert peer.received.startswith(b"GET /first ")
    assert peer.received.count(b" HTTP/1.1\r\n") == 1  # /second never reached the upstream
    assert proxy.holder.outcomes.rejected == {413: 1}


def test_a_chunked_body_growing_past_the_limit_in_many_chunks_is_counted_once() -> None:
    proxy = Proxy(one_route_config(limits={"max_body_bytes": 10}))
    client = proxy.converse(
        b"POST /upload HTTP/1.1\r\nHost: shop.example.com\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"4\r\nabcd\r\n" * 8 + b"0\r\n\r\n"
    )
    assert assert_proxy_made(client, {413}) == 413
    outcomes = proxy.holder.outcomes
    assert outcomes.requests == {("shop", "stable", 413): 1}
    assert outcomes.rejected == {413: 1}


# -- a chunked request whose body came whole with a bad or upgrading request behind it -------

CHUNKED_POST: Final = (
    b"POST /up HTTP/1.1\r\nHost: shop.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n"
)


@pytest.mark.parametrize(
    "behind",
    [
        pytest.param(b"XYZ garbage\r\n\r\n", id="malformed"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="no-host"),
        pytest.param(
            b"GET /ws HTTP/1.1\r\nHost: shop.example.com\r\nConnection: upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n",
            id="upgrade",
        ),
    ],
)
def test_a_chunked_request_read_whole_with_a_request_behind_it_still_reaches_the_upstream(
    proxy: Proxy, behind: bytes
) -> None:
    client = proxy.connect()
    client.send(CHUNKED_POST + behind)
    peer = proxy.upstream.peers[0]  # (an upgrade then goes out on a connection of its own)
    assert peer.received.startswith(b"POST /up HTTP/1.1\r\n"), peer.received
    assert peer.received.endswith(b"5\r\nhello\r\n0\r\n\r\n"), peer.received
    assert status_of(client.received) == 200, client.received
