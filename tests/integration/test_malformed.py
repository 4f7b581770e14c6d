"""Malformed and hostile requests end to end on sockets (docs/operations.md, Responses the
proxy makes itself): a few of each kind, and those that depend on the kernel (resets of a
client still sending, the deadline sweep on a real clock). The full tables run on the
transport-free harness in tests/unit/test_server.py.

Every rejected request must get the expected proxy-made status with a short plain-text body
(never a traceback), `Connection: close` and then EOF, and must never reach an upstream: the
recording upstream below sees zero connections. The proxy runs in-process; the client is a raw
socket that sends exact bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from harness import UPSTREAM_OK, chunked_payload, complete_request_length, status_of
from hostile import (
    BAD_CODING,
    BAD_REQUEST,
    CHUNK_CASES,
    CHUNKED,
    CONTROL,
    HOST,
    LAST,
    LIMITS,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_URL_BYTES,
    REJECTED_CASES,
    SMUGGLED,
    SMUGGLING_CASES,
    check_proxy_made,
    get,
    post,
)

from proxy.control.holder import RuntimeHolder
from proxy.core.config import parse_config
from proxy.dataplane.server import Server

LOCALHOST = "127.0.0.1"
CLIENT_HEADER_SECONDS = 1.0
READ_TIMEOUT = 5.0  # longer than every proxy timeout: a read that hits it means a hang


# -- the recording upstream ----------------------------------------------------------------


@dataclass
class RecordingUpstream:
    """Records every connection and byte; answers each complete request with a small 200."""

    port: int = 0
    connections: int = 0
    ended: int = 0  # connections the proxy closed or reset
    received: list[bytearray] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def data(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.received)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        record = bytearray()
        self.received.append(record)
        pending = b""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                record += data
                pending += data
                while (length := complete_request_length(pending)) is not None:
                    pending = pending[length:]
                    writer.write(UPSTREAM_OK)
                    await writer.drain()
        self.ended += 1  # EOF or reset: the proxy let go of this connection
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.server.wait_closed()


# -- the proxy under test ------------------------------------------------------------------


@dataclass
class Env:
    port: int
    holder: RuntimeHolder
    server: Server
    upstream: RecordingUpstream
    loop_errors: list[dict[str, Any]]
    log_errors: list[logging.LogRecord]

    def assert_no_internal_errors(self) -> None:
        """Client garbage must never hit a bug: no loop error, no logged error, no 500."""
        assert not self.loop_errors, f"event loop errors: {self.loop_errors!r}"
        logged = [record.getMessage() for record in self.log_errors]
        assert not logged, f"errors logged: {logged!r}"
        assert self.holder.outcomes.rejected[500] == 0, self.holder.outcomes


class _ErrorRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _config(upstream_port: int, timeouts: dict[str, str]) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "timeouts": timeouts,
        "limits": LIMITS,
        "routes": [
            {"name": "shop", "stable": {"upstreams": [f"http://127.0.0.1:{upstream_port}"]}}
        ],
    }


@contextlib.asynccontextmanager
async def running_proxy(timeouts: dict[str, str]) -> AsyncIterator[Env]:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    previous_handler = loop.get_exception_handler()

    def record_error(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        loop_errors.append(context)

    loop.set_exception_handler(record_error)
    recorder = _ErrorRecorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    upstream = RecordingUpstream()
    await upstream.start()
    holder = RuntimeHolder(parse_config(_config(upstream.port, timeouts), base_dir="/tmp"))
    server = Server(holder.plane, loop)
    _, port = await server.start(LOCALHOST, 0)
    try:
        environment = Env(port, holder, server, upstream, loop_errors, recorder.records)
        yield environment
    finally:
        await server.shutdown(1.0)
        await upstream.stop()
        loop.set_exception_handler(previous_handler)
        root.removeHandler(recorder)
    # A traceback in the log (or a 500) for client garbage is a bug even if the reply looked right.
    environment.assert_no_internal_errors()


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    timeouts = {"client_header": "1s", "idle": "2s", "response_header": "2s", "connect": "1s"}
    async with running_proxy(timeouts) as environment:
        yield environment


# -- the raw client ------------------------------------------------------------------------


@dataclass
class Reply:
    data: bytes
    eof: bool  # the proxy closed the connection cleanly
    reset: bool  # ... or reset it
    elapsed: float

    @property
    def status(self) -> int | None:
        return status_of(self.data)


async def converse(
    port: int,
    segments: Sequence[bytes],
    *,
    delay: float = 0.0,
    read_seconds: float = READ_TIMEOUT,
) -> Reply:
    """Send `segments` (stopping early once the proxy answers), then read until EOF or timeout."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    got = bytearray()

    async def read_all() -> bool:
        while chunk := await reader.read(65536):
            got.extend(chunk)
        return True

    reader_task = asyncio.create_task(read_all())
    try:
        for index, segment in enumerate(segments):
            if got or reader_task.done():
                break
            writer.write(segment)
            await writer.drain()
            if delay and index < len(segments) - 1:
                await asyncio.sleep(delay)
    except ConnectionError:
        pass
    eof = reset = False
    try:
        async with asyncio.timeout(read_seconds):
            eof = await reader_task
    except TimeoutError:
        pass
    except ConnectionError:
        reset = True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Reply(bytes(got), eof, reset, loop.time() - started)


