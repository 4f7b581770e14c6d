"""A switchable fake canary for the guard scenario: healthy, then 500 from a known instant.

`python benchmarks/fake_canary.py PORT` serves 127.0.0.1:PORT. Every request is answered
200 with the upstream's small body, on a kept-alive connection, until `GET /__bench/fail`;
from then on every request is answered 500 (still kept alive) until `GET /__bench/heal`.
A switch answers 200 with the wall-clock instant (`time.time()`, seconds) at which it took
effect: the harness takes that as T0, on the clock the proxy stamps its audit events with.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Final

from scenarios import CANARY_CONTROL_PREFIX, SMALL_BODY

HEALTHY_BODY: Final = SMALL_BODY.encode("ascii")  # what the stable upstream answers too
FAILING_BODY: Final = b"canary failure\n"
CONTROL_PREFIX: Final = CANARY_CONTROL_PREFIX.encode("ascii")
MAX_HEAD_BYTES: Final = 65_536


class Switch:
    """Whether the canary fails, shared by every connection."""

    failing = False


def response(status: int, reason: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode("ascii") + body


HEALTHY: Final = response(200, "OK", HEALTHY_BODY)
FAILING: Final = response(500, "Internal Server Error", FAILING_BODY)


class Canary(asyncio.Protocol):
    """HTTP/1.1 keep-alive; a request body (Content-Length only) is read and ignored."""

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self.buffer = b""
        self.skip = 0  # body bytes of the current request still to discard
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            if self.skip:
                dropped = min(self.skip, len(self.buffer))
                self.buffer, self.skip = self.buffer[dropped:], self.skip - dropped
                if self.skip:
                    return
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD_BYTES:
                    self.transport.close()
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self.skip = _content_length(head)
            self.transport.write(self.answer(head))

    def answer(self, head: bytes) -> bytes:
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        target = request_line[1] if len(request_line) > 1 else b"/"
        if not target.startswith(CONTROL_PREFIX):
            return FAILING if self.switch.failing else HEALTHY
        verb = target[len(CONTROL_PREFIX) :]
        if verb not in (b"fail", b"heal"):
            return response(404, "Not Found", b"unknown switch\n")
        self.switch.failing = verb == b"fail"
        return response(200, "OK", f"{time.time():.6f}".encode("ascii"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip() or b"0")
    return 0


async def serve(port: int) -> None:
    switch = Switch()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Canary(switch), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: fake_canary.py PORT", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
