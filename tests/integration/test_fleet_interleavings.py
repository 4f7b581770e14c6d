"""The fleet's link in process, against a real Redis: the orders of events that real
replicas meet only by chance (a decision made while a write is on the wire, Redis back empty
with replicas that applied different versions), set up exactly, one replica per `Fleet`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, needs_redis, running_redis

from proxy.control.fleet import Fleet
from proxy.control.holder import RuntimeHolder
from proxy.core import rollout
from proxy.core.config import parse_config
from proxy.core.fleet import Decision, decision
from proxy.core.window import WindowCounts
from proxy.dataplane.runtime import RouteState

pytestmark = needs_redis


@asynccontextmanager
async def replica(redis: RedisServer, name: str) -> AsyncIterator[tuple[RuntimeHolder, Fleet]]:
    """Replica `name`'s controller and fleet link, taken as connected (no background tasks:
    the test runs each step)."""
    route = {
        "name": "shop",
        "stable": {"upstreams": ["http://127.0.0.1:9001"]},
        "canary": {"upstreams": ["http://127.0.0.1:9002"], "revision": "v2"},
        "split": {"weight": 10},
        "guard": {"window": "10s", "min_requests": 20, "max_error_rate": 0.05},
    }
    cluster = {"redis": redis.url, "name": "races", "replica": name}
    config = parse_config({"routes": [route], "cluster": cluster}, base_dir="/srv")
    assert config.cluster is not None
    holder = RuntimeHolder(config, pooled=True)
    fleet = Fleet(config.cluster, name)
    fleet.attach(holder.controller)
    fleet.subscribed = fleet.healthy = True
    try:
        yield holder, fleet
    finally:
        await fleet.client.aclose()


def shop(holder: RuntimeHolder) -> RouteState:
    return holder.current.routes["shop"].state


async def record(fleet: Fleet) -> tuple[int, Decision]:
    version, text = await fleet.client.hmget(fleet.keys.route("shop"), "version", "record")
    assert isinstance(version, bytes)
    assert isinstance(text, bytes)
    return int(version), Decision.decode(text)


async def set_weight_in_redis(
    fleet: Fleet, live: RouteState, weight_bp: int, *, origin: str
) -> None:
    """A set-weight decided by replica `origin`, written to Redis as the route's first record
    (the replica under test does not hear of it)."""
    state, transition = rollout.set_weight(live.route, live.rollout, time.time(), weight_bp)
    record = decision(state, transition, [], origin=origin, now=time.time())
    written = await fleet._cas(
        keys=[fleet.keys.route("shop"), fleet.keys.decisions], args=[0, record.encode(), "shop"]
    )
    assert written[0] == 1


async def test_an_abort_made_while_a_losing_write_is_on_the_wire_is_not_undone(
    tmp_path: Path,
) -> None:
    """Finding 4: replica a pauses (its write goes out on an old version); while it is on the
    wire a's guard aborts; the write loses to b's older set-weight. a must keep its abort and
    the fleet must end aborted."""
    async with running_redis(tmp_path) as redis, replica(redis, "a") as (holder, fleet):
        live = shop(holder)
        await set_weight_in_redis(fleet, live, 500, origin="b")
        holder.controller.act("shop", "pause", holder.canary_stats("shop"))
        cas = fleet._cas
        calls = 0

        async def abort_meanwhile(**arguments: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                holder.controller.act("shop", "abort", holder.canary_stats("shop"), reason="x")
            return await cas(**arguments)

        fleet._cas = abort_meanwhile  # type: ignore[assignment]
        await fleet.publish_pending()
        await fleet.publish_pending()
        assert (live.rollout.state, live.weight_bp) == ("aborted", 0)
        version, fleets = await record(fleet)
        assert fleets.aborted
        fleet._arrived("shop", version, fleets.encode().encode())  # our own record's echo
        assert (live.rollout.state, live.weight_bp) == ("aborted", 0)
        assert not fleet.pending


async def test_a_breach_every_replica_trips_on_counts_one_rollback_across_the_fleet(
    tmp_path: Path,
) -> None:
    """Lesser finding: the pooled window trips on every replica at once; the replica whose
    write wins counts the rollback, the others take it from the fleet."""
    async with (
        running_redis(tmp_path) as redis,
        replica(redis, "a") as (first, a),
        replica(redis, "b") as (second, b),
    ):
        failing = WindowCounts(requests=40, errors=40, p99=0.01)
        healthy = WindowCounts(requests=100, errors=0, p99=0.01)
        for holder in (first, second):
            holder.controller.judge_pooled("shop", healthy, failing)
            assert shop(holder).aborted
        for fleet in (a, b):
            await fleet.publish_pending()
        counted = [sum(holder.outcomes.rollbacks.values()) for holder in (first, second)]
        assert counted == [1, 0]


async def test_a_raise_of_ours_that_went_in_although_its_answer_was_lost_goes_in_here_too(
    tmp_path: Path,
) -> None:
    """Finding 4 (the echo of our own record): a set-weight of a's was written to Redis, but
    its answer never came back (the admin was told 503), so a still serves the old weight.
    When its own record comes back it must serve what the fleet has."""
    async with running_redis(tmp_path) as redis, replica(redis, "a") as (holder, fleet):
        live = shop(holder)
        await set_weight_in_redis(fleet, live, 4000, origin="a")
        assert live.weight_bp == 1000
        version, fleets = await record(fleet)
        fleet._arrived("shop", version, fleets.encode().encode())
        assert live.weight_bp == 4000
        fleet._arrived("shop", version, fleets.encode().encode())  # twice: nothing more
        assert live.weight_bp == 4000


@pytest.mark.parametrize("c_first", [False, True], ids=["a-first", "c-first"])
async def test_redis_back_empty_keeps_the_abort_whichever_replica_reconnects_first(
    tmp_path: Path, c_first: bool
) -> None:
    """Finding 3: a applied the fleet's abort (version 7), c last applied version 6 (before
    it); Redis restarts empty. Neither order of their reconnects may undo the abort."""
    async with (
        running_redis(tmp_path) as redis,
        replica(redis, "a") as (aborted, a),
        replica(redis, "c") as (behind, c),
    ):
        aborted.controller.act("shop", "abort", aborted.canary_stats("shop"), reason="bad")
        a.pending.clear()
        a.applied["shop"], c.applied["shop"] = 7, 6
        order = (c, a) if c_first else (a, c)
        for fleet in order:
            await fleet._catch_up()
            await fleet.publish_pending()
        version, fleets = await record(a)
        assert fleets.aborted, (c_first, fleets)
        for fleet in (a, c):
            fleet._arrived("shop", version, fleets.encode().encode())
        assert shop(behind).rollout.state == "aborted", c_first
        assert shop(aborted).rollout.state == "aborted", c_first
