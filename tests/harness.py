"""A transport-free harness for the data plane's protocols: bytes in, bytes out.

`Proxy` is a `Server` on a `FakeLoop`: time moves only when a test calls `advance`, callbacks
and tasks run when it calls `run_until_idle` (which every step below does), and
`create_connection` hands the upstream protocol a `FakeTransport` whose far end is an
`UpstreamPeer` the test reads requests from and feeds responses to. A `Client` is the far end
of one client connection: `send` feeds its bytes to the `ClientConnection` (held back while
the proxy has paused reading, as a kernel would), `received` is what the proxy wrote to it.

The loop is fake rather than a real asyncio loop over fake transports so that a test decides
when time passes (deadlines without sleeping) and everything runs in one deterministic order.
It implements what the data plane calls: `call_soon`, `call_at`, `create_task` (the exchange
dials an upstream in a task, under `asyncio.timeout`) and `create_connection`.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final, TypeVar, TypeVarTuple, cast

from proxy.control.holder import RuntimeHolder
from proxy.core.config import parse_config
from proxy.dataplane.server import ClientConnection, Server
from proxy.dataplane.upstream import UpstreamConnection

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

START: Final = 1000.0  # the fake clock's first reading: every deadline is non-zero
SWEEP_SECONDS: Final = 0.05  # how often `advance` runs the server's deadline sweep
CLIENT_ADDRESS: Final = ("203.0.113.7", 40000)
UPSTREAM_OK: Final = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


# -- HTTP/1.1 on the wire ------------------------------------------------------------------


def head_fields(head: bytes) -> dict[bytes, bytes]:
    """The header fields of a message head, by lower-cased name (the last one wins)."""
    found: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            found[name.strip().lower()] = value.strip()
    return found


def chunked_payload(data: bytes, start: int) -> tuple[int, bool]:
    """Payload bytes of the (possibly incomplete) chunked body at `start`, and whether its
    last chunk has begun."""
    _, payload, last = _chunked_body(data, start)
    return payload, last


def _chunked_body(data: bytes, start: int) -> tuple[int | None, int, bool]:
    """Of the chunked body at `start`: its end offset (None while incomplete), the payload
    bytes so far, and whether its last chunk has begun."""
    pos = start
    payload = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return None, payload, False
        try:
            size = int(data[pos:line_end].split(b";", 1)[0], 16)
        except ValueError:
            return None, payload, False
        pos = line_end + 2
        if size == 0:
            trailers_end = data.find(b"\r\n\r\n", pos - 2)
            return (None if trailers_end < 0 else trailers_end + 4), payload, True
        payload += min(size, max(0, len(data) - pos))
        if len(data) < pos + size + 2:
            return None, payload, False
        pos += size + 2


def complete_request_length(data: bytes) -> int | None:
    """Length of the first complete request in `data` (head plus framed body), else None."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = head_fields(data[:head_end])
    body_start = head_end + 4
    if b"chunked" in head.get(b"transfer-encoding", b"").lower():
        return _chunked_body(data, body_start)[0]
    length = head.get(b"content-length")
    if length is not None:
        try:
            end = body_start + int(length)
        except ValueError:
            return None
        return end if len(data) >= end else None
    return body_start


def status_of(data: bytes) -> int | None:
    """The status code of the response `data` starts with, if it starts with a status line."""
    parts = data.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None
    return int(parts[1])


def responses(data: bytes) -> tuple[list[tuple[int, bytes, bytes]], bytes]:
    """The complete Content-Length-framed responses at the start of `data`, as (status, head,
    body), and what is left over."""
    out: list[tuple[int, bytes, bytes]] = []
    rest = data
    while rest:
        head_end = rest.find(b"\r\n\r\n")
        if head_end < 0:
            break
        head = rest[:head_end]
        length = head_fields(head).get(b"content-length")
        status = head.split(b" ", 2)
        if length is None or not length.isdigit() or len(status) < 2 or not status[1].isdigit():
            break
        body_end = head_end + 4 + int(length)
        out.append((int(status[1]), head, rest[head_end + 4 : body_end]))
        rest = rest[body_end:]
    return out, rest


