"""Fake upstreams for the integration tests: real servers on 127.0.0.1 port 0 that tag every
response with their version and can be told to fail, stall, reset or stream (STYLE.md habit 9);
plus the few wire-level helpers the tests share (raw responses, patterned data, free ports,
closing a connection) and polling with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Protocol, Self

from aiohttp import WSMsgType, web

from proxy.control.holder import RuntimeHolder
from proxy.dataplane.server import Server

HOST: Final = "127.0.0.1"
CHUNK: Final = 64 * 1024
KEEP_BODY_BYTES: Final = 1 << 20  # a recorded body is kept whole up to this size
# A proxy's timeouts in the tests: short enough that a timeout test is quick, long enough that a
# loaded machine never trips them.
TEST_TIMEOUTS: Final[dict[str, str]] = {
    "connect": "1s",
    "response_header": "2s",
    "idle": "5s",
    "client_header": "2s",
    "shutdown": "1s",
}

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """One request as the upstream saw it."""

    method: str
    path_qs: str  # the request target exactly as sent on the wire (not normalised)
    headers: list[tuple[str, str]]
    body: bytes  # whole up to KEEP_BODY_BYTES, else empty; size and digest always
    body_size: int
    body_sha256: str
    peer: tuple[str, int]  # the proxy's side of the upstream connection

    def header(self, name: str) -> list[str]:
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


class FakeUpstream:
    """An aiohttp server that records requests and answers by a per-path `Behaviour`."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.received: list[Received] = []
        self.cancelled = 0  # handlers cancelled because the proxy closed the connection
        self.streamed = 0  # bytes written so far by `stream`
        self.streamed_sha256 = ""
        self._default: Behaviour = reply()
        self._paths: dict[str, Behaviour] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def peers(self) -> set[tuple[str, int]]:
        """Distinct upstream connections that carried at least one request."""
        return {r.peer for r in self.received}

    def answer_with(self, behaviour: Behaviour, *, path: str | None = None) -> None:
        """Answer requests for `path` (or every path without its own) with `behaviour`."""
        if path is None:
            self._default = behaviour
        else:
            self._paths[path] = behaviour

    async def start(self) -> None:
        app = web.Application()
        app[UPSTREAM] = self
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(_tag_version)
        # handler_cancellation: a handler learns that the proxy dropped the connection.
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def wait_until(
        self, predicate: Callable[[FakeUpstream], bool], within: float = 3.0
    ) -> None:
        """Wait (bounded) until `predicate` holds; re-checked whenever a request arrives or ends."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        kept = bytearray()
        size = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if size <= KEEP_BODY_BYTES:
                kept += chunk
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.received.append(
            Received(
                method=request.method,
                path_qs=request.raw_path,
                headers=[
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers
                ],
                body=bytes(kept) if size <= KEEP_BODY_BYTES else b"",
                body_size=size,
                body_sha256=digest.hexdigest(),
                peer=(str(peer[0]), int(peer[1])) if peer else ("", 0),
            )
        )
        await self._notify()
        behaviour = self._paths.get(request.path, self._default)
        try:
            return await behaviour(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            await asyncio.shield(self._notify())
            raise


UPSTREAM: Final = web.AppKey("upstream", FakeUpstream)


async def _tag_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Version"] = request.app[UPSTREAM].version


# -- behaviours --------------------------------------------------------------------------------


def reply(
    status: int = 200, *, body: bytes | None = None, headers: Iterable[tuple[str, str]] = ()
) -> Behaviour:
    """A plain response; without `body`, the body is the version tag and the request target."""

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.Response(status=status)
        for name, value in headers:
            response.headers.add(name, value)
        if status not in (204, 304):
            response.body = body if body is not None else default_body(request)
        return response

    return respond


def default_body(request: web.Request) -> bytes:
    return f"{request.app[UPSTREAM].version} {request.raw_path}".encode()


def echo() -> Behaviour:
    """The request body back (it was recorded whole; fine for bodies up to KEEP_BODY_BYTES)."""

    async def respond(request: web.Request) -> web.StreamResponse:
        return web.Response(body=request.app[UPSTREAM].received[-1].body)

    return respond


def body_digest() -> Behaviour:
    """`<size> <sha256>` of the request body, which the upstream streamed without keeping."""

    async def respond(request: web.Request) -> web.StreamResponse:
        last = request.app[UPSTREAM].received[-1]
        return web.Response(text=f"{last.body_size} {last.body_sha256}")

    return respond


def stall(until: asyncio.Event | None = None, then: Behaviour | None = None) -> Behaviour:
    """Never answer, or answer with `then` (default `reply()`) once `until` is set."""

    async def respond(request: web.Request) -> web.StreamResponse:
        if until is None:
            await asyncio.Future()  # forever; ends only by cancellation
        else:
            await until.wait()
        return await (then or reply())(request)

    return respond


def delay(seconds: float, then: Behaviour | None = None) -> Behaviour:
    """Answer after a fixed delay (a slow upstream, not a wait for state)."""

    async def respond(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await (then or reply())(request)

    return respond


def reset() -> Behaviour:
    """Reset the connection before any response byte."""

    async def respond(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        await asyncio.Future()  # the abort cancels this handler
        raise AssertionError("unreachable")

    return respond


def stream(total: int, *, content_length: bool = True, chunk: int = CHUNK) -> Behaviour:
    """`total` bytes of `pattern` data in `chunk`-sized writes, each awaited (backpressure).

    Without `content_length` aiohttp frames it chunked. Progress and digest are kept on the
    upstream (`streamed`, `streamed_sha256`).
    """

    async def respond(request: web.Request) -> web.StreamResponse:
        upstream = request.app[UPSTREAM]
        response = web.StreamResponse()
        if content_length:
            response.content_length = total
        await response.prepare(request)
        digest = hashlib.sha256()
        upstream.streamed = 0
        async for piece in pattern(total, chunk):
            digest.update(piece)
            await response.write(piece)
            upstream.streamed += len(piece)
        upstream.streamed_sha256 = digest.hexdigest()
        await response.write_eof()
        return response

    return respond


def early_hints(then: Behaviour | None = None) -> Behaviour:
    """A raw `103 Early Hints` (aiohttp has no API for 1xx) before the final response."""

    async def respond(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"
        )
        return await (then or reply())(request)

    return respond


def websocket_echo(greeting: str = "hello from upstream") -> Behaviour:
    """A WebSocket that greets first (upstream to client), then echoes text and binary."""

    async def respond(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(greeting)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(f"echo: {message.data}")
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    return respond


async def pattern(total: int, chunk: int = CHUNK) -> AsyncIterator[bytes]:
    """Deterministic, position-dependent data (a lost or reordered chunk changes the digest)."""
    index = 0
    sent = 0
    while sent < total:
        size = min(chunk, total - sent)
        yield (index.to_bytes(8, "big") * (size // 8 + 1))[:size]
        index += 1
        sent += size


# -- raw upstream ------------------------------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """A TCP server running `script` per connection, for what aiohttp can't send."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []  # request heads received
        self.closed_by_peer = asyncio.Event()  # a connection saw EOF or a reset from the proxy
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            await self.script(reader, writer)
            if reader.at_eof():
                self.closed_by_peer.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_peer.set()
        finally:
            self._writers.discard(writer)
            await close_writer(writer)