async def assert_control(env: Env) -> None:
    reply = await converse(env.port, [CONTROL])
    assert reply.status == 200, f"valid control request failed: {reply.data!r}"
    assert reply.data.endswith(b"ok\n")


def assert_proxy_made(reply: Reply, statuses: Collection[int], *, allow_reset: bool = False) -> int:
    """One short plain-text proxy response with an expected status, then the socket closed.

    `allow_reset` is for clients still sending when the proxy gives up on them: closing with
    their unread bytes queued makes the kernel send RST instead of FIN (no lingering close),
    so only a complete response followed by EOF *or* reset can be required there.
    """
    assert reply.data, f"no response at all (eof={reply.eof}, reset={reply.reset})"
    status = check_proxy_made(reply.data, statuses)
    assert reply.eof or (allow_reset and reply.reset), (
        f"connection not closed cleanly after {reply.data!r} "
        f"(eof={reply.eof}, reset={reply.reset}, {reply.elapsed:.2f}s)"
    )
    return status


async def assert_upstream_untouched(env: Env) -> None:
    await asyncio.sleep(0.05)  # a connect the proxy started would have landed by now
    assert env.upstream.connections == 0, f"upstream was contacted: {env.upstream.data!r}"
    assert env.upstream.data == b""


async def assert_no_upstream_connection_kept(env: Env) -> None:
    """Once settled, the proxy has let go of every upstream connection (none is kept after a
    partial body)."""
    await asyncio.sleep(0.05)
    upstream = env.upstream
    assert upstream.ended == upstream.connections, "upstream connection with a partial body kept"


async def assert_rejected(
    env: Env, request: bytes | Sequence[bytes], statuses: Collection[int]
) -> Reply:
    segments = [request] if isinstance(request, bytes) else request
    reply = await converse(env.port, segments)
    status = assert_proxy_made(reply, statuses)
    await assert_upstream_untouched(env)
    assert env.holder.outcomes.rejected[status] >= 1, env.holder.outcomes
    await assert_control(env)
    return reply


# -- cases ---------------------------------------------------------------------------------


END_TO_END = {"A1-cl-then-te", "A3-obs-fold", "A11-bare-lf", "B2-absolute-form", "B3-connect"}


async def test_control_request_is_forwarded(env: Env) -> None:
    reply = await converse(env.port, [CONTROL])
    assert reply.status == 200, reply.data
    assert reply.eof
    assert env.upstream.connections == 1
    assert env.upstream.data.startswith(b"GET /control HTTP/1.1\r\n")
    assert env.holder.outcomes.requests[("shop", "stable", 200)] == 1


@pytest.mark.parametrize(
    ("request_bytes", "statuses"), [case for case in REJECTED_CASES if case.id in END_TO_END]
)
async def test_rejected_before_upstream(
    env: Env, request_bytes: bytes, statuses: frozenset[int]
) -> None:
    await assert_rejected(env, request_bytes, statuses)


