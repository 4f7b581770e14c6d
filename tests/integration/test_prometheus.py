"""A real Prometheus server scrapes the admin listener of a real `canary-proxy run` process and
its HTTP API returns exactly the per-version request counts the test generated; `promtool
check metrics` has nothing to say about the exposition (docs/metrics.md).

Needs Debian's `prometheus` package (`.ci/run` installs it); skips only where it is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from fakes import HOST, FakeUpstream
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import PROMETHEUS, PrometheusServer, running_prometheus
from proxy_process import open_session, running_proxy, write_config

PROMTOOL: Final = shutil.which("promtool")
STABLE_REQUESTS: Final = 200
CANARY_REQUESTS: Final = 100

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Debian package `prometheus` (prometheus and promtool binaries) is not installed; "
    "`.ci/run` installs it, so CI never skips this",
)


def config_file(tmp_path: Path, *routes: dict[str, object]) -> Path:
    """A config with `routes` and both listeners on port 0 (no admin token: Prometheus scrapes
    without one), written for `running_proxy`."""
    config = {
        "listen": f"{HOST}:0",
        "admin": {"listen": f"{HOST}:0"},
        "state_dir": str(tmp_path / "state"),
        "routes": list(routes),
    }
    return write_config(tmp_path, config)


def shop(stable: FakeUpstream, canary: FakeUpstream) -> dict[str, object]:
    """Route `shop`: half the traffic to the canary; X-Canary forces a version."""
    return {
        "name": "shop",
        "stable": {"upstreams": [stable.url]},
        "canary": {"upstreams": [canary.url], "revision": "v2"},
        "split": {"weight": 50, "force": {"header": "X-Canary"}},
    }


async def query(
    session: aiohttp.ClientSession, server: PrometheusServer, promql: str
) -> list[dict[str, object]]:
    async with session.get(server.url + "/api/v1/query", params={"query": promql}) as response:
        document = await response.json()
    assert response.status == 200, document
    assert document["status"] == "success", document
    result: list[dict[str, object]] = document["data"]["result"]
    return result


def requests_by_series(result: list[dict[str, object]]) -> dict[tuple[str, str, str], float]:
    """`{(route, version, code): value}` from an instant-vector answer."""
    counts: dict[tuple[str, str, str], float] = {}
    for sample in result:
        labels = sample["metric"]
        value = sample["value"]
        assert isinstance(labels, dict)
        assert isinstance(value, list)
        counts[(labels["route"], labels["version"], labels["code"])] = float(value[1])
    return counts


async def send(session: aiohttp.ClientSession, url: str, force: str, count: int) -> list[str]:
    """`count` requests forced to a version; returns the version tag each answer carried."""
    versions: list[str] = []
    for n in range(count):
        async with session.get(f"{url}/item/{n}", headers={"X-Canary": force}) as response:
            await response.read()
            assert response.status == 200
            versions.append(response.headers["X-Version"])
    return versions


async def test_prometheus_scrapes_the_admin_endpoint_and_reports_the_requests_sent_per_version(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    expected = {
        ("shop", "stable", "200"): float(STABLE_REQUESTS),
        ("shop", "canary", "200"): float(CANARY_REQUESTS),
    }
    async with (
        open_session() as session,
        running_proxy(config_file(tmp_path, shop(stable, canary))) as proxy,
    ):
        stable_tags = await send(session, proxy.url, "never", STABLE_REQUESTS)
        canary_tags = await send(session, proxy.url, "always", CANARY_REQUESTS)
        assert set(stable_tags) == {"stable"}
        assert set(canary_tags) == {"canary"}
        assert (len(stable.received), len(canary.received)) == (STABLE_REQUESTS, CANARY_REQUESTS)

        async with running_prometheus(session, tmp_path, f"{HOST}:{proxy.admin_port}") as prom:
            seen: dict[tuple[str, str, str], float] = {}
            try:
                async with asyncio.timeout(30):
                    while seen != expected:
                        seen = requests_by_series(
                            await query(session, prom, "canary_proxy_requests_total")
                        )
                        if seen != expected:
                            await asyncio.sleep(0.25)
            except TimeoutError:
                pytest.fail(
                    f"Prometheus did not report {expected} within 30 s; last answer: {seen}\n"
                    f"{prom.log()}"
                )
            targets = await query(session, prom, 'up{job="canary-proxy"}')
            per_version = requests_by_version(
                await query(session, prom, "sum by (version) (canary_proxy_requests_total)")
            )

    assert seen == expected
    assert [sample["value"][1] for sample in targets] == ["1"], targets  # type: ignore[index]
    assert per_version == {"stable": STABLE_REQUESTS, "canary": CANARY_REQUESTS}
    # Both stopped on the way out of their contexts: no leftover process.
    assert None not in (proxy.process.returncode, prom.process.returncode)


def requests_by_version(result: list[dict[str, object]]) -> dict[str, float]:
    counts: dict[str, float] = {}
    for sample in result:
        labels, value = sample["metric"], sample["value"]
        assert isinstance(labels, dict)
        assert isinstance(value, list)
        counts[labels["version"]] = float(value[1])
    return counts


async def test_promtool_finds_nothing_to_complain_about_in_the_exposition(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    assert PROMTOOL is not None
    api: dict[str, object] = {
        "name": "api",
        "match": {"path_prefix": "/api"},
        "stable": {"upstreams": [stable.url]},
    }
    async with (
        open_session() as session,
        running_proxy(config_file(tmp_path, api, shop(stable, canary))) as proxy,
    ):
        # Every family populated: both versions, a second route (first match wins), a failed
        # reload.
        await send(session, proxy.url, "never", 3)
        await send(session, proxy.url, "always", 3)
        async with session.get(proxy.url + "/api/x") as response:
            assert response.status == 200
        proxy.config_path.write_text("routes: [\n")
        async with session.post(proxy.admin_url + "/reload") as response:
            assert response.status == 400
        async with session.get(proxy.admin_url + "/metrics") as response:
            assert response.status == 200
            exposition = await response.read()

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }
    for version in ("stable", "canary"):
        key = (("code", "200"), ("route", "shop"), ("version", version))
        assert samples["canary_proxy_requests_total", key] == 3
    assert (
        samples[
            "canary_proxy_requests_total",
            (("code", "200"), ("route", "api"), ("version", "stable")),
        ]
        == 1
    )
    assert samples["canary_proxy_config_reloads_total", (("result", "failure"),)] == 1
    checked = await asyncio.create_subprocess_exec(
        PROMTOOL,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    output, _ = await asyncio.wait_for(checked.communicate(exposition), 20)
    assert (checked.returncode, output.decode()) == (0, "")
