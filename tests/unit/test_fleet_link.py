"""The fleet link's bookkeeping that needs no Redis: which saved state a starting replica
keeps, and how the heartbeats and pooled slots read back."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator

import pytest
from configs import guarded
from prometheus_client import CollectorRegistry, generate_latest

from proxy.control.fleet import Fleet, FleetCollector, Keys, _fields, _replicas
from proxy.core import rollout
from proxy.core.config import Cluster
from proxy.core.fleet import decision

T0 = 1_800_000_000.0


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    link = Fleet(Cluster(redis="redis://127.0.0.1:1/0", name="edge"), "a")  # never connects
    yield link
    await link.client.aclose()


def _states() -> tuple[rollout.RolloutState, rollout.RolloutState]:
    route = guarded().routes[0]
    start = rollout.initial(route, T0)
    paused, _ = rollout.pause(route, start, T0 + 10)
    aborted, _ = rollout.abort(route, start, T0 + 20, "cut off")
    return paused, aborted


async def test_a_starting_replica_takes_the_fleets_record_over_its_state_dir(
    fleet: Fleet,
) -> None:
    paused, _ = _states()
    fleet.seeded = {"shop": (7, decision(paused, None, (), origin="b", now=T0 + 10))}
    merged = fleet.over_saved({"shop": {}, "cart": {"kept": True}})
    assert merged["shop"]["state"] == "paused"
    assert merged["cart"] == {"kept": True}  # nothing in the fleet about it
    assert fleet.applied == {"shop": 7}


async def test_a_starting_replica_keeps_an_abort_it_made_after_the_fleets_last_decision(
    fleet: Fleet,
) -> None:
    paused, aborted = _states()
    fleet.seeded = {"shop": (7, decision(paused, None, (), origin="b", now=T0 + 10))}
    own = aborted.to_dict()
    assert fleet.over_saved({"shop": own})["shop"] is own
    assert "shop" not in fleet.applied  # not synced: the catch-up writes it to the fleet


def test_the_replica_list_drops_broken_and_long_silent_heartbeats() -> None:
    now = T0
    raw = {
        b"b": json.dumps({"last_seen": now - 1, "applied_version": {"shop": 3}}).encode(),
        b"a": json.dumps({"last_seen": now - 0.5}).encode(),
        b"old": json.dumps({"last_seen": now - 3600}).encode(),
        b"junk": b"{",
    }
    replicas, gone = _replicas(raw, now)
    assert [r["id"] for r in replicas] == ["a", "b"]
    assert replicas[1] == {"id": "b", "last_seen": now - 1, "applied_version": {"shop": 3}}
    assert sorted(gone) == ["junk", "old"]


def test_keys_are_under_the_clusters_prefix_and_slot_fields_read_as_numbers() -> None:
    keys = Keys("canary-proxy:edge")
    assert keys.route("shop") == "canary-proxy:edge:route:shop"
    assert keys.slot("shop", "v2", 42) == "canary-proxy:edge:window:shop:v2:42"
    assert keys.slot("shop", None, 42) == "canary-proxy:edge:window:shop::42"
    assert _fields({b"cr": b"12", b"ce": b"3"}) == {"cr": 12, "ce": 3}


async def test_the_fleet_metrics_say_connected_replicas_and_lag_and_pass_promtool(
    fleet: Fleet,
) -> None:
    fleet.lag.observe(0.02)
    fleet.lag.observe(0.3)
    fleet.replicas = [{"id": "a", "last_seen": time.time()}, {"id": "b", "last_seen": 1.0}]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    text = generate_latest(registry).decode()
    assert "canary_proxy_cluster_connected 0.0" in text
    assert "canary_proxy_cluster_replicas 1.0" in text  # b was last heard from long ago
    assert 'canary_proxy_cluster_decision_lag_seconds_bucket{le="0.025"} 1.0' in text
    assert "canary_proxy_cluster_decision_lag_seconds_count 2.0" in text
    promtool = shutil.which("promtool")
    if promtool is not None:
        checker = await asyncio.create_subprocess_exec(
            promtool,
            "check",
            "metrics",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(20):
            said, _ = await checker.communicate(text.encode())
        assert checker.returncode == 0, said.decode()