# -- A6: chunk-size abuse ------------------------------------------------------------------


@pytest.mark.parametrize("body", [case for case in CHUNK_CASES if case.id == "A6-overflow"])
@pytest.mark.parametrize("late", [False, True], ids=["with-head", "after-upstream-connected"])
async def test_invalid_chunk_size(env: Env, body: bytes, late: bool) -> None:
    """The head is routed (and may be forwarded) before the bad chunk shows up."""
    segments = [post(CHUNKED), body] if late else [post(CHUNKED, body=body)]
    reply = await converse(env.port, segments, delay=0.05)
    print(f"A6 {body!r}: proxy replied {reply.data!r}; upstream got {env.upstream.data!r}")
    assert reply.eof or reply.reset, "connection left open"
    if reply.data:
        assert_proxy_made(reply, BAD_REQUEST)
        assert env.holder.outcomes.rejected[400] >= 1, env.holder.outcomes
    await assert_no_upstream_connection_kept(env)
    for record in env.upstream.received:
        data = bytes(record)
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            _, complete = chunked_payload(data, head_end + 4)
            assert not complete, f"upstream got a complete chunked body: {data!r}"
    await assert_control(env)


# -- A7: pipelined smuggling ---------------------------------------------------------------


@pytest.mark.parametrize("payload", [case for case in SMUGGLING_CASES if case.id == "A7-cl-te"])
async def test_pipelined_smuggling(env: Env, payload: bytes) -> None:
    reply = await assert_rejected(env, payload, BAD_CODING)
    assert reply.data.count(b"HTTP/1.1 ") == 1
    assert b"/admin" not in env.upstream.data


# -- C1: a huge header dribbled in small segments ------------------------------------------


async def test_header_value_in_small_segments(env: Env) -> None:
    head = b"GET / HTTP/1.1\r\n" + HOST + b"X-Huge: "
    value = b"v" * (MAX_HEADER_BYTES + MAX_URL_BYTES + 4096)
    stream = head + value + b"\r\n\r\n"
    segments = [stream[i : i + 100] for i in range(0, len(stream), 100)]
    reply = await converse(env.port, segments, delay=0.0005)
    status = assert_proxy_made(reply, {431}, allow_reset=True)
    await assert_upstream_untouched(env)
    assert env.holder.outcomes.rejected[status] >= 1
    await assert_control(env)


# -- C3: body size ----------------------------------------------------------------------


async def test_chunked_body_growing_past_limit(env: Env) -> None:
    chunk_size = 200
    head = post(CHUNKED)
    chunks = [b"%x\r\n" % chunk_size + b"c" * chunk_size + b"\r\n" for _ in range(12)]
    reply = await converse(env.port, [head, *chunks, LAST], delay=0.02)
    print(f"C3: proxy replied {reply.data!r}; upstream got {len(env.upstream.data)} bytes")
    if reply.data:
        assert_proxy_made(reply, {413}, allow_reset=True)
        outcomes = env.holder.outcomes
        assert outcomes.rejected[413] + outcomes.requests[("shop", "stable", 413)] >= 1, outcomes
    else:
        assert reply.eof or reply.reset, "connection neither answered nor closed"
    await assert_no_upstream_connection_kept(env)
    for record in env.upstream.received:
        data = bytes(record)
        head_end = data.find(b"\r\n\r\n")
        assert head_end >= 0
        payload, complete = chunked_payload(data, head_end + 4)
        assert payload <= MAX_BODY_BYTES + chunk_size, payload
        assert not complete, "upstream got a complete over-limit body"
    await assert_control(env)


# -- D1: slow clients -------------------------------------------------------------------


async def test_silent_client_closed_at_header_deadline(env: Env) -> None:
    reply = await converse(env.port, [])
    assert reply.eof or reply.reset, f"still open after {reply.elapsed:.2f}s"
    # Generous upper bound (shared CI machines): it only shows the deadline closed it.
    assert CLIENT_HEADER_SECONDS * 0.8 <= reply.elapsed <= CLIENT_HEADER_SECONDS + 3, reply.elapsed
    if reply.data:
        assert_proxy_made(reply, {408})
    await assert_upstream_untouched(env)


