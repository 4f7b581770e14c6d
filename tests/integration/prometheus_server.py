"""A real Prometheus server for the integration tests: scraping the targets a test names (and
evaluating the rule files it names), on a free loopback port with its own tsdb under the test's
`tmp_path`, ready before the test uses it, and always stopped on the way out.

`prometheus` comes from Debian's `prometheus` package, which `.ci/run` installs; the tests that
need it skip where `PROMETHEUS` is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from fakes import HOST, eventually, unused_port
from proxy_process import end_process

PROMETHEUS: Final = shutil.which("prometheus")
READY_WITHIN: Final = 20.0  # seconds


@dataclass(frozen=True, slots=True)
class PrometheusServer:
    url: str
    log_path: Path
    process: asyncio.subprocess.Process

    def log(self) -> str:
        """The end of its stdout and stderr, for a failure message."""
        return self.log_path.read_text(errors="replace")[-4000:]


@contextlib.asynccontextmanager
async def running_prometheus(
    session: aiohttp.ClientSession,
    tmp_path: Path,
    *targets: str,
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
) -> AsyncIterator[PrometheusServer]:
    """A real Prometheus (job `canary-proxy`) scraping `targets` (`host:port`, path /metrics)
    and evaluating `rule_files` every `scrape_interval`; ready (`/-/ready`, at most 20 s, failing
    at once with its log if it exits) when this yields; always stopped on the way out."""
    assert PROMETHEUS is not None
    assert targets, "Prometheus needs something to scrape"
    config: dict[str, object] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": "canary-proxy",
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    if rule_files:
        config["rule_files"] = [str(path) for path in rule_files]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(json.dumps(config))
    address = f"{HOST}:{unused_port()}"
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            PROMETHEUS,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={address}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    server = PrometheusServer(url=f"http://{address}", log_path=log_path, process=process)
    try:
        await _until_ready(server, session)
        yield server
    finally:
        await end_process(process, grace=10)


async def _until_ready(server: PrometheusServer, session: aiohttp.ClientSession) -> None:
    """Poll `/-/ready`; fail at once, with its log, if Prometheus exits."""

    async def ready() -> bool:
        assert server.process.returncode is None, f"prometheus exited:\n{server.log()}"
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with session.get(server.url + "/-/ready") as response:
                return response.status == 200
        return False

    try:
        await eventually(ready, within=READY_WITHIN, every=0.1)
    except TimeoutError:
        pytest.fail(f"prometheus did not become ready within {READY_WITHIN:g} s:\n{server.log()}")
