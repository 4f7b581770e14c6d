"""Client side of the data plane: the llhttp request Protocol, request validation and
routing, keep-alive, pipelining, limits, deadlines, draining, and the listener.

Callback-driven like uvicorn's `httptools_impl`: a pooled upstream connection is written to
from inside the parser callback, so the common request costs no task and no await. Only a new
upstream connection is awaited, in a small task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from time import monotonic
from typing import Any, Final, cast

import httptools

from proxy.core.config import Timeouts
from proxy.core.framing import (
    LOOKALIKE_EDGES,
    LOOKALIKE_MIN_LENGTH,
    MAX_HEADER_FIELDS,
    check_expect,
    check_request_head,
    upstream_request_head,
)
from proxy.core.headers import REQUEST_DROP, plain_response
from proxy.core.routing import choose_version, cookie_value
from proxy.core.vocabulary import CANARY, STABLE
from proxy.dataplane.exchange import (
    PAUSE_BACKPRESSURE,
    PAUSE_PIPELINE,
    PAUSE_UPGRADE,
    ClientSide,
    Exchange,
    Reject,
)
from proxy.dataplane.runtime import DataPlane, RouteRuntime

log = logging.getLogger("canary_proxy")


# What the connection deadline currently guards.
DEADLINE_NONE: Final = 0
DEADLINE_IDLE: Final = 1  # keep-alive idle between requests: close silently
DEADLINE_HEADER: Final = 2  # request head must arrive in time: 408
DEADLINE_BODY: Final = 3  # request body must keep flowing: 408
DEADLINE_SEND: Final = 4  # the client must keep reading our response: abort
DEADLINE_LINGER: Final = 5  # end of a lingering close: abort

# How long unread client bytes are drained after an error reply before the socket closes.
LINGER_SECONDS: Final = 2.0

# A connection refused over `limits.max_connections` is logged at most this often.
REFUSAL_LOG_SECONDS: Final = 10.0

# Request fields the routing pass looks at (headers.REQUEST_DROP says which are not copied).
_HOST: Final = b"host"
_COOKIE: Final = b"cookie"
_TE: Final = b"transfer-encoding"
_CL: Final = b"content-length"
_CONNECTION: Final = b"connection"
_UPGRADE: Final = b"upgrade"
_EXPECT: Final = b"expect"
_XFF: Final = b"x-forwarded-for"
_CRLF: Final = b"\r\n"


class ClientConnection(asyncio.Protocol, ClientSide):
    """One client connection: parses requests, runs their exchanges in order, keeps alive."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.plane = server.plane
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.lenient_version = False  # see _retry_version
        self.messages = 0  # requests begun on this connection
        self.peer = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.head_bytes = 0
        self.in_head = False
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.paused = 0
        self.deadline = 0.0
        self.deadline_kind = DEADLINE_NONE
        self.tunnel: Exchange | None = None
        # A chunked request whose first chunk line this read completed: its upstream side
        # starts once the whole read has parsed cleanly (see on_chunk_header).
        self.framed: Exchange | None = None
        self.pending_reject: Reject | None = None
        self.closed = False
        self.lingering = False
        self.write_paused = False
        self.corked: list[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode("latin-1") if peer else b"unknown"
        connections = self.server.connections
        connections.add(self)
        if len(connections) > self.plane.current.config.limits.max_connections:
            # Over the cap (nginx `worker_connections`, HAProxy `maxconn`): answer and close
            # rather than hold more sockets and memory; the open connections are not touched.
            # It still counts while it lingers, which is at most LINGER_SECONDS.
            self.server.connection_refused()
            self.reject(Reject(503, b"Service Unavailable: connection limit reached"))
            return
        self._set_deadline(DEADLINE_HEADER, self._timeouts().client_header)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connection_closed(self)
        active = self.active
        self.active = None
        if active is not None:
            active.client_lost()
        parsing = self.parsing
        if parsing is not None and parsing is not active:
            parsing.client_lost()
        while self.queue:
            self.queue.popleft().client_lost()

    def _timeouts(self) -> Timeouts:
        return self.plane.current.config.timeouts

    def _set_deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.loop.time() + seconds

    def _clear_deadline(self) -> None:
        self.deadline_kind = DEADLINE_NONE
        self.deadline = 0.0

    def is_idle(self) -> bool:
        return self.active is None and not self.in_head and self.parsing is None

    # -- writing and flow control ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        corked = self.corked
        if corked is not None:
            corked.append(data)
        elif not self.closed:
            assert self.transport is not None
            self.transport.write(data)

    def cork(self) -> None:
        """Collect writes until `uncork`: one upstream read becomes one client write (one
        syscall for head and body of a small response instead of several)."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        corked = self.corked
        if corked is None:
            return
        self.corked = None
        if corked and not self.closed:
            assert self.transport is not None
            self.transport.writelines(corked)

    def drop_held(self, first: bytes) -> bool:
        """Take back the held (corked) writes from `first`, the very object written, on;
        whether it was still held."""
        corked = self.corked
        if corked is None:
            return False
        for index, data in enumerate(corked):
            if data is first:
                del corked[index:]
                return True
        return False

    def close(self) -> None:
        self.uncork()
        if not self.closed:
            self.closed = True
            assert self.transport is not None
            self.transport.close()

    def abort(self) -> None:
        self.corked = None
        if not self.closed or self.lingering:
            self.closed = True
            self.lingering = False
            assert self.transport is not None
            self.transport.abort()

    def close_lingering(self) -> None:
        """Close after a reply while the client may still be sending (a body we refused, a
        head we stopped reading). Closing with unread input makes the kernel send a reset,
        which can destroy our reply in flight; so half-close, then read and discard for a
        moment first (RFC 9112 §9.6; nginx `lingering_close`)."""
        if self.closed:
            return
        self.uncork()
        assert self.transport is not None
        if not self.transport.can_write_eof():
            self.close()
            return
        self.closed = True
        self.lingering = True
        self.transport.write_eof()
        self.paused = 0
        self.transport.resume_reading()
        self._set_deadline(DEADLINE_LINGER, LINGER_SECONDS)

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            assert self.transport is not None
            self.transport.pause_reading()
        self.paused |= reason

    def unpause(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.closed:
            assert self.transport is not None
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True  # an upstream attached later starts paused too
        active = self.active
        if active is not None and active.upstream is not None:
            active.upstream.pause_reading()
        if self.deadline_kind == DEADLINE_NONE:
            self._set_deadline(DEADLINE_SEND, self._timeouts().idle)

    def resume_writing(self) -> None:
        self.write_paused = False
        active = self.active
        if active is not None and active.upstream is not None:
            active.upstream.resume_reading()
        if self.deadline_kind == DEADLINE_SEND:
            self._clear_deadline()

    # -- bytes in --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # discarded: see close_lingering
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.client_tunnel_data(data)
            return
        # Whether this read starts with a request line (nothing of its head was read before).
        at_head = self.parsing is None and not self.in_head
        messages = self.messages
        if self.parsing is None:
            self.head_bytes += len(data)
        elif self.deadline_kind == DEADLINE_BODY:
            self.deadline = self.loop.time() + self._timeouts().idle
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._start_framed()  # a request before the upgrade, read whole in this read
            self._upgrade_requested(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, Reject):
                self.reject(cause)
                self._start_framed()
            else:
                self._internal_error(cause or error)
            return
        except httptools.HttpParserError as error:
            rejection = _parser_rejection(error)
            if rejection.status != 505 or not at_head or self.messages != messages + 1:
                self.reject(rejection)
                self._start_framed()
                return
            retry = True  # outside this handler: its exception must not be the next one's cause
        except Exception as error:  # a bug of ours must not leave the connection wedged
            self._internal_error(error)
            return
        else:
            retry = False
        if retry:
            self._retry_version(data)
            return
        self._start_framed()
        if self.in_head and self.head_bytes > self._head_limit():
            self.reject(Reject(431, b"Request Header Fields Too Large"))

    def _start_framed(self) -> None:
        """The chunked request whose first chunk line this read completed starts its upstream
        side now that the read has parsed (see on_chunk_header) — also when a later request
        in the same read was refused or asked for an upgrade: its own body was fine."""
        framed = self.framed
        if framed is not None:
            self.framed = None
            if framed is self.active and not framed.response_done:
                framed.start_upstream()

    def _retry_version(self, data: bytes) -> None:
        """llhttp refuses an HTTP/1 minor version above 1 unless told to be lenient about the
        version, which costs every new connection if done up front; so a parser that meets one
        is replaced by a lenient one that parses this read again, and check_request_head
        decides (RFC 9110 §2.5: processed as 1.1). Only when the read holds all of that
        request so far and nothing before it, so no byte is parsed twice for an exchange."""
        if self.lenient_version:
            self.reject(Reject(505, b"HTTP Version Not Supported"))
            return
        self.lenient_version = True
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_version=True)
        self.in_head = False
        self.head_bytes = 0
        self.messages -= 1
        self.data_received(data)

    def _head_limit(self) -> int:
        limits = self.plane.current.config.limits
        return limits.max_header_bytes + limits.max_url_bytes

    def _internal_error(self, error: BaseException) -> None:
        log.error("internal error while serving %s", self.peer.decode(), exc_info=error)
        active = self.active
        if active is not None:
            active._drop_upstream()
        if active is None or not active.response_started:
            self.plane.outcomes.record_rejected(500)
            self.write(plain_response(500, b"Internal Server Error", close=True))
        self.abort() if active is not None and active.response_started else self.close()

    def reject(self, rejection: Reject) -> None:
        """Answer a request we will not forward, then close: framing can't be trusted."""
        self.in_head = False
        parsing = self.parsing
        if self.framed is parsing:
            self.framed = None  # its own body is what is refused
        self.parsing = None
        if parsing is not None and not parsing.request_done:
            # The body turned out malformed (e.g. a bad chunk size) after the head was routed.
            if parsing is self.active:
                parsing.abandon(rejection.status, rejection.message)
                return
            self.queue.remove(parsing)  # never started: nothing of it reached an upstream
        if self.active is not None:
            self.pending_reject = rejection
            self.pause(PAUSE_PIPELINE)
            return
        self.plane.outcomes.record_rejected(rejection.status)
        self.write(plain_response(rejection.status, rejection.message, close=True))
        self.close_lingering()

    # -- llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.messages += 1
        self.in_head = True
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        if self.active is None:
            self._set_deadline(DEADLINE_HEADER, self._timeouts().client_header)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.plane.current.config.limits.max_url_bytes:
            raise Reject(414, b"URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name, value))
        self.header_bytes += len(name) + len(value) + 4
        if (
            self.header_bytes > self.plane.current.config.limits.max_header_bytes
            or len(headers) > MAX_HEADER_FIELDS
        ):
            raise Reject(431, b"Request Header Fields Too Large")

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        exchange = self._route_request()
        self.parsing = exchange
        if self.active is None:
            self._activate(exchange)
        else:
            self.queue.append(exchange)
            self.pause(PAUSE_PIPELINE)

    def _activate(self, exchange: Exchange) -> None:
        self.active = exchange
        if exchange.expect_body and not exchange.request_done:
            self._set_deadline(DEADLINE_BODY, self._timeouts().idle)
        else:
            self._clear_deadline()
        exchange.start()

    def on_chunk_header(self) -> None:
        """A chunk-size line parsed. Until the first one has, a chunked request's head is not
        sent: a body bad from its first line must not cost a pooled upstream connection a
        head it will never see the end of (RFC 9112 §7.1). The head goes out once the read
        that completed that line has parsed cleanly, so a small body read with its head is
        checked whole first."""
        parsing = self.parsing
        if parsing is not None and not parsing.body_framed:
            parsing.body_framed = True
            if parsing is self.active:
                self.framed = parsing

    def on_body(self, body: bytes) -> None:
        parsing = self.parsing
        if parsing is not None:
            parsing.request_body(body)

    def on_message_complete(self) -> None:
        parsing = self.parsing
        if parsing is None:
            return
        if parsing.upgrade:
            # The rest of the stream belongs to the tunnel; keep `parsing` for
            # _upgrade_requested, which runs next.
            parsing.request_complete()
            return
        self.parsing = None
        if self.deadline_kind == DEADLINE_BODY:
            self._clear_deadline()
        parsing.request_complete()

    # -- routing ---------------------------------------------------------------------------

    def _route_request(self) -> Exchange:
        """Validate the head, pick route, version and instance; build the upstream head."""
        parser = self.parser
        runtime = self.plane.current
        url = self.url
        host: bytes | None = None
        hosts = 0
        cookie: bytes | None = None
        te: bytes | None = None
        content_length: bytes | None = None
        connection: list[bytes] | None = None
        upgrade: bytes | None = None
        expect: bytes | None = None
        xff: bytes | None = None
        suspects: list[bytes] | None = None
        lines: list[bytes] = []
        append = lines.append
        for name, value in self.headers:
            lname = name.lower()
            if lname == _HOST:
                host = value
                hosts += 1
            elif lname in REQUEST_DROP:
                if lname == _TE:
                    te = value if te is None else te + b", " + value  # one list (RFC 9110 §5.3)
                elif lname == _CL:
                    content_length = value
                elif lname == _CONNECTION:
                    connection = [value] if connection is None else [*connection, value]
                elif lname == _UPGRADE:
                    upgrade = value
                elif lname == _EXPECT:
                    expect = value
                elif lname == _XFF:
                    xff = value if xff is None else xff + b", " + value
                continue
            elif lname == _COOKIE:
                cookie = value if cookie is None else cookie + b"; " + value
            else:
                if (
                    len(lname) >= LOOKALIKE_MIN_LENGTH
                    and lname[0] in LOOKALIKE_EDGES
                    and lname[-1] in LOOKALIKE_EDGES
                ):
                    # Might read as a framing field elsewhere: check_request_head decides.
                    suspects = [lname] if suspects is None else [*suspects, lname]
                if b"_" in lname:
                    continue  # nginx `underscores_in_headers off`: X_Forwarded_For is not ours
            append(name + b": " + value + _CRLF)

        version = parser.get_http_version()
        method = parser.get_method()
        # Without an Upgrade field llhttp only tunnels CONNECT, which is refused anyway.
        tunnel = upgrade is not None and parser.should_upgrade()
        rejection = check_request_head(
            version,
            method,
            url,
            host,
            hosts,
            te,
            content_length,
            tunnel,
            runtime.config.limits.max_body_bytes,
            suspects,
        )
        if rejection is not None:
            raise Reject(*rejection)
        http11 = version != "1.0"  # accepted: 1.0, or 1.1 and up, processed as 1.1

        keep_alive = parser.should_keep_alive() and not self.plane.draining
        chunked = te is not None
        expect_body = chunked or content_length not in (None, b"0")
        # Not loop.time(): uvloop's clock has millisecond resolution, too coarse for latency
        # histograms; cool-downs use the same monotonic clock.
        started = monotonic()
        host_text = (host or b"").decode("latin-1")
        path = url.split(b"?", 1)[0].decode("latin-1")
        matched = runtime.table.match(host_text, path)
        route_rt = runtime.routes[matched.name] if matched is not None else None
        if route_rt is None:
            return Exchange(
                self,
                self.plane,
                runtime,
                method=method,
                http11=http11,
                keep_alive=keep_alive,
                started=started,
                expect_body=expect_body,
                route=None,
                local=(404, b"Not Found: no route"),
            )

        send_continue = False
        if expect is not None:
            if (failed := check_expect(expect)) is not None:
                raise Reject(*failed)
            send_continue = http11 and expect_body  # written when it is this request's turn

        version_name = self._choose_version(route_rt, host_text, cookie)
        pool = route_rt.canary if version_name == CANARY else route_rt.stable
        assert pool is not None
        instance = pool.pick(started)
        if instance is None:
            return Exchange(  # counted for the version chosen
                self,
                self.plane,
                runtime,
                method=method,
                http11=http11,
                keep_alive=keep_alive,
                started=started,
                expect_body=expect_body,
                route=route_rt,
                version=version_name,
                local=(503, b"Service Unavailable"),
            )

        upgrading = tunnel  # an Upgrade field llhttp will tunnel after
        return Exchange(
            self,
            self.plane,
            runtime,
            method=method,
            http11=http11,
            keep_alive=keep_alive,
            started=started,
            head=upstream_request_head(
                method,
                url,
                lines,
                connection,
                xff,
                self.peer,
                host,
                instance.authority,
                chunked,
                content_length,
                upgrade if upgrading else None,
            ),
            request_chunked=chunked,
            expect_body=expect_body,
            send_continue=send_continue,
            upgrade=upgrading,
            route=route_rt,
            version=version_name,
            pool=pool,
            instance=instance,
        )

    def _choose_version(self, route: RouteRuntime, host: str, cookie: bytes | None) -> str:
        del host
        if route.canary is None:
            return STABLE
        state = route.state
        force: str | None = None
        sticky: str | None = None
        cookies = cookie.decode("latin-1") if cookie is not None and route.uses_cookies else None
        if route.force_header is not None:
            force = self._header_text(route.force_header) or None  # empty: try the cookie
        if force is None and route.force_cookie is not None and cookies is not None:
            force = cookie_value(cookies, route.force_cookie)
        if route.sticky_header is not None:
            sticky = self._header_text(route.sticky_header) or None
        if sticky is None and route.sticky_cookie is not None and cookies is not None:
            sticky = cookie_value(cookies, route.sticky_cookie)
        return choose_version(
            route.split,
            weight_bp=state.weight_bp,
            aborted=state.aborted,
            force=force,
            sticky_key=sticky,
            rng=self.plane.rng,
        )

    def _header_text(self, lname: bytes) -> str | None:
        for name, value in self.headers:
            if len(name) == len(lname) and name.lower() == lname:
                return value.decode("latin-1")
        return None

    # -- upgrade tunnel --------------------------------------------------------------------

    def _upgrade_requested(self, tail: bytes) -> None:
        exchange = self.parsing
        if exchange is None or not exchange.upgrade or exchange.local is not None:
            # An upgrade we answered ourselves is never tunnelled, and the bytes after it are
            # not trusted as a next request: close once the reply is out.
            if exchange is not None and not exchange.response_done:
                exchange.keep_alive = False
            else:
                self.close()
            return
        self.pause(PAUSE_UPGRADE)
        exchange.tunnel_tail = tail

    def start_tunnel(self, exchange: Exchange) -> None:
        self.tunnel = exchange
        self.parsing = None
        self._clear_deadline()
        self.unpause(PAUSE_UPGRADE)

    # -- after a response ------------------------------------------------------------------

    def exchange_finished(self, exchange: Exchange) -> None:
        if self.active is not exchange:
            return
        if exchange.status == 101:
            return  # the connection is a tunnel now
        self.active = None
        if self.closed:
            return
        if not exchange.request_done:
            self.close_lingering()
            return
        if not exchange.keep_alive or self.plane.draining:
            self.close()
            return
        if self.pending_reject is not None and not self.queue:
            self.reject(self.pending_reject)
            return
        # The finished exchange's upstream may have left us paused; that is over now.
        self.unpause(PAUSE_BACKPRESSURE)
        if self.queue:
            following = self.queue.popleft()
            if not self.queue:
                self.unpause(PAUSE_PIPELINE)
            self._activate(following)
            return
        self._set_deadline(DEADLINE_IDLE, self._timeouts().idle)
        self.unpause(PAUSE_PIPELINE)

    def timed_out(self) -> None:
        kind = self.deadline_kind
        self._clear_deadline()
        if kind == DEADLINE_IDLE:
            self.close()
            return
        if kind in (DEADLINE_SEND, DEADLINE_LINGER):
            self.abort()  # the client stopped reading (nginx `send_timeout`), or lingered enough
            return
        active = self.active
        if active is not None and active.response_started:
            active._abort_both()
            return
        if active is not None:
            active.keep_alive = False
            active._drop_upstream()
            active._reply_error(408, b"Request Timeout")
            return
        self.plane.outcomes.record_rejected(408)
        self.write(plain_response(408, b"Request Timeout", close=True))
        self.close_lingering()


def _parser_rejection(error: Exception) -> Reject:
    text = str(error)
    if "HTTP version" in text:
        return Reject(505, b"HTTP Version Not Supported")
    return Reject(400, b"Bad Request")


class Server:
    """Owns the listener, the open client connections and the deadline sweep."""

    def __init__(self, plane: DataPlane, loop: asyncio.AbstractEventLoop) -> None:
        self.plane = plane
        self.loop = loop
        self.connections: set[ClientConnection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None
        self._refusals_unlogged = 0
        self._refusal_logged_at = -REFUSAL_LOG_SECONDS

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        """Listen; `reuse_port`: one of several worker processes on the same port, the kernel
        spreading new connections over them (SO_REUSEPORT)."""
        self._server = await self.loop.create_server(
            lambda: ClientConnection(self),
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=2048,
        )
        self._sweeper = self.loop.create_task(self._sweep_forever())
        # Through Any: uvloop's `sockets` is a list, not typeshed's tuple, and the compiled
        # module would check the declared type.
        listener: Any = self._server
        address = listener.sockets[0].getsockname()
        return str(address[0]), int(address[1])

    async def _sweep_forever(self) -> None:
        last_pool_sweep = 0.0
        while True:
            timeouts = self.plane.current.config.timeouts
            interval = min(0.5, max(0.02, min(timeouts.client_header, timeouts.idle) / 10))
            await asyncio.sleep(interval)
            now = self.loop.time()
            try:
                self.sweep(now)
                if now - last_pool_sweep >= 1.0:
                    last_pool_sweep = now
                    self._sweep_pools(monotonic() - timeouts.idle)
            except Exception:  # one bad connection must not stop every timeout for good
                log.exception("deadline sweep failed")

    def sweep(self, now: float) -> None:
        idle = self.plane.current.config.timeouts.idle
        for conn in list(self.connections):
            if conn.deadline and now >= conn.deadline:
                conn.timed_out()
            active = conn.active
            if active is None:
                continue
            if active.response_deadline and now >= active.response_deadline:
                active.response_timed_out()
            elif active.response_started and not active.response_done and not conn.write_paused:
                active.check_read_progress(now, idle)

    def _sweep_pools(self, cutoff: float) -> None:
        for instance in list(self.plane.instances.values()):
            instance.close_idle_older_than(cutoff)

    async def shutdown(self, drain_seconds: float) -> None:
        """Stop accepting, let in-flight exchanges finish (bounded), then close the rest."""
        self.plane.draining = True
        self._drained = asyncio.Event()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.is_idle():
                conn.close()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_seconds):
                    await self._drained.wait()
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.plane.close_idle()

    def connection_refused(self) -> None:
        """Say so in the log, but at most every REFUSAL_LOG_SECONDS: a flood of refused
        connections must not become a flood of log lines."""
        self._refusals_unlogged += 1
        now = self.loop.time()
        if now - self._refusal_logged_at < REFUSAL_LOG_SECONDS:
            return
        log.warning(
            "connection limit reached (limits.max_connections = %d): refused %d connection(s)",
            self.plane.current.config.limits.max_connections,
            self._refusals_unlogged,
        )
        self._refusal_logged_at = now
        self._refusals_unlogged = 0

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self._drained is not None and not self.connections:
            self._drained.set()