# -- Framing classes an outside smuggling corpus found --------------------------------------
#
# Each class is covered for the kind of bug, not for the corpus's exact bytes.

# 1. A field name that looks like Content-Length or Transfer-Encoding (underscores, repeated
# dashes, other separators) is read as the real one by a hop that maps `_` to `-` (CGI, nginx
# with `underscores_in_headers on`) or folds separators; dropping it would let the body parse
# as a second request here and as part of one request there.
LOOKALIKE_NAMES = [
    b"Content_Length",
    b"content_length",
    b"CONTENT_LENGTH",
    b"Content--Length",
    b"Content.Length",
    b"content~length",
    b"ContentLength",
    b"_Content-Length",
    b"Content-Length_",
    b"Content-_Length",
    b"Transfer_Encoding",
    b"Transfer--Encoding",
    b"transfer.encoding",
    b"TransferEncoding",
    b"Transfer-Encoding-",
]


@pytest.mark.parametrize("name", LOOKALIKE_NAMES, ids=[n.decode() for n in LOOKALIKE_NAMES])
async def test_framing_header_lookalike_is_rejected(env: Env, name: bytes) -> None:
    value = b"chunked" if b"ncoding" in name.lower() else b"%d" % len(SMUGGLED)
    body = (
        b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n" + LAST if value == b"chunked" else SMUGGLED
    )
    await assert_rejected(env, post(name + b": " + value + b"\r\n", body=body), BAD_REQUEST)
    assert b"/admin" not in env.upstream.data


@pytest.mark.parametrize(
    "name", [b"X_Content_Type", b"Content_Type", b"X-Content-Length", b"Content-Lengths"]
)
async def test_other_names_are_not_lookalikes(env: Env, name: bytes) -> None:
    reply = await converse(env.port, [get(b"/n", name + b": 1\r\n", b"Connection: close\r\n")])
    assert reply.status == 200, reply.data


# 2. Transfer-Encoding split over two fields is one list (RFC 9110 §5.3): it gets exactly what
# the same list in one field gets, and is never forwarded with a coding dropped.
SPLIT_CODINGS = [
    pytest.param([b"gzip", b"chunked"], id="gzip+chunked"),
    pytest.param([b"identity", b"chunked"], id="identity+chunked"),
    pytest.param([b"chunked", b"chunked"], id="chunked+chunked"),
    pytest.param([b"chunked", b"gzip"], id="chunked+gzip"),
    pytest.param([b"gzip, deflate", b"chunked"], id="list+chunked"),
]


@pytest.mark.parametrize("codings", SPLIT_CODINGS)
async def test_transfer_encoding_over_two_fields_is_one_list(
    env: Env, codings: list[bytes]
) -> None:
    joined = await converse(
        env.port, [post(b"Transfer-Encoding: " + b", ".join(codings) + b"\r\n", body=LAST)]
    )
    split = await converse(
        env.port, [post(*(b"Transfer-Encoding: " + c + b"\r\n" for c in codings), body=LAST)]
    )
    assert_proxy_made(joined, BAD_CODING)
    assert_proxy_made(split, BAD_CODING)
    await assert_upstream_untouched(env)
    assert split.status == joined.status, (split.data, joined.data)


# 3. A chunked request's head waits for its first chunk line (and for the rest of the read that
# carried it): a pooled upstream connection must never get a head whose body is bad from the
# first line, nor lose its place in the pool for it.
FIRST_CHUNK_LINES = [
    *CHUNK_CASES,
    pytest.param(b"zz\r\nZ\r\n" + LAST, id="bad-hex"),
    pytest.param(b"1\rZ\r\n" + LAST, id="bare-cr"),
    pytest.param(b"1;a b\r\nZ\r\n" + LAST, id="bad-extension"),
    pytest.param(b"1;\x00\r\nZ\r\n" + LAST, id="nul-in-extension"),
    pytest.param(b"\r\n" + LAST, id="empty-line"),
    pytest.param(b"1 \r\nZ\r\n" + LAST, id="space-after-size"),
]