def send_and_close(data: bytes) -> Script:
    """Answer the request head with `data` verbatim, then close the connection."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return script


def hold_until_closed() -> Script:
    """Never answer; note when the proxy closes its side (EOF or reset)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(CHUNK):
            pass

    return script


def upgrade_echo() -> Script:
    """Accept any upgrade with 101, then echo every byte back until EOF."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()

    return script


def unused_port() -> int:
    """A port nothing listens on (bound, then closed without listening): a connection to it is
    refused, and a server of the test's own may listen on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# -- raw client side ---------------------------------------------------------------------------


@dataclass(slots=True)
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before this one

    def header(self, name: str) -> list[str]:
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]


async def read_response(
    reader: asyncio.StreamReader, *, head_request: bool = False, within: float = 2.0
) -> RawResponse:
    """One response off the wire: 1xx skipped (noted), body framed by RFC 9112 §6.3."""
    async with asyncio.timeout(within):
        interim: list[int] = []
        while True:
            status, headers = await _read_head(reader)
            if status >= 200 or status == 101:
                break
            interim.append(status)
        response = RawResponse(status=status, headers=headers, interim=interim)
        if head_request or status in (101, 204, 304):
            return response
        if any(v.lower() == "chunked" for v in response.header("transfer-encoding")):
            response.body = await _read_chunked(reader)
        elif lengths := response.header("content-length"):
            response.body = await reader.readexactly(int(lengths[0]))
        else:
            response.body = await reader.read()  # close-delimited
        return response


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]]]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [
        (n.strip(), v.strip()) for n, v in (line.split(":", 1) for line in lines[1:] if line)
    ]
    return status, headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n", "chunk not followed by CRLF"


# -- what the conftest fixtures hand to tests --------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHandle:
    """An in-process proxy listening on 127.0.0.1."""

    host: str
    port: int
    holder: RuntimeHolder
    server: Server

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class MakeProxy(Protocol):
    """Start a proxy whose default route `shop` sends to the `stable` and `canary` fixtures.

    Keyword arguments replace fields of that route (`split=`, `match=`, `stable=`, ...);
    `routes=` replaces the route list; `timeouts=` / `limits=` override the test defaults.
    """

    async def __call__(
        self,
        *,
        routes: list[dict[str, object]] | None = None,
        timeouts: dict[str, str] | None = None,
        limits: dict[str, int] | None = None,
        rng: Callable[[], float] | None = None,
        **route: object,
    ) -> ProxyHandle: ...


class Listening(Protocol):
    """Anything whose data plane listens on `host`:`port`: an in-process proxy or a process."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class RawExchange(Protocol):
    """Send `data`, return every byte the server sends until it closes (or `timeout`)."""

    async def __call__(
        self,
        host: str,
        port: int,
        data: bytes,
        timeout: float = 2.0,  # noqa: ASYNC109 - reading until close or timeout is the point
    ) -> bytes: ...


@contextlib.asynccontextmanager
async def raw_connection(
    proxy: Listening,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection to the proxy, for conversations a client library would tidy up."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        yield reader, writer
    finally:
        await close_writer(writer)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a connection and wait until it is closed, even if the peer has reset it."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# -- polling -----------------------------------------------------------------------------------


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], within: float = 3.0, every: float = 0.02
) -> None:
    """Poll `condition` every `every` seconds until it holds, failing (TimeoutError) after
    `within` seconds: for state with no event to wait on (the proxy's, or another process's)."""
    async with asyncio.timeout(within):
        while True:
            held = condition()
            if not isinstance(held, bool):
                held = await held
            if held:
                return
            await asyncio.sleep(every)
