"""Upstream side of the data plane: pooled keep-alive connections per instance, round-robin
over a version's instances with a cool-down for instances that refuse connections, and the
llhttp response Protocol that feeds an exchange.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import Final, Protocol, cast

import httptools

from proxy.core.config import Upstream
from proxy.core.framing import MAX_HEADER_FIELDS

log = logging.getLogger("canary_proxy")

# An instance that refused a connection is skipped for this long (nginx's `fail_timeout` idea,
# shorter: a canary restarting should get traffic back quickly).
COOL_DOWN_SECONDS: Final = 2.0
# Idle keep-alive connections kept per instance; more are closed on release.
MAX_IDLE_PER_INSTANCE: Final = 256


class ResponseListener(Protocol):
    """What an upstream connection reports to the exchange it currently serves."""

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def upstream_body(self, chunk: bytes) -> None: ...
    def upstream_complete(self) -> bool: ...
    def upstream_upgraded(self, tail: bytes) -> None: ...
    def upstream_tunnel_data(self, data: bytes) -> None: ...
    def batch_begin(self) -> None: ...
    def batch_end(self) -> None: ...
    def upstream_failed(self, kind: str, got_response: bool) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class _HeadResponseDone(Exception):
    """Raised from the parser callback to stop it after the head of a body-less response.

    llhttp (through httptools) cannot be told that a response answers a HEAD request, so it
    would wait for a body that never comes; we stop parsing ourselves (RFC 9112 §6.3 rule 1).
    """


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the response head is over `max_response_header_bytes`
    or MAX_HEADER_FIELDS (nginx: "upstream sent too big header", a 502)."""


