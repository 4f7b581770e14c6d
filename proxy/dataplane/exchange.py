"""The exchange: one client request paired with one upstream response — connect or reuse,
stream the body both ways with backpressure, frame the response, fail cleanly, record once.

It is driven entirely by callbacks from the client side (a `ClientSide`: one HTTP/1.1
connection, `server.ClientConnection`, or any other protocol that carries one request at a
time) and from `upstream.UpstreamConnection`; only opening a new upstream connection is awaited.
Everything it shares with the rest of the process comes in through the `DataPlane`.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import Final

from mypy_extensions import trait

from proxy.core.framing import (
    CLOSE_DELIMITED,
    RECHUNK,
    REFUSE,
    SEND_LENGTH,
    UNTIL_CLOSE,
    response_framing,
)
from proxy.core.headers import RESPONSE_DROP, nominated_fields, plain_response, status_line
from proxy.core.vocabulary import CANARY, STABLE
from proxy.core.window import Evidence
from proxy.dataplane.runtime import DataPlane, RouteRuntime, Runtime
from proxy.dataplane.upstream import COOL_DOWN_SECONDS, Instance, UpstreamConnection, VersionPool

log = logging.getLogger("canary_proxy")

# Why the client transport is paused; reading resumes only when no reason is left.
PAUSE_PIPELINE: Final = 1  # a pipelined request waits for the one before it
PAUSE_CONNECTING: Final = 2  # body bytes wait for the upstream connection
PAUSE_BACKPRESSURE: Final = 4  # the upstream is not draining what we write
PAUSE_UPGRADE: Final = 8  # tunnel bytes wait for the upstream's 101

# RFC 9110 §9.2.2: only these may be retried automatically (TRACE is refused outright).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})

_TE: Final = b"transfer-encoding"
_CL: Final = b"content-length"
_CONNECTION: Final = b"connection"
_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
_CLOSE: Final = b"Connection: close\r\n"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_KEEP_ALIVE: Final = b"Connection: keep-alive\r\n"


@trait
class ClientSide:
    """What an exchange needs of the client-side protocol that drives it: its loop, writing
    (corked into one write per upstream read, and what is still held taken back), flow
    control by reasons, closing, the switch to a tunnel, and being told that the exchange is
    over. The protocol feeds the exchange the request body (`request_body`,
    `request_complete`), a lost client (`client_lost`), and for a chunked body the go-ahead
    for its upstream side once the first chunk line is in (`body_framed`, `start_upstream`).

    A mypyc trait rather than a typing.Protocol: compiled, a call through it is a native
    vtable call; through a Protocol every write was a Python method call (about 2.5 % more
    instructions per request, benchmarks/instructions.py)."""

    loop: asyncio.AbstractEventLoop
    write_paused: bool  # the client is not draining what we write

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def cork(self) -> None:
        raise NotImplementedError

    def uncork(self) -> None:
        raise NotImplementedError

    def drop_held(self, first: bytes) -> bool:
        raise NotImplementedError

    def pause(self, reason: int) -> None:
        raise NotImplementedError

    def unpause(self, reason: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def start_tunnel(self, exchange: Exchange) -> None:
        raise NotImplementedError

    def exchange_finished(self, exchange: Exchange) -> None:
        raise NotImplementedError


class Reject(Exception):
    """A request the proxy answers itself and then closes the connection for."""

    def __init__(self, status: int, message: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.message = message


class Exchange:
    """One request/response pair: routed at head time, streamed both ways, recorded once."""

    __slots__ = (
        "body_bytes",
        "body_framed",
        "client",
        "client_gone",
        "connect_task",
        "expect_body",
        "head",
        "held_head",
        "http11",
        "instance",
        "keep_alive",
        "local",
        "method",
        "pending",
        "plane",
        "pool",
        "read_deadline",
        "reads_seen",
        "request_chunked",
        "request_done",
        "response_chunked",
        "response_deadline",
        "response_done",
        "response_started",
        "retried",
        "reused",
        "route",
        "runtime",
        "send_continue",
        "started",
        "status",
        "tunnel_tail",
        "upgrade",
        "upstream",
        "version",
        "window",
    )

    def __init__(
        self,
        client: ClientSide,
        plane: DataPlane,
        runtime: Runtime,
        *,
        method: bytes,
        http11: bool,
        keep_alive: bool,
        started: float,
        expect_body: bool,
        route: RouteRuntime | None,
        version: str = STABLE,
        pool: VersionPool | None = None,
        instance: Instance | None = None,
        head: bytes = b"",
        request_chunked: bool = False,
        send_continue: bool = False,
        upgrade: bool = False,
        local: tuple[int, bytes] | None = None,
    ) -> None:
        """Complete at construction: the request as routed (`route`, `version`, the `pool` and
        `instance` picked, the upstream `head`), or a reply of our own (`local`: status and
        message) when there is nowhere to send it."""
        self.client = client
        self.plane = plane
        self.runtime = runtime
        self.method = method
        self.http11 = http11
        self.keep_alive = keep_alive
        self.started = started
        self.route = route
        self.version = version
        # The guard window this request counts in, fixed when it is routed: if the windows
        # are reset meanwhile (retry, new revision), its outcome is old evidence and is dropped.
        self.window: Evidence | None = None
        if route is not None:
            live = route.state
            self.window = live.canary_evidence if version == CANARY else live.stable_evidence
        self.pool = pool
        self.instance = instance
        self.head = head
        self.local = local
        self.status = 0 if local is None else local[0]
        self.request_chunked = request_chunked
        self.expect_body = expect_body
        self.send_continue = send_continue
        self.upgrade = upgrade
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.pending: list[bytes] | None = None
        self.body_framed = False  # a chunked body's first chunk line has been parsed
        self.request_done = False
        self.body_bytes = 0
        self.response_started = False
        self.response_done = False
        self.response_chunked = False
        # This response's head while it is held in the client's output with the upstream read
        # that carried it (None once it may have left): see upstream_failed.
        self.held_head: bytes | None = None
        self.response_deadline = 0.0
        self.retried = False
        self.reused = False
        self.client_gone = False
        self.read_deadline = 0.0
        self.reads_seen = 0
        self.tunnel_tail = b""

    # -- starting --------------------------------------------------------------------------

    def start(self) -> None:
        """Runs when this exchange becomes the connection's active one (never earlier: a
        pipelined request must not write anything ahead of the response before it)."""
        if self.local is not None:
            self._respond_local(*self.local)
            return
        if self.send_continue and not self.request_done:
            self.client.write(_CONTINUE)
        if self.request_chunked and not self.body_framed:
            return  # the client connection calls start_upstream once the first chunk line is in
        self.start_upstream()

    def start_upstream(self) -> None:
        instance = self.instance
        assert instance is not None
        upstream = instance.take_idle()
        if upstream is not None:
            self._attach(upstream, reused=True)
        else:
            self._connect()

    def _respond_local(self, status: int, message: bytes) -> None:
        if self.expect_body and not self.request_done:
            self.keep_alive = False  # we will not read the rest of the body
        else:
            self.request_done = True  # bodiless: complete at its head
        self.status = status
        self._reply(status, message)

    def _connect(self) -> None:
        self.client.pause(PAUSE_CONNECTING)
        if self.pending is None:
            self.pending = []
        self.connect_task = self.client.loop.create_task(self._open_connection())

    async def _open_connection(self) -> None:
        instance = self.instance
        while instance is not None:
            try:
                upstream = await self._dial(instance)
            except TimeoutError:
                self._fail_before_response(504, b"Gateway Timeout", "timeout")
                return
            except ConnectionRefusedError:
                # Nothing was sent: another instance of the same version may take it.
                now = monotonic()
                instance.down_until = now + COOL_DOWN_SECONDS
                assert self.pool is not None
                instance = self.instance = self.pool.pick(now)
                continue
            except OSError:
                self._fail_before_response(502, b"Bad Gateway", "connect")
                return
            self.connect_task = None
            if self.client_gone:
                upstream.close()
            else:
                self._attach(upstream, reused=False)
            return
        self._fail_before_response(502, b"Bad Gateway", "connect")

    async def _dial(self, instance: Instance) -> UpstreamConnection:
        async with asyncio.timeout(self.runtime.config.timeouts.connect):
            _, upstream = await self.client.loop.create_connection(
                lambda: UpstreamConnection(instance), instance.host, instance.port
            )
        return upstream

    def _attach(self, upstream: UpstreamConnection, *, reused: bool) -> None:
        self.upstream = upstream
        self.reused = reused
        upstream.bind(
            self,
            no_body=self.method == b"HEAD",
            head_limit=self.runtime.config.limits.max_response_header_bytes,
        )
        upstream.write(self.head)
        pending = self.pending
        if pending:
            self.pending = None
            for chunk in pending:
                self._send_body(upstream, chunk)
        else:
            self.pending = None
        if self.request_done:
            self._request_sent(upstream)
        if self.client.write_paused:
            upstream.pause_reading()  # the client is not draining what we already wrote
        self.client.unpause(PAUSE_CONNECTING)

    # -- request body ----------------------------------------------------------------------

    def request_body(self, chunk: bytes) -> None:
        if self.response_done or self.local is not None:
            return  # answered already: the rest of the body is read and dropped
        self.body_bytes += len(chunk)
        limit = self.runtime.config.limits.max_body_bytes
        if limit and self.body_bytes > limit:
            # Raised through the parser so the connection answers it in pipeline order.
            raise Reject(413, b"Content Too Large")
        upstream = self.upstream
        if upstream is not None:
            self._send_body(upstream, chunk)
        elif self.pending is not None:
            self.pending.append(chunk)
        else:
            self.pending = [chunk]

    def _send_body(self, upstream: UpstreamConnection, chunk: bytes) -> None:
        if self.request_chunked:
            upstream.write(b"%x\r\n" % len(chunk) + chunk + _CRLF)
        else:
            upstream.write(chunk)

    def request_complete(self) -> None:
        self.request_done = True
        upstream = self.upstream
        if upstream is not None and not self.response_done:
            self._request_sent(upstream)

    def _request_sent(self, upstream: UpstreamConnection) -> None:
        if self.request_chunked:
            upstream.write(_LAST_CHUNK)
        if not self.response_started:
            self.response_deadline = (
                self.client.loop.time() + self.runtime.config.timeouts.response_header
            )

    # -- upstream callbacks ----------------------------------------------------------------

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status < 200:
            self._interim(status, headers)
            return
        self.response_deadline = 0.0
        head = self._response_head(status, headers)
        if head is None:
            # A transfer coding we cannot pass on honestly (RFC 9112 §6.1): refuse it.
            self._drop_upstream()
            self.upstream_failed("protocol", True)
            return
        self.status = status
        self.response_started = True
        self.held_head = head
        self.client.write(head)

    def _interim(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status == 101:
            if not self.upgrade:
                return  # an unrequested switch: upstream_upgraded turns it into a 502
            self.status = 101
            self.response_deadline = 0.0
            self.response_started = True
            lines = [status_line(101, b"")]
            lines.extend(name + b": " + value + _CRLF for name, value in headers)
            lines.append(_CRLF)
            self.client.write(b"".join(lines))
        elif status != 100 and self.http11:
            # RFC 9110 §15.2: a proxy forwards 1xx (e.g. 103 Early Hints); 100 is ours to send.
            lines, _, _ = _response_lines(status, headers)
            self.client.write(b"".join(lines) + _CRLF)

    def _response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        lines, content_length, coding = _response_lines(status, headers)
        framing = response_framing(
            status, content_length, coding, head_request=self.method == b"HEAD", http11=self.http11
        )
        if framing == REFUSE:
            return None
        if framing & SEND_LENGTH:
            assert content_length is not None
            lines.append(b"Content-Length: " + content_length + _CRLF)
        if framing & UNTIL_CLOSE and self.upstream is not None:
            self.upstream.until_close = True
        if framing & RECHUNK:
            self.response_chunked = True
            lines.append(_CHUNKED)
        elif framing & CLOSE_DELIMITED:
            self.keep_alive = False  # close-delimited for an HTTP/1.0 client
        if self.upgrade or not self.request_done or self.plane.draining:
            # A refused upgrade leaves the request stream unusable; an early answer means we
            # will not read the rest of the request body.
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(_CLOSE)
        elif not self.http11:
            lines.append(_KEEP_ALIVE)
        lines.append(_CRLF)
        return b"".join(lines)

    def upstream_body(self, chunk: bytes) -> None:
        if self.response_chunked:
            self.client.write(b"%x\r\n" % len(chunk) + chunk + _CRLF)
        else:
            self.client.write(chunk)

    def upstream_complete(self) -> bool:
        """The response ended; returns whether its connection may serve another request
        (the upstream connection pools itself only once its read is fully parsed)."""
        self.upstream = None
        if self.response_chunked:
            self.client.write(_LAST_CHUNK)
        self.response_done = True
        self._finish()
        return self.request_done and not self.client_gone

    def upstream_upgraded(self, tail: bytes) -> None:
        if self.status != 101:
            self._drop_upstream()
            self.upstream_failed("protocol", True)
            return
        self.client.start_tunnel(self)
        if tail:
            self.client.write(tail)
        if self.tunnel_tail and self.upstream is not None:
            self.upstream.write(self.tunnel_tail)
            self.tunnel_tail = b""
        self._record()

    def batch_begin(self) -> None:
        self.client.cork()

    def batch_end(self) -> None:
        self.held_head = None
        self.client.uncork()

    def upstream_tunnel_data(self, data: bytes) -> None:
        self.client.write(data)

    def client_tunnel_data(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)

    def upstream_failed(self, kind: str, got_response: bool) -> None:
        self.upstream = None
        if self.client_gone or self.response_done:
            return
        if self.status == 101:
            self.client.close()  # tunnel closed by the upstream
            return
        held = self.held_head
        if self.response_started and held is not None and self.client.drop_held(held):
            # Nothing of the response has left (its head is still held with the read that
            # carried it, e.g. a malformed chunked body right behind it): a 502 can still go.
            self.held_head = None
            self.response_started = False
            self.response_chunked = False
        if self._may_retry(kind, got_response):
            self.retried = True
            self.response_deadline = 0.0
            self._connect()
            return
        self._record_upstream_error(kind)
        if self.response_started:
            self.status = 502  # truncated response: the client sees an aborted message
            self._abort_both()
        elif kind == "timeout":
            self._reply_error(504, b"Gateway Timeout")
        else:
            self._reply_error(502, b"Bad Gateway")

    def _may_retry(self, kind: str, got_response: bool) -> bool:
        # A pooled connection the upstream closed while idle (RFC 9112 §9.3.1): replay once, and
        # only what is safe to replay (RFC 9110 §9.2.2): idempotent, bodiless, nothing received.
        return (
            kind == "reset"
            and self.reused
            and not got_response
            and not self.retried
            and self.request_done
            and self.body_bytes == 0
            and self.method in IDEMPOTENT
        )

    def upstream_pause_writing(self) -> None:
        self.client.pause(PAUSE_BACKPRESSURE)

    def upstream_resume_writing(self) -> None:
        self.client.unpause(PAUSE_BACKPRESSURE)

    # -- failures --------------------------------------------------------------------------

    def _fail_before_response(self, status: int, message: bytes, kind: str) -> None:
        self.connect_task = None
        if self.client_gone:
            return
        self._record_upstream_error(kind)
        self.client.unpause(PAUSE_CONNECTING)
        self._reply_error(status, message)

    def response_timed_out(self) -> None:
        self.response_deadline = 0.0
        self._record_upstream_error("timeout")
        self._drop_upstream()
        self._reply_error(504, b"Gateway Timeout")

    def _reply_error(self, status: int, message: bytes) -> None:
        self.status = status
        if not self.request_done or self.upgrade:
            self.keep_alive = False  # unread body, or a parser left in upgrade mode
        self._reply(status, message)

    def _reply(self, status: int, message: bytes) -> None:
        close = not self.keep_alive or self.plane.draining
        self.keep_alive = not close
        self.response_started = True
        self.response_done = True
        self.client.write(plain_response(status, message, close=close))
        self._finish()

    def abandon(self, status: int, message: bytes) -> None:
        """The request body is malformed: the upstream never gets a complete message (its
        connection is aborted mid-body), the client gets `status` if nothing was sent yet."""
        self.keep_alive = False
        self.plane.outcomes.record_rejected(status)
        if self.response_started:
            self._abort_both()
            return
        self._drop_upstream()
        self.client.unpause(PAUSE_CONNECTING)
        self._reply_error(status, message)

    def _drop_upstream(self) -> None:
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.abort()
        task = self.connect_task
        self.connect_task = None
        if task is not None:
            task.cancel()
            self.client.unpause(PAUSE_CONNECTING)

    def check_read_progress(self, now: float, idle: float) -> None:
        """Between-reads timeout once the response has started (nginx `proxy_read_timeout`):
        the sweep calls this; an upstream that stops sending mid-body is cut off."""
        upstream = self.upstream
        if upstream is None:
            return
        if upstream.reads != self.reads_seen or not self.read_deadline:
            self.reads_seen = upstream.reads
            self.read_deadline = now + idle
        elif now >= self.read_deadline:
            self._record_upstream_error("timeout")
            self._abort_both()

    def _abort_both(self) -> None:
        self._drop_upstream()
        self.response_done = True
        self.keep_alive = False
        self._record()
        self.client.abort()

    def client_lost(self) -> None:
        """The client went away: cancel the upstream exchange and count it as 499."""
        if self.response_done or self.client_gone:
            return
        self.client_gone = True
        self._drop_upstream()
        if self.status != 101:
            self.status = 499
            self._record()

    # -- accounting ------------------------------------------------------------------------

    def _record_upstream_error(self, kind: str) -> None:
        route = self.route
        if route is not None:
            stats = route.canary_stats if self.version == CANARY else route.stable_stats
            stats.upstream_error(kind)

    def _record(self) -> None:
        route = self.route
        status = self.status
        if route is None:
            self.plane.outcomes.record_rejected(status)
            return
        now = monotonic()
        duration = now - self.started
        canary = self.version == CANARY
        (route.canary_stats if canary else route.stable_stats).observe(status, duration)
        window = self.window
        if window is None or status == 499:
            return  # no guard, or a client that left: no evidence either way (docs/semantics.md)
        error = status >= 500
        window.record(now, error=error, latency=duration)
        if error and canary and window is route.state.canary_evidence:
            self.plane.canary_failed(route.name, route.state)

    def _finish(self) -> None:
        self.response_done = True
        self._record()
        self.client.exchange_finished(self)


# Status lines by status (llhttp reports three digits: at most 900 entries), so that a response
# costs a dict lookup rather than a call into the interpreted core.
_STATUS_LINES: Final[dict[int, bytes]] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = status_line(status, b"")
    return line


def _response_lines(
    status: int, headers: list[tuple[bytes, bytes]]
) -> tuple[list[bytes], bytes | None, bytes | None]:
    """Status line plus end-to-end fields; also the upstream's Content-Length and its
    transfer coding (lower-cased), which the caller re-frames."""
    lines = [_status_line(status)]
    content_length: bytes | None = None
    coding: bytes | None = None
    connection: list[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in RESPONSE_DROP:
            if lname == _CL:
                content_length = value
            elif lname == _TE:
                coding = value.strip().lower() if coding is None else coding + b", " + value
            elif lname == _CONNECTION:
                connection = [value] if connection is None else [*connection, value]
            continue
        lines.append(name + b": " + value + _CRLF)
    if connection is not None and (nominated := nominated_fields(connection)):
        lines = [lines[0]] + [
            line for line in lines[1:] if line.split(b":", 1)[0].lower() not in nominated
        ]
    return lines, content_length, coding
