"""Fixtures for the integration tests: fake stable/canary upstreams, an in-process proxy
factory, an aiohttp client and a raw-socket exchange."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from fakes import TEST_TIMEOUTS, FakeUpstream, MakeProxy, ProxyHandle, RawExchange, close_writer

from proxy.control.holder import RuntimeHolder
from proxy.core.config import parse_config
from proxy.dataplane.server import Server


@pytest.fixture
async def stable() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream("stable") as upstream:
        yield upstream


@pytest.fixture
async def canary() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream("canary") as upstream:
        yield upstream


@pytest.fixture
async def make_proxy(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> AsyncIterator[MakeProxy]:
    started: list[Server] = []

    async def make(
        *,
        routes: list[dict[str, object]] | None = None,
        timeouts: dict[str, str] | None = None,
        limits: dict[str, int] | None = None,
        rng: Callable[[], float] | None = None,
        **route: object,
    ) -> ProxyHandle:
        shop: dict[str, object] = {
            "name": "shop",
            "stable": {"upstreams": [stable.url]},
            "canary": {"upstreams": [canary.url], "revision": "v2"},
            "split": {"weight": 0},
        }
        shop.update(route)
        mapping: dict[str, object] = {
            "listen": "127.0.0.1:0",
            "timeouts": {**TEST_TIMEOUTS, **(timeouts or {})},
            "routes": routes if routes is not None else [shop],
        }
        if limits is not None:
            mapping["limits"] = limits
        config = parse_config(mapping, base_dir=str(tmp_path))
        holder = RuntimeHolder(config, rng=rng or random.Random(0).random)
        server = Server(holder.plane, asyncio.get_running_loop())
        host, port = await server.start("127.0.0.1", 0)
        started.append(server)
        return ProxyHandle(host=host, port=port, holder=holder, server=server)

    yield make
    for server in started:
        await server.shutdown(0.2)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # No decompression (bodies must pass byte-for-byte) and no cookie jar (tests send cookies
    # explicitly; a jar would carry one test request's Set-Cookie into the next).
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as client:
        yield client


async def _raw_exchange(
    host: str,
    port: int,
    data: bytes,
    timeout: float = 2.0,  # noqa: ASYNC109 - reading until close or timeout is the point
) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    received = bytearray()
    try:
        writer.write(data)
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    received += chunk
    finally:
        await close_writer(writer)
    return bytes(received)


@pytest.fixture
def raw_exchange() -> RawExchange:
    return _raw_exchange