class Instance:
    """One upstream instance: its idle connection pool and its cool-down."""

    __slots__ = ("authority", "down_until", "host", "idle", "port", "retired", "url")

    def __init__(self, upstream: Upstream) -> None:
        self.url = upstream.url
        self.host = upstream.host
        self.port = upstream.port
        # The Host an HTTP/1.0 client without one gets (RFC 9112 §3.2: 1.1 requires Host).
        self.authority = (
            upstream.host if upstream.port == 80 else f"{upstream.host}:{upstream.port}"
        ).encode("idna")
        self.idle: list[UpstreamConnection] = []
        self.down_until = 0.0
        self.retired = False  # no longer in the config: connections close after their exchange

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def put_idle(self, conn: UpstreamConnection, now: float) -> None:
        if self.retired or len(self.idle) >= MAX_IDLE_PER_INSTANCE:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def close_idle_older_than(self, cutoff: float) -> None:
        keep = []
        for conn in self.idle:
            if conn.closed:
                continue
            if conn.idle_since < cutoff:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep

    def retire(self) -> None:
        self.retired = True
        self.close_all_idle()

    def close_all_idle(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle = []


class VersionPool:
    """Round-robin over a version's instances, skipping those in their cool-down."""

    __slots__ = ("_next", "instances")

    def __init__(self, instances: tuple[Instance, ...]) -> None:
        self.instances = instances
        self._next = 0

    def pick(self, now: float) -> Instance | None:
        instances = self.instances
        count = len(instances)
        start = self._next
        for offset in range(count):
            instance = instances[(start + offset) % count]
            if instance.down_until <= now:
                self._next = (start + offset + 1) % count
                return instance
        return None


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream instance; serves one exchange at a time."""

    __slots__ = (
        "_headers",
        "_parser",
        "_tunnel",
        "closed",
        "exchange",
        "expect_no_body",
        "got_response",
        "head_bytes",
        "head_limit",
        "idle_since",
        "in_head",
        "instance",
        "raw_head_bytes",
        "reads",
        "release",
        "stray",
        "transport",
        "until_close",
    )

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.transport: asyncio.Transport | None = None
        self.exchange: ResponseListener | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._tunnel = False
        self.closed = False
        self.expect_no_body = False
        self.reads = 0  # bumped per read; the sweep uses it as a between-reads timer
        # After a response ends: None while it has not, else whether to pool the connection
        # (decided once the whole read is parsed: see _settle).
        self.release: bool | None = None
        self.stray = False  # bytes arrived after the response ended
        self.got_response = False
        self.until_close = False
        self.idle_since = 0.0
        # The response head being parsed: its fields as llhttp reports them, and the raw bytes
        # read while it is incomplete (llhttp buffers a partial field; a long status line is
        # not buffered, and counts here once it spans reads).
        self.in_head = False
        self.head_bytes = 0
        self.raw_head_bytes = 0
        self.head_limit = 0

    # -- lifecycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is None:
            return
        if self.until_close and exc is None:
            # A response with neither Content-Length nor chunking ends when the connection
            # does (RFC 9112 §6.3 rule 8); llhttp has no end-of-input call to say so.
            self._complete(False)
            self._settle()
            return
        self.exchange = None
        exchange.upstream_failed("reset", self.got_response)

    def bind(self, exchange: ResponseListener, *, no_body: bool, head_limit: int) -> None:
        self.exchange = exchange
        self.expect_no_body = no_body
        self.head_limit = head_limit
        self.raw_head_bytes = 0
        self.got_response = False
        self.until_close = False
        self.release = None
        self.stray = False

    def close(self) -> None:
        """Close without reporting to the exchange (it already knows)."""
        self.exchange = None
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.exchange = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    # -- flow control ----------------------------------------------------------------------

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_resume_writing()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- bytes in --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle pooled connection: the upstream broke framing; drop it.
            self.abort()
            return
        self.reads += 1
        if self._tunnel:
            exchange.upstream_tunnel_data(data)
            return
        self.got_response = True
        exchange.batch_begin()
        try:
            self._parser.feed_data(data)
            if self.in_head:  # a head still incomplete after this read
                self.raw_head_bytes += len(data)
                if self.raw_head_bytes > self.head_limit:
                    self._fail("protocol")
        except httptools.HttpParserUpgrade as upgrade:
            self._tunnel = True
            if self.exchange is not None:
                self.exchange.upstream_upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, _HeadResponseDone):
                self._finish_head_response(data)
            elif isinstance(error.__context__, _HeadTooLarge):
                log.warning(
                    "upstream %s sent a response head over %d bytes or %d fields",
                    self.instance.url,
                    self.head_limit,
                    MAX_HEADER_FIELDS,
                )
                self._fail("protocol")
            else:
                log.error("internal error on an upstream response", exc_info=error.__context__)
                self._fail("protocol")
        except httptools.HttpParserError:
            if self.release is None:
                self._fail("protocol")
            # else: garbage after a complete response; _settle closes the connection
        finally:
            exchange.batch_end()
        self._settle()

    def _finish_head_response(self, data: bytes) -> None:
        # The parser is dead after we stopped it; a fresh one serves the next response. Reuse
        # the connection only if nothing followed the head in this read.
        reusable = self._parser.should_keep_alive() and data.endswith(b"\r\n\r\n")
        self._parser = httptools.HttpResponseParser(self)
        self._complete(reusable)

    def _fail(self, kind: str) -> None:
        exchange = self.exchange
        self.abort()
        if exchange is not None:
            exchange.upstream_failed(kind, True)

    # -- llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.release is not None:
            self.stray = True  # a second message in a read meant for one: never pool this
        self.in_head = True
        self.head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer field (llhttp reports them here too): not forwarded
        headers = self._headers
        headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.head_limit or len(headers) > MAX_HEADER_FIELDS:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.raw_head_bytes = 0
        headers = self._headers
        self._headers = []
        status = self._parser.get_status_code()
        exchange = self.exchange
        if exchange is None:
            return
        exchange.upstream_head(status, headers)
        if self.expect_no_body and status >= 200:
            raise _HeadResponseDone

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200 or self._tunnel:
            return  # interim response (RFC 9110 §15.2): the final one follows
        self._complete(self._parser.should_keep_alive())

    def _complete(self, reusable: bool) -> None:
        exchange = self.exchange
        self.exchange = None
        wanted = exchange.upstream_complete() if exchange is not None else False
        self.release = reusable and wanted

    def _settle(self) -> None:
        """Pool or close the connection once its last response is over and the read that
        carried it is fully parsed. Bytes beyond the response (a wrong Content-Length, a
        body on a 204, injected headers) would otherwise be read as the next client's
        response, so such a connection is closed, as is one still flushing our writes."""
        release = self.release
        if release is None:
            return
        self.release = None
        transport = self.transport
        if (
            release
            and not self.stray
            and not self.closed
            and transport is not None
            and transport.get_write_buffer_size() == 0
        ):
            self.instance.put_idle(self, monotonic())
        else:
            self.close()
