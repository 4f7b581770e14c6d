"""A real `canary-proxy` process for the integration tests: `canary-proxy run` on a config file
with its listeners on port 0, the bound ports read from its stderr, its stderr kept, and always
ended on the way out; the CLI as a subprocess; and what the tests read off a proxy (its
`/metrics`, its resident memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
from fakes import close_writer
from prometheus_client.parser import text_string_to_metric_families

# The installed `canary-proxy` command next to this interpreter, else the same program via -m.
_SCRIPT: Final = Path(sys.executable).with_name("canary-proxy")
CANARY_PROXY: Final = (str(_SCRIPT),) if _SCRIPT.exists() else (sys.executable, "-m", "proxy")
# What `canary-proxy run` logs once both listeners are bound (proxy/app.py).
LISTENING: Final = re.compile(rb"canary-proxy listening on (\S+):(\d+)")
ADMIN_LISTENING: Final = re.compile(rb"admin API listening on (\S+):(\d+)")
# The environment variable the tests' configs name in `admin.token_env`.
TOKEN_ENV: Final = "CANARY_PROXY_TEST_ADMIN_TOKEN"


# -- a real proxy process ----------------------------------------------------------------------


@dataclass(slots=True)
class ProxyProcess:
    """A running `canary-proxy run`: its listeners as it reported them, and its stderr so far."""

    process: asyncio.subprocess.Process
    config_path: Path
    host: str
    port: int
    admin_host: str
    admin_port: int
    log: list[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}:{self.admin_port}"

    def logged(self) -> str:
        return b"".join(self.log).decode(errors="replace")

    def rss(self) -> int:
        """Resident set size in bytes, from /proc/PID/status (VmRSS is in kB)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None, status
        return int(match[1]) * 1024

    async def refuses_connections(self) -> bool:
        """Whether a new connection to the data plane is refused (its listener is closed)."""
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            # Queued on the listener as it closed: the kernel resets it. Ask again, until a
            # connection is refused outright.
            return False
        await close_writer(writer)
        return False

    async def shut_down(self, within: float) -> int:
        """SIGTERM, a graceful shutdown; the exit code, which must come within `within` s."""
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(within):
            return await self.process.wait()


def write_config(tmp_path: Path, config: Mapping[str, object]) -> Path:
    """`config` written to `tmp_path/proxy.yaml` (JSON is YAML); the file's path."""
    path = tmp_path / "proxy.yaml"
    path.write_text(json.dumps(config))
    return path


@contextlib.asynccontextmanager
async def running_proxy(
    config_path: Path,
    *,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    within: float = 10.0,
) -> AsyncIterator[ProxyProcess]:
    """`canary-proxy run --config CONFIG_PATH`, once it has reported both listeners (which must
    come within `within` seconds); killed (SIGKILL) on the way out if it still runs.

    Its environment is `env` (by default this process's), with `token` in TOKEN_ENV if given.
    """
    environment = dict(os.environ if env is None else env)
    if token is not None:
        environment[TOKEN_ENV] = token
    process = await asyncio.create_subprocess_exec(
        *CANARY_PROXY,
        "run",
        "--config",
        str(config_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    assert process.stderr is not None
    log: list[bytes] = []
    collector: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(within):
            (host, port), (admin_host, admin_port) = await _listeners(process.stderr, log)
        collector = asyncio.create_task(_collect(process.stderr, log))
        yield ProxyProcess(process, config_path, host, port, admin_host, admin_port, log)
    finally:
        async with asyncio.timeout(10):
            await end_process(process)
            if collector is not None:
                await collector  # ends at EOF, once the process is gone


async def _listeners(
    stderr: asyncio.StreamReader, log: list[bytes]
) -> tuple[tuple[str, int], tuple[str, int]]:
    """(host, port) of the data plane and of the admin API, read off stderr (kept in `log`)."""
    data: tuple[str, int] | None = None
    admin: tuple[str, int] | None = None
    while data is None or admin is None:
        line = await stderr.readline()
        log.append(line)
        assert line, f"exited before listening:\n{b''.join(log).decode(errors='replace')}"
        if match := LISTENING.search(line):
            data = (match[1].decode(), int(match[2]))
        elif match := ADMIN_LISTENING.search(line):
            admin = (match[1].decode(), int(match[2]))
    return data, admin


async def _collect(stream: asyncio.StreamReader, log: list[bytes]) -> None:
    """Keep reading stderr so a chatty proxy never blocks on a full pipe."""
    while line := await stream.readline():
        log.append(line)


async def end_process(process: asyncio.subprocess.Process, *, grace: float = 0) -> int:
    """End `process` if it still runs: SIGTERM and `grace` seconds to exit, then SIGKILL (at
    once without a grace period); its exit code."""
    if process.returncode is None and grace > 0:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), grace)
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    return await process.wait()


async def run_cli(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """`canary-proxy ARGS` as a subprocess, without blocking the event loop the test's servers
    run on: (exit code, stdout, stderr), within 20 s. Its environment is `env`, else this
    process's."""
    process = await asyncio.create_subprocess_exec(
        *CANARY_PROXY,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(20):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# -- talking to a proxy ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_session(
    *, limit: int = 100, force_close: bool = False
) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client with no cookie jar, at most `limit` connections at a time."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=force_close),
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        yield session


Sample = tuple[dict[str, str], float]  # (labels, value)


async def scrape(session: aiohttp.ClientSession, admin_url: str) -> dict[str, list[Sample]]:
    """The admin `/metrics`, parsed: sample name -> [(labels, value)]."""
    async with session.get(admin_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def values(samples: dict[str, list[Sample]], name: str, **labels: str) -> list[float]:
    """The values of the `name` samples whose labels include `labels`."""
    return [v for have, v in samples.get(name, []) if have.items() >= labels.items()]


def value_of(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The value of the one `name` sample whose labels include `labels`."""
    matching = values(samples, name, **labels)
    assert len(matching) == 1, (name, labels, samples.get(name))
    return matching[0]
