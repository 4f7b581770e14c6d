"""Two fleet links in one process against a real Redis, one of them deaf (never subscribed),
so that a decision is taken on a version that is no longer the fleet's: the compare-and-set
refuses it, and `resolve` decides. An abort is never overwritten by a decision taken before
it; an abort taken on an older version still goes in over a newer decision."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fakes import eventually
from redis_server import RedisServer, needs_redis, running_redis

from proxy.control.fleet import Fleet
from proxy.control.holder import RuntimeHolder
from proxy.core.config import Cluster, Config, parse_config
from proxy.core.fleet import Decision

pytestmark = needs_redis


def config() -> Config:
    """One guarded route at 10 %, its upstreams never called."""
    route = {
        "name": "shop",
        "stable": {"upstreams": ["http://127.0.0.1:9"]},
        "canary": {"upstreams": ["http://127.0.0.1:9"], "revision": "v2"},
        "split": {"weight": 10},
        "guard": {"window": "10s"},
    }
    return parse_config({"routes": [route]}, base_dir="/srv")


@contextlib.asynccontextmanager
async def link(redis: RedisServer, replica: str, *, listening: bool) -> AsyncIterator[Fleet]:
    """A replica's controller and its fleet link; `listening`: subscribed, beating and
    publishing in the background; else deaf (it takes itself for connected, but hears of no
    decision and writes its own only when the test says so)."""
    fleet = Fleet(Cluster(redis=redis.url, name="races"), replica)
    holder = RuntimeHolder(config(), pooled=True)
    fleet.attach(holder.controller)
    if listening:
        fleet.start()
    else:
        fleet.subscribed = fleet.healthy = True
    try:
        yield fleet
    finally:
        await fleet.stop()


async def record(redis: RedisServer) -> tuple[int, Decision]:
    client = redis.client()
    try:
        version, text = await client.hmget("canary-proxy:races:route:shop", "version", "record")
    finally:
        await client.aclose()
    assert version is not None
    assert text is not None
    return int(version), Decision.decode(text)


def state_of(fleet: Fleet) -> str:
    assert fleet.controller is not None
    return fleet.controller.live["shop"].rollout.state


def act(fleet: Fleet, verb: str, **arguments: object) -> None:
    controller = fleet.controller
    assert controller is not None
    controller.act("shop", verb, controller.recorder.stats_for("shop", "canary"), **arguments)


async def test_a_decision_taken_before_an_abort_never_overwrites_it(tmp_path: Path) -> None:
    async with (
        running_redis(tmp_path) as redis,
        link(redis, "a", listening=True) as a,
        link(redis, "b", listening=False) as b,
    ):
        await eventually(lambda: a.connected, within=5.0)
        act(a, "abort", reason="broken")
        await a.settled()
        assert (await record(redis))[0] == 1

        act(b, "set_weight", weight_bp=5000)  # b never heard of the abort: version 0
        assert b.pending["shop"].base == 0
        await b.publish_pending()

        version, fleet_record = await record(redis)
        assert (version, fleet_record.state.state) == (1, "aborted")  # refused, unchanged
        assert state_of(b) == "aborted"  # and b took the abort
        assert not b.pending


async def test_an_abort_taken_on_an_older_version_still_goes_in(tmp_path: Path) -> None:
    async with (
        running_redis(tmp_path) as redis,
        link(redis, "a", listening=True) as a,
        link(redis, "b", listening=False) as b,
    ):
        await eventually(lambda: a.connected, within=5.0)
        act(a, "set_weight", weight_bp=5000)
        await a.settled()
        assert (await record(redis))[0] == 1

        act(b, "abort", reason="b saw it fail")  # on version 0
        await b.publish_pending()

        version, fleet_record = await record(redis)
        assert (version, fleet_record.state.state, fleet_record.origin) == (2, "aborted", "b")
        await eventually(lambda: state_of(a) == "aborted", within=3.0)  # a heard of it


async def test_two_replicas_deciding_at_once_end_with_one_record_and_abort_wins(
    tmp_path: Path,
) -> None:
    async with (
        running_redis(tmp_path) as redis,
        link(redis, "a", listening=True) as a,
        link(redis, "b", listening=True) as b,
    ):
        await eventually(lambda: a.connected and b.connected, within=5.0)
        act(a, "set_weight", weight_bp=3000)
        act(b, "abort", reason="at the same moment")
        await asyncio.gather(a.settled(), b.settled())
        await eventually(lambda: state_of(a) == state_of(b) == "aborted", within=3.0)
        version, fleet_record = await record(redis)
        assert fleet_record.state.state == "aborted"
        assert a.applied["shop"] == b.applied["shop"] == version
