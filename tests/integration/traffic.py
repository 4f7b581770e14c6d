"""Steady paced traffic for the integration tests: keep-alive clients, each pacing itself, that
record every answer (status, version, when) and every failed request, until told to finish."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
from proxy_process import open_session


@dataclass(frozen=True, slots=True)
class Seen:
    """One answered user request; times are wall clock (time.time), comparable with the
    proxy's event times on the same machine."""

    sent: float
    answered: float
    status: int
    version: str


@dataclass(slots=True)
class Traffic:
    """`clients` keep-alive clients (one connection each), each pacing itself to
    `rate / clients` requests per second, until `stop` is set."""

    url: str
    clients: int
    rate: float
    seen: list[Seen] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def finish(self) -> None:
        self.stop.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*self._tasks)

    async def _client(self, index: int) -> None:
        period = self.clients / self.rate
        async with open_session(limit=1) as session:
            due = time.monotonic() + index * period / self.clients  # spread the clients out
            n = 0
            while not self.stop.is_set():
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing, not waiting for a state
                due = max(due + period, time.monotonic() - period)  # no catch-up bursts
                n += 1
                sent = time.time()
                try:
                    async with session.get(f"{self.url}/load/{index}/{n}") as response:
                        await response.read()
                        status = response.status
                        version = response.headers.get("X-Version", "")
                except (aiohttp.ClientError, TimeoutError) as error:
                    self.failures.append(f"client {index} request {n}: {error!r}")
                    continue
                self.seen.append(Seen(sent, time.time(), status, version))

    def count(self, version: str) -> int:
        return sum(1 for s in self.seen if s.version == version)
