"""A TCP relay between a replica and Redis that can go silent the way a network does: no FIN,
no RST, the bytes simply stop. `freeze_subscriptions` silences the connections that subscribed
(a pub/sub link gone dead behind a load balancer) while new and other connections work;
`partition` holds every byte both ways, on old and new connections, until `heal`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fakes import HOST


@dataclass(eq=False)
class _Link:
    subscribed: bool = False
    frozen: bool = False
    armed: bool = False  # partition once the answer to the marked command has gone through


@dataclass(eq=False)
class Relay:
    target_port: int
    port: int = 0
    partitioned: bool = False
    _marker: bytes | None = None
    _links: list[_Link] = field(default_factory=list)
    _healed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def freeze_subscriptions(self) -> None:
        for link in self._links:
            link.frozen = link.frozen or link.subscribed

    def partition(self) -> None:
        self.partitioned = True
        self._healed.clear()

    def partition_after_answer_to(self, command: bytes) -> None:
        """Partition right after Redis's answer to the next `command` has been passed on (the
        replica has just heard from Redis: it notices the partition as late as it can)."""
        self._marker = command

    def heal(self) -> None:
        self.partitioned = False
        self._healed.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _Link()
        self._links.append(link)
        self._writers.append(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(HOST, self.target_port)
            self._writers.append(upstream_writer)
            await asyncio.gather(
                self._pipe(link, reader, upstream_writer, outgoing=True),
                self._pipe(link, upstream_reader, writer, outgoing=False),
                return_exceptions=True,
            )
        except OSError:
            pass
        finally:
            self._tasks.discard(task)

    async def close(self) -> None:
        self.heal()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        for writer in self._writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _pipe(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        outgoing: bool,
    ) -> None:
        while data := await source.read(65536):
            if outgoing and b"SUBSCRIBE" in data.upper():
                link.subscribed = True
            if outgoing and self._marker is not None and self._marker in data.upper():
                link.armed, self._marker = True, None
            while self.partitioned:
                await self._healed.wait()
            if link.frozen:
                await asyncio.Event().wait()  # silent for good, and never closed
            sink.write(data)
            await sink.drain()
            if not outgoing and link.armed:
                link.armed = False
                self.partition()


@contextlib.asynccontextmanager
async def running_relay(target_port: int) -> AsyncIterator[Relay]:
    relay = Relay(target_port)
    server = await asyncio.start_server(relay._handle, HOST, 0)
    relay.port = server.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        server.close()
        await relay.close()
        await server.wait_closed()
