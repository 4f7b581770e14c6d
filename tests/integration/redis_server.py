"""A real Redis for the fleet tests: `redis-server` (Debian's package, which `.ci/run`
installs) on a free loopback port, with no persistence and its files under the test's
`tmp_path`, answering PING before the test uses it, and always killed on the way out. It can be
killed and started again on the same port (Redis lost under load, then back).

The tests that need it skip where `REDIS_SERVER` is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
import redis.asyncio as aioredis
from fakes import HOST, eventually, unused_port
from proxy_process import end_process

REDIS_SERVER: Final = shutil.which("redis-server")
READY_WITHIN: Final = 10.0  # seconds

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


@dataclass(slots=True)
class RedisServer:
    """A `redis-server` process the test owns; `url` stays the same across `restart`."""

    folder: Path
    port: int
    password: str | None = None
    process: asyncio.subprocess.Process | None = field(default=None)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.folder / "redis.log"

    def log(self) -> str:
        """The end of its log, for a failure message."""
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def client(self) -> aioredis.Redis:
        """A client of the test's own (the caller closes it with `aclose`)."""
        return aioredis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=2.0)

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        assert self.process is None or self.process.returncode is not None
        arguments = [
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        if self.password is not None:
            arguments += ["--requirepass", self.password]
        self.process = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            *arguments,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await self._until_ready()

    async def kill(self) -> None:
        """SIGKILL: Redis is gone at once, as when its machine dies."""
        if self.process is not None:
            await end_process(self.process)

    async def _until_ready(self) -> None:
        client = self.client()

        async def ready() -> bool:
            assert self.process is not None
            assert self.process.returncode is None, f"redis-server exited:\n{self.log()}"
            with contextlib.suppress(aioredis.RedisError, OSError):
                return bool(await client.ping())
            return False

        try:
            await eventually(ready, within=READY_WITHIN, every=0.05)
        except TimeoutError:
            pytest.fail(f"redis-server did not answer within {READY_WITHIN:g} s:\n{self.log()}")
        finally:
            await client.aclose()


@contextlib.asynccontextmanager
async def running_redis(
    tmp_path: Path, *, password: str | None = None
) -> AsyncIterator[RedisServer]:
    """A started `redis-server` on a free port; killed on the way out."""
    folder = tmp_path / "redis"
    folder.mkdir(exist_ok=True)
    server = RedisServer(folder=folder, port=unused_port(), password=password)
    try:
        await server.start()
        yield server
    finally:
        await server.kill()