# -- the loop ------------------------------------------------------------------------------


class FakeLoop:
    """Just enough of an event loop for the data plane, with a clock the test steps (what
    `asyncio.AbstractEventLoop` declares and the data plane never calls is left out)."""

    def __init__(self) -> None:
        self.now = START
        self._ready: deque[asyncio.Handle] = deque()
        self._timers: list[asyncio.TimerHandle] = []
        self.errors: list[dict[str, Any]] = []
        self.upstream = FakeUpstream(self)

    @property
    def as_loop(self) -> asyncio.AbstractEventLoop:
        """This loop where an event loop is expected."""
        return cast(asyncio.AbstractEventLoop, self)

    def time(self) -> float:
        return self.now

    def get_debug(self) -> bool:
        return False

    def is_closed(self) -> bool:
        return False

    def call_soon(
        self,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self.as_loop, context)
        self._ready.append(handle)
        return handle

    def call_at(
        self,
        when: float,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        timer = asyncio.TimerHandle(when, callback, args, self.as_loop, context)
        heapq.heappush(self._timers, timer)
        return timer

    def call_later(
        self,
        delay: float,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_at(self.now + delay, callback, *args, context=context)

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # dropped when it comes due

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self.as_loop)

    def create_task(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        return asyncio.Task(coro, loop=self.as_loop, name=name, context=context)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    async def create_connection(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        return self.upstream.accept(protocol_factory(), host, port)

    def run_until_idle(self) -> None:
        """Run every ready callback, and those they schedule, until none is left; a callback
        that raised fails the test here (a real loop would only log it)."""
        outer = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self.as_loop)
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle.cancelled():
                    handle._run()
        finally:
            asyncio.events._set_running_loop(outer)
        assert not self.errors, f"event loop errors: {self.errors!r}"

    def advance_to(self, when: float) -> None:
        """Move the clock to `when`, running each timer as it comes due."""
        self.run_until_idle()
        while self._timers and self._timers[0].when() <= when:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled():
                self.now = max(self.now, timer.when())
                self._ready.append(timer)
                self.run_until_idle()
        self.now = max(self.now, when)


# -- transports ----------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """One end of a connection: records what the protocol writes, holds back what the far
    end sends while reading is paused, and reports the close to the protocol on the next
    loop turn, as asyncio's transports do."""

    def __init__(
        self, loop: FakeLoop, protocol: asyncio.Protocol, peername: tuple[str, int]
    ) -> None:
        super().__init__(extra={"peername": peername})
        self.loop = loop
        self.protocol = protocol
        self.written = bytearray()
        self.inbox: deque[bytes] = deque()
        self.reading = True
        self.closing = False
        self.aborted = False
        self.eof_written = False
        self.write_buffer = 0  # what the far end has not read yet, as far as the protocol knows
        self.on_write: Callable[[], None] | None = None  # the far end, told on the next turn
        protocol.connection_made(self)

    # What the protocol calls.

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("write after write_eof")
        if not self.closing:
            self.written += data
            if self.on_write is not None:
                self.loop.call_soon(self.on_write)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return self.write_buffer

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.loop.call_soon(self.deliver)

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        if not self.closing:
            self.aborted = True
        self._lose()

    def _lose(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    # What the far end does.

    def feed(self, data: bytes) -> None:
        """The far end sends `data`: it reaches the protocol once reading is not paused; bytes
        for a closed connection are lost."""
        self.inbox.append(data)
        self.deliver()

    def deliver(self) -> None:
        while self.inbox and self.reading and not self.closing:
            self.protocol.data_received(self.inbox.popleft())

    def hang_up(self, exc: Exception | None = None) -> None:
        """The far end goes away: a FIN (`exc` None) or a reset."""
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, exc)

    @property
    def ended(self) -> bool:
        """The protocol ended its side cleanly: a FIN (half-close or close), not a reset."""
        return self.eof_written or (self.closing and not self.aborted)


# -- the far ends --------------------------------------------------------------------------


class Client:
    """The far end of one client connection to the proxy."""

    def __init__(self, loop: FakeLoop, server: Server) -> None:
        self.loop = loop
        self.protocol = ClientConnection(server)
        self.transport = FakeTransport(loop, self.protocol, CLIENT_ADDRESS)
        loop.run_until_idle()

    def send(self, *segments: bytes) -> None:
        """Send each segment as one read of the proxy's, letting the loop run in between."""
        for segment in segments:
            self.transport.feed(segment)
            self.loop.run_until_idle()

    @property
    def received(self) -> bytes:
        return bytes(self.transport.written)

    @property
    def ended(self) -> bool:
        return self.transport.ended

    @property
    def reset(self) -> bool:
        return self.transport.aborted

    @property
    def open(self) -> bool:
        return not self.transport.closing and not self.transport.eof_written


class UpstreamPeer:
    """The far end of one upstream connection the proxy opened; while `answer` is set, it
    answers each complete request with it, as soon as the request has arrived."""

    def __init__(
        self, loop: FakeLoop, protocol: UpstreamConnection, address: tuple[str, int]
    ) -> None:
        self.loop = loop
        self.protocol = protocol
        self.address = address
        self.answer: bytes | None = None
        self.answered = 0  # bytes of `received` already answered
        self.transport = FakeTransport(loop, protocol, address)
        self.transport.on_write = self._answer

    @property
    def received(self) -> bytes:
        return bytes(self.transport.written)

    @property
    def closed(self) -> bool:
        """The proxy let go of this connection (closed or reset it)."""
        return self.transport.closing

    def send(self, *segments: bytes) -> None:
        for segment in segments:
            self.transport.feed(segment)
            self.loop.run_until_idle()

    def hang_up(self, exc: Exception | None = None) -> None:
        self.transport.hang_up(exc)
        self.loop.run_until_idle()

    def _answer(self) -> None:
        while self.answer is not None and not self.closed:
            length = complete_request_length(self.received[self.answered :])
            if length is None:
                return
            self.answered += length
            self.transport.feed(self.answer)


class FakeUpstream:
    """Where `create_connection` lands: records every connection. Each new connection answers
    with `answer` (None: the test answers by hand)."""

    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.peers: list[UpstreamPeer] = []
        self.answer: bytes | None = UPSTREAM_OK

    def accept(
        self, protocol: asyncio.BaseProtocol, host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        assert isinstance(protocol, UpstreamConnection)
        peer = UpstreamPeer(self.loop, protocol, (host, port))
        peer.answer = self.answer
        self.peers.append(peer)
        return peer.transport, protocol

    @property
    def connections(self) -> int:
        return len(self.peers)

    @property
    def data(self) -> bytes:
        return b"".join(peer.received for peer in self.peers)

    @property
    def ended(self) -> int:
        return sum(peer.closed for peer in self.peers)


# -- the proxy -----------------------------------------------------------------------------


def one_route_config(*, route: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A config whose one route `shop` sends everything to one stable upstream; `route`
    adds fields to the route, `sections` to the config."""
    shop = {"name": "shop", "stable": {"upstreams": ["http://10.0.0.1:8000"]}, **(route or {})}
    return {"listen": "127.0.0.1:0", "routes": [shop], **sections}


class Proxy:
    """A data plane on a fake loop: clients connect to it, it connects to a fake upstream."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.loop = FakeLoop()
        self.holder = RuntimeHolder(parse_config(config, base_dir="/tmp"))
        self.server = Server(self.holder.plane, self.loop.as_loop)
        self.upstream = self.loop.upstream

    def connect(self) -> Client:
        return Client(self.loop, self.server)

    def converse(self, *segments: bytes) -> Client:
        """A new client sends `segments`, stopping once the proxy has answered or closed."""
        client = self.connect()
        for segment in segments:
            if client.received or not client.open:
                break
            client.send(segment)
        return client

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass, with the deadline sweep running as the server's task would."""
        end = self.loop.now + seconds
        while self.loop.now < end:
            self.loop.advance_to(min(end, self.loop.now + SWEEP_SECONDS))
            self.server.sweep(self.loop.now)
            self.loop.run_until_idle()
