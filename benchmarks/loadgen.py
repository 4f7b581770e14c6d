"""An open-loop load generator: requests due at a fixed rate, whatever the responses do.

Request i is due at `start + i / rate`. A pacer hands due requests to a pool of keep-alive
connections; a request that finds every connection busy waits in a queue, and its latency is
counted from when it was due, not from when it was sent (no coordinated omission). The run
ends when `stop()` is called or at its time bound, whichever comes first. Loopback only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

CONNECT_TIMEOUT_SECONDS: Final = 2.0
RESPONSE_TIMEOUT_SECONDS: Final = 5.0
MAX_HEAD_BYTES: Final = 65_536
STATUS_FAILED: Final = 0  # no response: refused, reset, closed or timed out


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """One request: when it was due and answered (wall clock, seconds) and its status."""

    due: float
    done: float
    status: int  # STATUS_FAILED when no response came


class PacedLoad:
    """`rate` GETs of `path` per second to 127.0.0.1:`port` over up to `connections`."""

    def __init__(
        self, *, port: int, path: str, rate: float, connections: int, max_seconds: float
    ) -> None:
        self.port = port
        self.request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode("ascii")
        self.rate = rate
        self.connections = connections
        self.max_seconds = max_seconds
        self.outcomes: list[Outcome] = []
        self.started = 0.0  # wall clock of request 0
        self.late = 0  # requests still queued when the run ended (never sent)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> list[Outcome]:
        queue: asyncio.Queue[float] = asyncio.Queue()
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.connections)]
        try:
            await self._pace(queue)
            # Let what is queued and in flight finish, boundedly.
            async with asyncio.timeout(RESPONSE_TIMEOUT_SECONDS + CONNECT_TIMEOUT_SECONDS):
                await queue.join()
        except TimeoutError:
            pass
        finally:
            self.late = queue.qsize()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return self.outcomes

    async def _pace(self, queue: asyncio.Queue[float]) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate
        start_mono = loop.time()
        self.started = time.time()
        offset = self.started - start_mono  # wall = monotonic + offset, for the whole run
        sent = 0
        while not self._stopping.is_set():
            now = loop.time()
            if now - start_mono >= self.max_seconds:
                return
            due_count = int((now - start_mono) * self.rate) + 1
            for index in range(sent, due_count):
                queue.put_nowait(start_mono + index * interval + offset)
            sent = max(sent, due_count)
            next_due = start_mono + sent * interval
            try:
                async with asyncio.timeout(max(0.0, next_due - loop.time())):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    async def _worker(self, queue: asyncio.Queue[float]) -> None:
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                due = await queue.get()
                try:
                    if connection is None:
                        connection = await self._connect()
                    status, keep = await self._exchange(*connection)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                    status, keep = STATUS_FAILED, False
                self.outcomes.append(Outcome(due=due, done=time.time(), status=status))
                if not keep and connection is not None:
                    connection[1].close()
                    connection = None
                queue.task_done()
        finally:
            if connection is not None:
                connection[1].close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            return await asyncio.open_connection("127.0.0.1", self.port)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, bool]:
        """Send one request and read its whole response: (status, connection reusable)."""
        writer.write(self.request)
        async with asyncio.timeout(RESPONSE_TIMEOUT_SECONDS):
            head = await reader.readuntil(b"\r\n\r\n")
            status, length, chunked, close = parse_head(head)
            if chunked:
                await _read_chunked(reader)
            elif length is None:
                raise ValueError("response without Content-Length or chunked framing")
            else:
                await reader.readexactly(length)
        return status, not close


def parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """(status, Content-Length, chunked, Connection: close) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0]!r}")
    length: int | None = None
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            close = "close" in value
    return int(parts[1]), length, chunked, close


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the end
                pass
            return
        await reader.readexactly(size + 2)
