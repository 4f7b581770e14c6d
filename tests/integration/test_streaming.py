"""Streaming with bounded memory and graceful shutdown, against the real `canary-proxy run`
process (its RSS is what we bound); the fake upstream runs in the test process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from fakes import CHUNK, FakeUpstream, body_digest, eventually, pattern, stall, stream
from proxy_process import ProxyProcess, running_proxy, write_config

SIZE: Final = 50 * 1024 * 1024
MAX_GROWTH: Final = 20 * 1024 * 1024  # the proxy must not hold the body: far below SIZE


def config_file(upstream: FakeUpstream, tmp_path: Path) -> Path:
    """A config that sends everything to `upstream`, written for `running_proxy`."""
    config = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "state_dir": str(tmp_path / "state"),
        "timeouts": {
            "connect": "1s",
            "response_header": "10s",
            "idle": "10s",
            "client_header": "5s",
            "shutdown": "10s",
        },
        "routes": [{"name": "shop", "stable": {"upstreams": [upstream.url]}}],
    }
    return write_config(tmp_path, config)


@contextlib.asynccontextmanager
async def rss_peak(proxy: ProxyProcess) -> AsyncIterator[Callable[[], int]]:
    """Sample the proxy's RSS every 10 ms; yields a function returning the peak so far."""
    peak = proxy.rss()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, proxy.rss())
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        yield lambda: peak
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        peak = max(peak, proxy.rss())


async def warm_up(session: aiohttp.ClientSession, proxy: ProxyProcess) -> int:
    """One small request through the proxy (pools, parser, buffers exist), then its RSS."""
    async with session.get(proxy.url + "/warm-up") as response:
        assert response.status == 200
        await response.read()
    return proxy.rss()


async def until_steady(progress: Callable[[], int], *, quiet: float = 0.3) -> int:
    """Wait (at most 10 s) until `progress()` stops changing for `quiet` seconds."""
    async with asyncio.timeout(10):
        last = -1
        while (now := progress()) != last:
            last = now
            await asyncio.sleep(quiet)
    return last


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
async def test_a_50_mb_download_passes_byte_identical_while_the_proxy_stays_small(
    stable: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path, content_length: bool
) -> None:
    stable.answer_with(stream(SIZE, content_length=content_length), path="/download")
    async with running_proxy(config_file(stable, tmp_path)) as proxy:
        baseline = await warm_up(session, proxy)
        async with rss_peak(proxy) as peak:
            digest = hashlib.sha256()
            size = 0
            async with session.get(proxy.url + "/download") as response:
                async for chunk in response.content.iter_chunked(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)

    assert size == SIZE
    assert digest.hexdigest() == stable.streamed_sha256
    assert peak() - baseline < MAX_GROWTH, f"proxy grew by {(peak() - baseline) >> 20} MiB"


async def test_a_50_mb_upload_passes_byte_identical_while_the_proxy_stays_small(
    stable: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stable.answer_with(body_digest(), path="/upload")
    sent = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        async for chunk in pattern(SIZE):
            sent.update(chunk)
            yield chunk

    async with running_proxy(config_file(stable, tmp_path)) as proxy:
        baseline = await warm_up(session, proxy)
        async with (
            rss_peak(proxy) as peak,
            session.post(proxy.url + "/upload", data=upload()) as response,
        ):
            answer = await response.text()

    assert response.status == 200
    assert answer == f"{SIZE} {sent.hexdigest()}"
    assert peak() - baseline < MAX_GROWTH, f"proxy grew by {(peak() - baseline) >> 20} MiB"


async def test_a_client_that_stops_reading_does_not_make_the_proxy_buffer_the_download(
    stable: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stable.answer_with(stream(SIZE), path="/download")
    async with running_proxy(config_file(stable, tmp_path)) as proxy:
        baseline = await warm_up(session, proxy)
        async with rss_peak(proxy) as peak, session.get(proxy.url + "/download") as response:
            digest = hashlib.sha256(await response.content.readexactly(CHUNK))
            # Stop reading until backpressure has stopped the upstream (or it sent it all).
            stalled_at = await until_steady(lambda: stable.streamed)
            stalled_growth = peak() - baseline
            async for chunk in response.content.iter_chunked(CHUNK):
                digest.update(chunk)

    assert stalled_growth < MAX_GROWTH, f"upstream had sent {stalled_at >> 20} MiB"
    assert peak() - baseline < MAX_GROWTH
    assert digest.hexdigest() == stable.streamed_sha256


async def test_sigterm_lets_in_flight_requests_finish_refuses_new_ones_and_exits_0(
    stable: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    release = asyncio.Event()
    stable.answer_with(stall(until=release))
    async with running_proxy(config_file(stable, tmp_path)) as proxy:

        async def slow(n: int) -> tuple[int, bytes]:
            async with session.get(f"{proxy.url}/slow/{n}") as response:
                return response.status, await response.read()

        in_flight = [asyncio.create_task(slow(n)) for n in range(5)]
        await stable.wait_until(lambda u: len(u.received) == 5)

        proxy.process.send_signal(signal.SIGTERM)
        await eventually(proxy.refuses_connections)
        release.set()  # the upstream answers only now: the drain must have waited
        answers = await asyncio.gather(*in_flight)
        exit_code = await asyncio.wait_for(proxy.process.wait(), 5)

    assert sorted(answers) == [(200, f"stable /slow/{n}".encode()) for n in range(5)]
    assert exit_code == 0, proxy.logged()