@pytest.mark.parametrize("body", FIRST_CHUNK_LINES)
@pytest.mark.parametrize("late", [False, True], ids=["with-head", "after-head"])
async def test_bad_first_chunk_never_reaches_a_pooled_upstream(
    env: Env, body: bytes, late: bool
) -> None:
    await assert_control(env)  # leaves one idle upstream connection in the pool
    before = env.upstream.data
    segments = [post(CHUNKED), body] if late else [post(CHUNKED, body=body)]
    reply = await converse(env.port, segments, delay=0.05)
    assert_proxy_made(reply, BAD_REQUEST)
    await asyncio.sleep(0.05)
    assert env.upstream.data == before, f"upstream got {env.upstream.data[len(before) :]!r}"
    await assert_control(env)
    assert env.upstream.connections == 1, "the pooled upstream connection was not kept"
    assert env.upstream.ended == 0


async def test_a_chunk_error_late_in_a_stream_closes_the_upstream_mid_body(env: Env) -> None:
    chunks = [b"10\r\n" + b"c" * 16 + b"\r\n" for _ in range(4)]
    reply = await converse(env.port, [post(CHUNKED), *chunks, b"zz\r\n" + LAST], delay=0.05)
    assert reply.eof or reply.reset, "connection left open"
    if reply.data:
        assert_proxy_made(reply, BAD_REQUEST, allow_reset=True)
    await assert_no_upstream_connection_kept(env)
    (record,) = env.upstream.received
    data = bytes(record)
    assert data.startswith(b"POST / HTTP/1.1\r\n"), data
    payload, complete = chunked_payload(data, data.find(b"\r\n\r\n") + 4)
    assert payload > 0
    assert not complete, f"upstream got a complete chunked body: {data!r}"
    await assert_control(env)


# 6. Whitespace after a field value is not part of it (RFC 9110 §5.5), and a higher HTTP/1
# minor version is processed as 1.1 (RFC 9110 §2.5). (A tab after `chunked` is refused by
# llhttp itself, with a 400: see A3-tab-after-value.)
@pytest.mark.parametrize("value", [b"chunked ", b"chunked  ", b"Chunked ", b" chunked "])
async def test_chunked_with_trailing_whitespace_is_forwarded(env: Env, value: bytes) -> None:
    request = post(
        b"Transfer-Encoding: " + value + b"\r\n",
        b"Connection: close\r\n",
        body=b"3\r\nabc\r\n" + LAST,
    )
    reply = await converse(env.port, [request])
    assert reply.status == 200, reply.data
    (record,) = env.upstream.received
    assert b"Transfer-Encoding: chunked\r\n" in record
    assert bytes(record).endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), bytes(record)


def status_lines(data: bytes) -> list[int]:
    """The statuses of the responses in `data` (their short bodies hold no status line)."""
    return [int(line.split(b" ")[1]) for line in data.split(b"\n") if line[:9] == b"HTTP/1.1 "]


@pytest.mark.parametrize("minor", [b"2", b"9"])
async def test_a_higher_http1_minor_version_is_processed_as_1_1(env: Env, minor: bytes) -> None:
    reply = await converse(env.port, [get(b"/v", version=b"1." + minor) + CONTROL])
    assert status_lines(reply.data) == [200, 200], reply.data  # kept alive, as 1.1 is by default
    assert env.upstream.data.startswith(b"GET /v HTTP/1.1\r\n"), env.upstream.data


async def test_a_higher_minor_version_behind_another_request_in_the_same_read_is_not_replayed(
    env: Env,
) -> None:
    """The parser is made lenient about versions by parsing the read again, which is only
    safe when the request is the first of the read: behind another one it stays a 505, and
    the one before it reaches the upstream once."""
    reply = await converse(env.port, [get(b"/first") + get(b"/second", version=b"1.2")])
    assert status_lines(reply.data) == [200, 505], reply.data
    assert env.upstream.data.count(b"GET /first ") == 1, env.upstream.data
    assert b"/second" not in env.upstream.data
