"""Connection safety on the data plane: regression tests for the review's twelve findings.

Each test is one sentence about a connection the proxy must never corrupt, wedge or bloat:
bytes of one response never reach another client, a pipelined request never answers in the
place of the one before it, every error reply says `Connection: close` when the proxy closes,
every state has a deadline, backpressure survives a change of exchange, and each request is
counted once. The proxy runs in-process; clients are raw sockets sending exact bytes; upstreams
are either the recording `FakeUpstream` or a scripted raw TCP server (below) for what aiohttp
will not send.

A few tests shrink socket buffers and flow-control thresholds on the proxy's own transports
(`shrink_buffers`) so that a backpressure state that takes megabytes at default sizes happens
deterministically with kilobytes.

What a connection does with exact bytes alone runs on the transport-free harness instead:
finding 1 in tests/unit/test_upstream.py, finding 12 and the local 404 in test_exchange.py,
finding 9, the refused upgrade with a body (2) and the pipelined 413 (3) in test_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import Any, Final, Self

import pytest
from aiohttp import web
from fakes import (
    HOST,
    FakeUpstream,
    MakeProxy,
    ProxyHandle,
    RawResponse,
    close_writer,
    eventually,
    raw_connection,
    read_response,
    reply,
    unused_port,
)

# -- a scripted raw upstream -------------------------------------------------------------------


class UpstreamConn:
    """One connection as the scripted upstream sees it."""

    def __init__(
        self,
        upstream: ScriptedUpstream,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.upstream = upstream
        self.index = index
        self.reader = reader
        self.writer = writer

    async def head(self) -> bytes:
        """The next request head (recorded with this connection's index)."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        self.upstream.requests.append((self.index, target_of(head)))
        return head

    async def body(self, head: bytes) -> bytes:
        """The request body that `head` declares (Content-Length or chunked)."""
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            body = bytearray()
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")
            return bytes(body)
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                return await self.reader.readexactly(int(line.split(b":", 1)[1]))
        return b""

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer_all(self) -> None:
        """Answer every request `200 conn<index> <target>` until the proxy closes."""
        while True:
            head = await self.head()
            await self.body(head)
            await self.send(ok(b"conn%d %s" % (self.index, target_of(head).encode())))

    async def until_closed(self) -> None:
        while await self.reader.read(65536):
            pass


Script = Callable[[UpstreamConn], Coroutine[Any, Any, None]]


class ScriptedUpstream:
    """A raw TCP upstream running `script` per connection; records request heads."""

    def __init__(self, script: Script, *, rcvbuf: int | None = None) -> None:
        self.script = script
        self.rcvbuf = rcvbuf  # SO_RCVBUF of accepted connections (set on the listener)
        self.connections = 0
        self.requests: list[tuple[int, str]] = []  # (connection index, request target)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{HOST}:{self._server.sockets[0].getsockname()[1]}"

    def targets_on(self, index: int) -> list[str]:
        return [target for conn, target in self.requests if conn == index]

    async def __aenter__(self) -> Self:
        listener = socket.socket()
        if self.rcvbuf is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        listener.bind((HOST, 0))
        self._server = await asyncio.start_server(self._serve, sock=listener)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        index = self.connections
        self.connections += 1
        # The script runs in a task of its own that __aexit__ may cancel; this handler task is
        # never cancelled (asyncio logs an error for a cancelled client_connected_cb).
        script = asyncio.create_task(self.script(UpstreamConn(self, index, reader, writer)))
        self._tasks.add(script)
        try:
            await asyncio.wait([script])
            if not script.cancelled():
                with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                    script.result()
        finally:
            self._tasks.discard(script)
            self._writers.discard(writer)
            await close_writer(writer)


def target_of(head: bytes) -> str:
    return head.split(b" ", 2)[1].decode("latin-1")


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


# -- client side helpers -----------------------------------------------------------------------


def get(target: str, *extra: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: shop.example.com", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


UPGRADE: Final = ("Connection: Upgrade", "Upgrade: websocket")


async def closed_within(reader: asyncio.StreamReader, seconds: float = 3.0) -> bytes:
    """Everything the proxy still sends until it closes; fails if it neither closes nor
    resets the connection within `seconds` (a wedged connection)."""
    received = bytearray()
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionError:
        pass
    except TimeoutError:
        pytest.fail(f"connection neither closed nor answered within {seconds}s: {received!r}")
    return bytes(received)


def says_close(response: RawResponse) -> bool:
    return any(v.strip().lower() == "close" for v in response.header("connection"))


async def response_within(
    reader: asyncio.StreamReader,
    seconds: float,
    what: str,
) -> RawResponse:
    """The next response; a test failure (not a bare TimeoutError) if none comes in time."""
    try:
        return await read_response(reader, within=seconds)
    except TimeoutError:
        pytest.fail(f"{what}: no response within {seconds}s (wedged connection)")


async def next_request_outcome(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, previous: RawResponse
) -> RawResponse | None:
    """Send a next request on a connection that just got `previous`: its response, or None if
    the connection closed, which is fine only when `previous` said `Connection: close`. A
    connection that does neither is wedged, and the test fails."""
    with contextlib.suppress(ConnectionError):
        writer.write(get("/next"))
    if says_close(previous):
        assert await closed_within(reader) == b"", "bytes after a Connection: close response"
        return None
    return await response_within(reader, 3.0, "a request after a keep-alive response")


def proxy_client_transports(proxy: ProxyHandle) -> list[asyncio.Transport]:
    """The proxy's transports towards its clients (test-only view of `Server.connections`)."""
    return [conn.transport for conn in proxy.server.connections if conn.transport is not None]


def proxy_pooled_transports(proxy: ProxyHandle) -> list[asyncio.Transport]:
    """The proxy's idle pooled transports towards upstreams."""
    return [
        conn.transport
        for instance in proxy.holder.all_instances()
        for conn in instance.idle
        if conn.transport is not None
    ]


def shrink_buffers(transport: asyncio.Transport) -> None:
    """Make a proxy transport hit backpressure at kilobyte scale: a 4 KiB kernel send buffer
    (no autotuning: the kernel then absorbs ~12 KiB towards a non-reading peer with a 4 KiB
    receive buffer, instead of ~3 MB) and a 4 KiB high-water mark."""
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport.set_write_buffer_limits(high=4096)


@contextlib.asynccontextmanager
async def small_window_connection(
    proxy: ProxyHandle,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection with a 4 KiB receive buffer, which the test may never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (proxy.host, proxy.port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        await close_writer(writer)


# -- 2: upgrade requests -----------------------------------------------------------------------


async def test_an_upgrade_to_a_silent_upstream_over_a_pooled_connection_gets_504(
    make_proxy: MakeProxy,
) -> None:
    async def script(conn: UpstreamConn) -> None:
        await conn.head()
        await conn.send(ok(b"warm"))
        await conn.head()  # the upgrade request: never answered
        await conn.until_closed()

    async with ScriptedUpstream(script) as upstream:
        proxy = await make_proxy(
            stable={"upstreams": [upstream.url]}, timeouts={"response_header": "500ms"}
        )
        async with raw_connection(proxy) as (reader, writer):
            writer.write(get("/warm", "Connection: close"))
            assert (await read_response(reader)).status == 200
        async with raw_connection(proxy) as (reader, writer):
            started = time.monotonic()
            writer.write(get("/ws", *UPGRADE))
            response = await response_within(reader, 3.0, "the upgrade request")
            elapsed = time.monotonic() - started
            assert response.status == 504
            await next_request_outcome(reader, writer, response)

    assert upstream.requests[:2] == [(0, "/warm"), (0, "/ws")]  # it went over the pooled one
    assert 0.4 <= elapsed < 2.5
    assert proxy.holder.outcomes.upstream_errors == {("shop", "stable", "timeout"): 1}


# -- 3: pipelined replies wait their turn ------------------------------------------------------


async def test_a_pipelined_expect_100_continue_never_lands_inside_the_previous_response(
    make_proxy: MakeProxy, stable: FakeUpstream
) -> None:
    async def slow_ten_bytes(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 10
        await response.prepare(request)
        await response.write(b"01234")
        await asyncio.sleep(0.3)  # a slow upstream: mid-body while the next head is parsed
        await response.write(b"56789")
        await response.write_eof()
        return response

    stable.answer_with(slow_ten_bytes, path="/first")
    stable.answer_with(reply(201, body=b"created"), path="/second")
    proxy = await make_proxy()

    async with raw_connection(proxy) as (reader, writer):
        writer.write(
            get("/first")
            + b"POST /second HTTP/1.1\r\nHost: shop.example.com\r\n"
            + b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        first = await read_response(reader)
        writer.write(b"abc")
        second = await read_response(reader)

    assert (first.status, first.interim, first.body) == (200, [], b"0123456789")
    assert (second.status, second.interim, second.body) == (201, [100], b"created")
    assert stable.received[-1].body == b"abc"


# -- 4: proxy-made errors to upgrade requests --------------------------------------------------


async def test_a_502_to_an_upgrade_request_closes_or_keeps_serving_never_wedges(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(stable={"upstreams": [f"http://{HOST}:{unused_port()}"]})

    async with raw_connection(proxy) as (reader, writer):
        writer.write(get("/ws", *UPGRADE))
        response = await read_response(reader)
        assert response.status == 502
        await next_request_outcome(reader, writer, response)


async def test_a_504_to_an_upgrade_request_closes_or_keeps_serving_never_wedges(
    make_proxy: MakeProxy,
) -> None:
    async def script(conn: UpstreamConn) -> None:
        await conn.head()
        await conn.until_closed()

    async with ScriptedUpstream(script) as upstream:
        proxy = await make_proxy(
            stable={"upstreams": [upstream.url]}, timeouts={"response_header": "300ms"}
        )
        async with raw_connection(proxy) as (reader, writer):
            writer.write(get("/ws", *UPGRADE))
            response = await read_response(reader)
            assert response.status == 504
            await next_request_outcome(reader, writer, response)


# -- 5: backpressure from a request body the upstream did not read ----------------------------


async def test_an_early_answer_to_an_unread_body_leaves_the_client_connection_usable(
    make_proxy: MakeProxy,
) -> None:
    answered = asyncio.Event()
    size = 32 * 1024

    async def script(conn: UpstreamConn) -> None:
        while True:
            head = await conn.head()
            if head.startswith(b"POST"):
                await conn.send(ok(b"early"))  # before reading a byte of the body
                await answered.wait()
            await conn.body(head)
            if not head.startswith(b"POST"):
                await conn.send(ok(b"conn%d %s" % (conn.index, target_of(head).encode())))

    async with ScriptedUpstream(script, rcvbuf=4096) as upstream:
        proxy = await make_proxy(stable={"upstreams": [upstream.url]})
        async with raw_connection(proxy) as (reader, writer):
            writer.write(get("/warm"))
            assert (await read_response(reader)).status == 200
            (pooled,) = proxy_pooled_transports(proxy)
            shrink_buffers(pooled)

            # One write, one proxy read: the whole body is received, and most of it waits in
            # the proxy's buffer towards the upstream (over its high-water mark).
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: shop.example.com\r\n"
                b"Content-Length: %d\r\n\r\n" % size + b"x" * size
            )
            early = await read_response(reader)
            answered.set()  # now the upstream drains the body
            assert (early.status, early.body) == (200, b"early")
            assert not says_close(early), "the whole body was sent: the answer is keep-alive"
            writer.write(get("/next"))
            following = await response_within(reader, 2.0, "the request after the upload")

    assert following.status == 200
    assert following.body.endswith(b" /next")


# -- 6: backpressure survives a change of exchange ---------------------------------------------


async def test_a_client_that_never_reads_stops_the_proxy_pulling_from_the_next_upstream(
    make_proxy: MakeProxy,
) -> None:
    big = 48 * 1024 * 1024
    sent = Counter[str]()

    async def script(conn: UpstreamConn) -> None:
        while True:
            head = await conn.head()
            target = target_of(head)
            if target == "/small":
                await conn.send(ok(b"s" * 32 * 1024))  # one write: one read by the proxy
                continue
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
            piece = b"b" * 65536
            while sent[target] < big:
                await conn.send(piece)
                sent[target] += len(piece)

    # Two instances: round-robin sends the pipelined second request to a new connection.
    async with ScriptedUpstream(script) as one, ScriptedUpstream(script) as two:
        proxy = await make_proxy(stable={"upstreams": [one.url, two.url]}, timeouts={"idle": "10s"})
        async with small_window_connection(proxy) as (_, writer):
            await eventually(lambda: len(proxy.server.connections) == 1, every=0.01)
            (transport,) = proxy_client_transports(proxy)
            shrink_buffers(transport)
            # The first response completes in the very read that fills the client buffer.
            writer.write(get("/small") + get("/big"))

            await eventually(lambda: sent["/big"] > 0, every=0.01)
            # Wait (bounded) until the upstream stops making progress, or clearly runs away.
            limit = 8 * 1024 * 1024
            async with asyncio.timeout(10):
                while sent["/big"] < limit:
                    before = sent["/big"]
                    await asyncio.sleep(0.3)
                    if sent["/big"] == before:
                        break
            buffered = transport.get_write_buffer_size()

    assert sent["/big"] < limit, f"the upstream sent {sent['/big']} bytes to an unread client"
    assert buffered < 1024 * 1024


# -- 7: an upstream silent mid-body ------------------------------------------------------------


async def test_an_upstream_silent_mid_body_is_cut_off_after_the_idle_timeout(
    make_proxy: MakeProxy,
) -> None:
    async def script(conn: UpstreamConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await conn.until_closed()

    async with ScriptedUpstream(script) as upstream:
        proxy = await make_proxy(
            stable={"upstreams": [upstream.url]},
            timeouts={"idle": "1s", "client_header": "10s", "response_header": "10s"},
        )
        async with raw_connection(proxy) as (reader, writer):
            started = time.monotonic()
            writer.write(get("/slow"))
            head = await reader.readuntil(b"\r\n\r\n")
            body = await closed_within(reader, seconds=4.0)
            elapsed = time.monotonic() - started

    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b"partial"  # incomplete: the client knows the response was cut off
    assert 0.9 <= elapsed < 4.0
    await eventually(
        lambda: proxy.holder.outcomes.upstream_errors == {("shop", "stable", "timeout"): 1},
        every=0.01,
    )


# -- 8: a pipelined body that stalls -----------------------------------------------------------


async def test_a_pipelined_request_whose_body_stalls_gets_408_after_the_body_timeout(
    make_proxy: MakeProxy, stable: FakeUpstream
) -> None:
    proxy = await make_proxy(timeouts={"idle": "1s", "client_header": "10s"})

    async with raw_connection(proxy) as (reader, writer):
        writer.write(
            get("/g")
            + b"POST /p HTTP/1.1\r\nHost: shop.example.com\r\nContent-Length: 100\r\n\r\n"
            + b"0123456789"
        )
        first = await read_response(reader)
        started = time.monotonic()
        rest = await closed_within(reader, seconds=4.0)
        elapsed = time.monotonic() - started

    assert (first.status, first.body) == (200, b"stable /g")
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408 "), rest
    assert elapsed < 4.0


# -- 10: Host cannot be nominated away ---------------------------------------------------------


@pytest.mark.parametrize("connection", ["close, host", "Host", "keep-alive, HOST, x-debug"])
async def test_a_client_nominating_host_in_connection_does_not_strip_it(
    make_proxy: MakeProxy, stable: FakeUpstream, connection: str
) -> None:
    proxy = await make_proxy()

    async with raw_connection(proxy) as (reader, writer):
        writer.write(get("/", f"Connection: {connection}"))
        response = await read_response(reader)

    assert response.status == 200
    assert stable.received[0].header("host") == ["shop.example.com"]


# -- 11: retry of a stale pooled connection ----------------------------------------------------


async def test_a_retry_that_cannot_connect_gets_504_and_leaves_the_connection_usable(
    make_proxy: MakeProxy,
) -> None:
    """A pooled connection fails before any response byte, so the idempotent request is
    replayed on a new connection whose connect hangs (the upstream's accept queue is full).
    The client gets a 504, and its connection is not left paused."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)  # one pending connection fills the accept queue; later SYNs are dropped
    listener.setblocking(False)
    address = listener.getsockname()
    blocker = socket.socket()
    blocker.setblocking(False)
    server: asyncio.Server | None = None
    try:
        proxy = await make_proxy(
            stable={"upstreams": [f"http://{HOST}:{address[1]}"]},
            timeouts={"response_header": "500ms", "connect": "1500ms"},
        )
        async with raw_connection(proxy) as (reader, writer):
            writer.write(get("/warm"))
            async with asyncio.timeout(3):
                accepted, _ = await loop.sock_accept(listener)
            up_reader, up_writer = await asyncio.open_connection(sock=accepted)
            try:
                async with asyncio.timeout(3):
                    await up_reader.readuntil(b"\r\n\r\n")
                    up_writer.write(ok(b"warm"))
                    assert (await read_response(reader)).status == 200

                    await loop.sock_connect(blocker, address)  # the accept queue is now full
                    writer.write(get("/item"))
                    await up_reader.readuntil(b"\r\n\r\n")  # it reached the pooled connection
            finally:
                up_writer.close()  # stale: closed without a response, so the proxy replays
            response = await response_within(reader, 4.0, "the replayed request")
            assert response.status == 504

            # Let connections through again, then the connection must still work.
            async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                    while await r.readuntil(b"\r\n\r\n"):
                        w.write(ok(b"fresh"))
                w.close()

            server = await asyncio.start_server(answer, sock=listener)
            blocker.close()
            following = await next_request_outcome(reader, writer, response)
            if following is not None:
                assert (following.status, following.body) == (200, b"fresh")
    finally:
        blocker.close()
        if server is not None:
            server.close()
            await server.wait_closed()
        else:
            listener.close()
