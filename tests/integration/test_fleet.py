"""Several replicas, one rollout, through a real Redis (issue 12): real `canary-proxy run`
processes with a `cluster` section, a real `redis-server`, fake upstreams.

A decision on one replica (an abort, a guard's rollback) reaches the others within a second
and they stop sending users to the canary; pooled evidence trips a breach no single replica's
traffic would; a replica started late or after `kill -9` takes the fleet's state; with Redis
killed under load no request fails, no weight rises, the local guard still rolls back, and the
fleet converges once Redis is back; a ramp advances once per step across the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from fakes import FakeUpstream, eventually, reply
from proxy_process import (
    TOKEN_ENV,
    ProxyProcess,
    open_session,
    run_cli,
    running_proxy,
    scrape,
    value_of,
    write_config,
)
from redis_server import RedisServer, needs_redis, running_redis
from relay import Relay, running_relay
from traffic import Traffic

pytestmark = needs_redis

TOKEN: Final = "fleet-token"
AUTH: Final = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUTS: Final = {
    "connect": "1s",
    "response_header": "5s",
    "idle": "10s",
    "client_header": "5s",
    "shutdown": "1s",
}
CLUSTER: Final = "test-edge"
# The contract: a decision made on any replica is applied on every other within a second.
REACH_SECONDS: Final = 1.0
# And once Redis is back, the fleet agrees again within five.
CONVERGE_SECONDS: Final = 5.0

Document = dict[str, Any]


def replica_config(
    tmp_path: Path,
    replica: str,
    stable: FakeUpstream,
    canary: FakeUpstream,
    redis: RedisServer | Relay | None,
    *,
    weight: float | None = 50,
    guard: Document | None = None,
    rollout: Document | None = None,
    workers: int = 1,
    password_env: str | None = None,
) -> Path:
    """A config for replica `replica` (its own folder and state_dir), in the test cluster
    unless `redis` is None (then a replica alone, as without the feature)."""
    folder = tmp_path / replica
    folder.mkdir(exist_ok=True)
    split: Document = {"force": {"header": "X-Canary"}}
    if weight is not None:
        split["weight"] = weight
    route: Document = {
        "name": "shop",
        "stable": {"upstreams": [stable.url]},
        "canary": {"upstreams": [canary.url], "revision": "v2"},
        "split": split,
    }
    if guard is not None:
        route["guard"] = guard
    if rollout is not None:
        route["rollout"] = rollout
    config: Document = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": TOKEN_ENV},
        "state_dir": "state",
        "timeouts": TIMEOUTS,
        "routes": [route],
    }
    if workers > 1:
        config["workers"] = workers
    if redis is not None:
        config["cluster"] = {"redis": redis.url, "name": CLUSTER, "replica": replica}
        if password_env is not None:
            config["cluster"]["redis_password_env"] = password_env
    return write_config(folder, config)


@contextlib.asynccontextmanager
async def running_fleet(
    tmp_path: Path,
    names: Sequence[str],
    stable: FakeUpstream,
    canary: FakeUpstream,
    redis: RedisServer | None,
    **route: Any,
) -> AsyncIterator[list[ProxyProcess]]:
    async with contextlib.AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                running_proxy(
                    replica_config(tmp_path, name, stable, canary, redis, **route),
                    token=TOKEN,
                    within=30.0,
                )
            )
            for name in names
        ]
        yield replicas


async def route_of(session: aiohttp.ClientSession, proxy: ProxyProcess) -> Document:
    async with session.get(proxy.admin_url + "/routes/shop") as response:
        assert response.status == 200
        document: Document = await response.json()
        return document


async def status_of(session: aiohttp.ClientSession, proxy: ProxyProcess) -> Document:
    async with session.get(proxy.admin_url + "/status") as response:
        assert response.status == 200
        document: Document = await response.json()
        return document


async def admin(
    session: aiohttp.ClientSession,
    proxy: ProxyProcess,
    method: str,
    path: str,
    body: Document | None = None,
) -> tuple[int, Document]:
    async with session.request(method, proxy.admin_url + path, json=body, headers=AUTH) as response:
        document: Document = await response.json()
        return response.status, document


async def until_state(
    session: aiohttp.ClientSession, proxy: ProxyProcess, state: str, within: float
) -> float:
    """Poll the replica's route every 5 ms until it is in `state` with the weight that goes
    with it; the wall time it was first seen so (bounded by `within`)."""

    async def there() -> bool:
        document = await route_of(session, proxy)
        return bool(document["state"] == state)

    try:
        await eventually(there, within=within, every=0.005)
    except TimeoutError:
        document = await route_of(session, proxy)
        pytest.fail(f"not {state} within {within:g}s: {document}\n{proxy.logged()[-3000:]}")
    return time.time()


async def connected(session: aiohttp.ClientSession, proxy: ProxyProcess) -> bool:
    return bool((await status_of(session, proxy))["cluster"]["connected"])


async def all_connected(session: aiohttp.ClientSession, replicas: Sequence[ProxyProcess]) -> None:
    async def every() -> bool:
        return all([await connected(session, r) for r in replicas])

    await eventually(every, within=10.0, every=0.05)


async def versions(
    session: aiohttp.ClientSession, proxy: ProxyProcess, count: int, *, force: str | None = None
) -> list[tuple[int, str]]:
    """`count` requests through `proxy`, 8 at a time: (status, X-Version) of each."""
    headers = {} if force is None else {"X-Canary": force}
    results: list[tuple[int, str]] = []
    numbers = iter(range(count))

    async def client() -> None:
        for n in numbers:
            async with session.get(f"{proxy.url}/r/{n}", headers=headers) as response:
                await response.read()
                results.append((response.status, response.headers.get("X-Version", "")))

    await asyncio.gather(*(client() for _ in range(8)))
    return results


def audit(proxy: ProxyProcess) -> list[Document]:
    path = proxy.config_path.parent / "state" / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def saved_state(proxy: ProxyProcess) -> Document:
    document: Document = json.loads((proxy.config_path.parent / "state" / "state.json").read_text())
    route: Document = document["routes"]["shop"]
    return route


# -- decisions reach every replica ---------------------------------------------------------


async def test_an_abort_on_one_replica_reaches_the_others_within_a_second_and_they_stop_sending_to_the_canary(  # noqa: E501
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(tmp_path, "abc", stable, canary, redis) as (a, b, c),
        open_session() as session,
    ):
        await all_connected(session, (a, b, c))
        for replica in (b, c):
            seen = {version for _, version in await versions(session, replica, 40)}
            assert seen == {"stable", "canary"}  # 50 %: both versions serve

        decided = time.time()
        status, document = await admin(session, a, "POST", "/routes/shop/abort", {"reason": "bad"})
        assert (status, document["state"], document["weight"]) == (200, "aborted", 0)
        reached = [await until_state(session, r, "aborted", within=3.0) for r in (b, c)]

        assert max(reached) - decided <= REACH_SECONDS, [t - decided for t in reached]
        for replica in (b, c):
            # Everyone goes to stable now, even a user forced to the canary (docs/semantics.md).
            assert {v for _, v in await versions(session, replica, 40)} == {"stable"}
            assert {v for _, v in await versions(session, replica, 8, force="always")} == {"stable"}
            # Written to its own state_dir and audit log, saying which replica decided.
            assert saved_state(replica)["state"] == "aborted"
            event = audit(replica)[-1]
            assert (event["action"], event["replica"], event["reason"]) == (
                "abort",
                "a",
                "admin: bad",
            )
        metrics = await scrape(session, b.admin_url)
        assert value_of(metrics, "canary_proxy_cluster_decision_lag_seconds_count") == 1
        assert value_of(metrics, "canary_proxy_cluster_connected") == 1

        # The operator's view from any replica: the fleet, every replica, what each applied.
        async def all_three_seen() -> bool:
            replicas = (await status_of(session, b))["cluster"]["replicas"]
            return {r["id"] for r in replicas} == {"a", "b", "c"}

        await eventually(all_three_seen, within=3.0)
        code, out, err = await run_cli("status", "--admin", b.admin_url)
        assert code == 0, err
        assert f"cluster {CLUSTER}: connected (this replica: b" in out
        rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[-3:]}
        assert set(rows) == {"a", "b", "c"}
        await eventually(lambda: _value(session, b, "canary_proxy_cluster_replicas", 3), within=3.0)


async def test_a_guard_rollback_on_one_replica_stops_the_canary_on_every_replica(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    guard = {"window": "5s", "min_requests": 10, "max_error_rate": 0.05}
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(tmp_path, "abc", stable, canary, redis, guard=guard) as (a, b, c),
        open_session() as session,
    ):
        await all_connected(session, (a, b, c))
        canary.answer_with(reply(500))
        # Only replica a's users meet the failing canary.
        results = await versions(session, a, 10, force="always")
        assert (500, "canary") in results
        tripped = await until_state(session, a, "aborted", within=3.0)
        reached = [await until_state(session, r, "aborted", within=3.0) for r in (b, c)]
        assert max(reached) - tripped <= REACH_SECONDS
        rollback = audit(a)[-1]
        assert (rollback["actor"], rollback["action"]) == ("guard", "rollback")
        for replica in (b, c):
            event = audit(replica)[-1]
            assert (event["action"], event["replica"]) == ("rollback", "a")
            assert {v for _, v in await versions(session, replica, 20, force="always")} == {
                "stable"
            }


async def test_a_replica_whose_subscription_dies_silently_still_gets_every_decision(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    """Finding 1: a's pub/sub connection goes silent (no FIN, no RST) while its other
    connections to Redis work. Its heartbeats and the subscription's own liveness must bring
    it the decisions it misses, then a subscription that works again."""
    async with (
        running_redis(tmp_path) as redis,
        running_relay(redis.port) as relay,
        running_proxy(replica_config(tmp_path, "a", stable, canary, relay), token=TOKEN) as a,
        running_fleet(tmp_path, "b", stable, canary, redis) as (b,),
        open_session() as session,
    ):
        await all_connected(session, (a, b))
        relay.freeze_subscriptions()
        status, _ = await admin(session, b, "POST", "/routes/shop/abort", {"reason": "b says"})
        assert status == 200
        await until_state(session, a, "aborted", within=5.0)
        await all_connected(session, (a,))
        status, _ = await admin(session, b, "POST", "/routes/shop/retry")
        assert status == 200
        await until_state(session, a, "steady", within=5.0)
        assert (await route_of(session, a))["weight"] == 50


# -- pooled evidence ---------------------------------------------------------------------------

POOLED_GUARD: Final[Document] = {"window": "10s", "min_requests": 30, "max_error_rate": 0.05}
PER_REPLICA: Final = 12  # three replicas: 36 canary requests, each replica 12 (< 30)


async def test_pooled_evidence_trips_a_breach_that_no_single_replicas_traffic_would(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    canary.answer_with(reply(500))
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(tmp_path, "abc", stable, canary, redis, guard=POOLED_GUARD) as replicas,
        open_session() as session,
    ):
        await all_connected(session, replicas)
        first, second, third = replicas
        for replica in (first, second):  # 24 canary requests in all: below min_requests
            results = await versions(session, replica, PER_REPLICA, force="always")
            assert set(results) == {(500, "canary")}
        # The third replica's requests take the fleet past min_requests: it may trip before
        # they are all sent, and the rest go to stable.
        assert set(await versions(session, third, PER_REPLICA, force="always")) <= {
            (500, "canary"),
            (200, "stable"),
        }
        for replica in replicas:
            await until_state(session, replica, "aborted", within=3.0)
        reasons = {(await route_of(session, r))["reason"] for r in replicas}
        assert len(reasons) == 1, reasons  # one decision, the fleet's
        (reason,) = reasons
        assert "fleet" in reason
        # Judged on more requests than any one replica sent (and no more than all sent).
        counted = re.search(r"\((\d+)/(\d+)\)", reason)
        assert counted is not None, reason
        assert POOLED_GUARD["min_requests"] <= int(counted[2]) <= 3 * PER_REPLICA, reason


async def test_three_independent_proxies_with_the_same_traffic_do_not_trip(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    canary.answer_with(reply(500))
    async with (
        running_fleet(tmp_path, "abc", stable, canary, None, guard=POOLED_GUARD) as replicas,
        open_session() as session,
    ):
        for replica in replicas:
            await versions(session, replica, PER_REPLICA, force="always")
        await asyncio.sleep(1.0)  # four guard ticks: a verdict would have been taken by now
        for replica in replicas:
            document = await route_of(session, replica)
            assert document["state"] == "steady", document
            assert document["verdict"]["verdict"] == "inconclusive", document
            assert document["fleet_window"] is None


async def test_pooled_evidence_below_min_requests_across_the_fleet_does_not_trip(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    """3 x 9 = 27 failed canary requests, below min_requests 30: counted once each (a replica
    that counted its own twice, or the fleet's, would trip)."""
    canary.answer_with(reply(500))
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(tmp_path, "abc", stable, canary, redis, guard=POOLED_GUARD) as replicas,
        open_session() as session,
    ):
        await all_connected(session, replicas)
        for replica in replicas:
            assert set(await versions(session, replica, 9, force="always")) == {(500, "canary")}

        async def all_pooled() -> bool:
            documents = [await route_of(session, r) for r in replicas]
            return all(
                (d["fleet_window"] or {}).get("canary", {}).get("requests") == 27 for d in documents
            )

        await eventually(all_pooled, within=5.0)
        for replica in replicas:
            document = await route_of(session, replica)
            assert document["state"] == "steady", document


@pytest.mark.slow
async def test_what_a_replica_counts_while_redis_is_away_never_joins_the_pool(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    """Finding 6: counts made while cut off, added on reconnect, would all land in the time
    slot of that moment (and with another replica's, trip on stale evidence)."""
    canary.answer_with(reply(500))
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(tmp_path, "a", stable, canary, redis, guard=POOLED_GUARD) as (a,),
        open_session() as session,
    ):
        await all_connected(session, (a,))
        await redis.kill()
        await eventually(lambda: _disconnected(session, (a,)), within=5.0)
        await versions(session, a, PER_REPLICA, force="always")  # 12 < 30: no local trip
        await redis.start()
        await all_connected(session, (a,))
        await versions(session, a, 1, force="always")

        async def pooled() -> int:
            window = (await route_of(session, a))["fleet_window"] or {}
            return int(window.get("canary", {}).get("requests", 0))

        async def counted() -> bool:
            return await pooled() > 0

        await eventually(counted, within=5.0)
        assert await pooled() == 1


# -- restarts ----------------------------------------------------------------------------------


async def test_a_replica_killed_with_sigkill_and_a_new_one_start_with_the_fleets_state(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    async with running_redis(tmp_path) as redis, open_session() as session:
        config_b = replica_config(tmp_path, "b", stable, canary, redis)
        async with running_fleet(tmp_path, "a", stable, canary, redis) as (a,):
            async with running_proxy(config_b, token=TOKEN) as b:
                await all_connected(session, (a, b))
                status, _ = await admin(session, a, "PUT", "/routes/shop/weight", {"weight": 20})
                assert status == 200
                await eventually(lambda: _weight(session, b, 20), within=3.0)
                b.process.send_signal(signal.SIGKILL)
                await b.process.wait()
            # While b is dead the fleet moves on.
            status, _ = await admin(session, a, "PUT", "/routes/shop/weight", {"weight": 7.5})
            assert status == 200
            assert saved_state_of(config_b)["weight_bp"] == 2000  # what b last knew

            async with (
                running_proxy(config_b, token=TOKEN) as b,
                running_fleet(tmp_path, "c", stable, canary, redis) as (c,),
            ):
                # Serving from the start at the fleet's weight, not its own state_dir's (b)
                # or its config's (c).
                for replica in (b, c):
                    document = await route_of(session, replica)
                    assert document["weight"] == 7.5, document
                assert saved_state_of(config_b)["weight_bp"] == 750


def saved_state_of(config_path: Path) -> Document:
    document: Document = json.loads((config_path.parent / "state" / "state.json").read_text())
    route: Document = document["routes"]["shop"]
    return route


async def _value(
    session: aiohttp.ClientSession, proxy: ProxyProcess, name: str, expected: float
) -> bool:
    return value_of(await scrape(session, proxy.admin_url), name) == expected


async def _weight(session: aiohttp.ClientSession, proxy: ProxyProcess, weight: float) -> bool:
    return bool((await route_of(session, proxy))["weight"] == weight)


async def test_without_redis_a_replica_starts_from_its_state_dir_and_serves(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    async with running_redis(tmp_path) as redis:
        config = replica_config(tmp_path, "a", stable, canary, redis)
        async with running_proxy(config, token=TOKEN) as a, open_session() as session:
            await all_connected(session, (a,))
            status, _ = await admin(session, a, "POST", "/routes/shop/abort", {})
            assert status == 200
    # Redis is gone now.
    async with running_proxy(config, token=TOKEN) as a, open_session() as session:
        document = await route_of(session, a)
        assert (document["state"], document["weight"]) == ("aborted", 0)
        assert {v for _, v in await versions(session, a, 20)} == {"stable"}
        assert not await connected(session, a)


# -- Redis lost under load -----------------------------------------------------------------


@pytest.mark.slow
async def test_with_redis_killed_under_load_nothing_fails_no_weight_rises_and_the_fleet_converges(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    guard = {"window": "5s", "min_requests": 10, "max_error_rate": 0.05}
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(tmp_path, "ab", stable, canary, redis, guard=guard, weight=20) as (a, b),
        open_session() as session,
    ):
        await all_connected(session, (a, b))
        loads = [Traffic(replica.url, 4, 200.0) for replica in (a, b)]
        for load in loads:
            load.start()
        try:
            await eventually(lambda: _answered(loads) > 100, within=5.0)
            await redis.kill()
            await eventually(lambda: _disconnected(session, (a, b)), within=5.0)
            served = _answered(loads)
            await eventually(lambda: _answered(loads) > served + 200, within=5.0)  # still serving

            # Nothing raises a weight while Redis is away; lowering still works.
            status, document = await admin(session, a, "PUT", "/routes/shop/weight", {"weight": 40})
            assert status == 503, document
            assert "unreachable" in document["error"]
            status, _ = await admin(session, a, "POST", "/routes/shop/promote?to=100")
            assert status == 503
            status, document = await admin(session, a, "PUT", "/routes/shop/weight", {"weight": 10})
            assert (status, document["weight"]) == (200, 10)
            assert (await route_of(session, b))["weight"] == 20  # b cannot hear of it

            # b's own guard still rolls back, on b's own traffic.
            canary.answer_with(reply(500))
            await versions(session, b, 12, force="always")
            await until_state(session, b, "aborted", within=3.0)

            back = time.time()
            await redis.start()
            # Reconciled: b's abort wins over a's older set-weight, on both.
            await until_state(session, a, "aborted", within=CONVERGE_SECONDS + 2)
            assert time.time() - back <= CONVERGE_SECONDS
            await eventually(lambda: _all_connected(session, (a, b)), within=CONVERGE_SECONDS)
        finally:
            for load in loads:
                await load.finish()
        for load in loads:
            assert load.failures == [], load.failures[:5]
            # Every answer came from an upstream: none made by the proxy while Redis was away.
            assert {s.status for s in load.seen} <= {200, 500}


def _answered(loads: Sequence[Traffic]) -> int:
    return sum(len(load.seen) for load in loads)


async def _disconnected(session: aiohttp.ClientSession, replicas: Sequence[ProxyProcess]) -> bool:
    return not any([await connected(session, r) for r in replicas])


async def _all_connected(session: aiohttp.ClientSession, replicas: Sequence[ProxyProcess]) -> bool:
    return all([await connected(session, r) for r in replicas])


async def test_a_raise_is_refused_while_redis_is_silently_unreachable_and_not_yet_noticed(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    """Finding 5: a partition (no FIN, no RST) is noticed a heartbeat or two later; a raise
    asked for meanwhile is written to the fleet first, so it is refused, not applied alone."""
    async with (
        running_redis(tmp_path) as redis,
        running_relay(redis.port) as relay,
        running_proxy(
            replica_config(tmp_path, "a", stable, canary, relay, weight=10), token=TOKEN
        ) as a,
        open_session() as session,
    ):
        await all_connected(session, (a,))
        relay.partition()
        status, document = await admin(session, a, "PUT", "/routes/shop/weight", {"weight": 40})
        assert status == 503, document
        assert "unreachable" in document["error"]
        assert (await route_of(session, a))["weight"] == 10
        # Lowering needs no fleet: applied at once.
        status, document = await admin(session, a, "PUT", "/routes/shop/weight", {"weight": 5})
        assert (status, document["weight"]) == (200, 5)
        relay.heal()
        await all_connected(session, (a,))
        status, document = await admin(session, a, "PUT", "/routes/shop/weight", {"weight": 40})
        assert (status, document["weight"]) == (200, 40)


@pytest.mark.slow
async def test_a_ramp_holds_while_redis_is_silently_unreachable(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    """Finding 5: the lease holder cut off from Redis (not yet noticed, its lease renewed a
    moment ago) must not take the next step alone; it takes it once Redis is back."""
    rollout = {"steps": [10, 30, 60], "interval": "1s"}
    async with (
        running_redis(tmp_path) as redis,
        running_relay(redis.port) as relay,
        running_proxy(
            replica_config(tmp_path, "a", stable, canary, relay, weight=None, rollout=rollout),
            token=TOKEN,
        ) as a,
        open_session() as session,
    ):
        load = Traffic(a.url, 2, 100.0)
        load.start()
        try:
            await eventually(lambda: _weight(session, a, 30), within=10.0, every=0.005)
            # Cut off just after a heartbeat got through: noticed only once the next one
            # times out, 1.5 s on; the next step is due within a second.
            relay.partition_after_answer_to(b"HGETALL")
            await eventually(lambda: relay.partitioned, within=2.0)
            weights = set()
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # watching that nothing happens, for 3 s
                weights.add((await route_of(session, a))["weight"])
                await asyncio.sleep(0.05)
            assert weights == {30}, weights
            relay.heal()
            await eventually(lambda: _weight(session, a, 60), within=10.0)
        finally:
            await load.finish()


# -- one ramp ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_ramp_advances_exactly_once_per_step_across_the_fleet(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    guard = {"window": "2s", "min_requests": 1, "max_error_rate": 0.5}
    rollout = {"steps": [10, 30, 60], "interval": "1s"}
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(
            tmp_path, "abc", stable, canary, redis, weight=None, guard=guard, rollout=rollout
        ) as replicas,
        open_session() as session,
    ):
        loads = [Traffic(replica.url, 2, 100.0) for replica in replicas]
        for load in loads:
            load.start()
        try:
            for replica in replicas:
                await until_state(session, replica, "promoted", within=15.0)
        finally:
            for load in loads:
                await load.finish()
        for replica in replicas:
            steps = [
                (e["weight_before_bp"], e["weight_after_bp"])
                for e in audit(replica)
                if e["action"] == "advance"
            ]
            assert steps == [(1000, 3000), (3000, 6000), (6000, 10_000)], audit(replica)
        # One decision per step, made once: the same event (same time) in every replica's log.
        decisions = advances(dict(zip("abc", replicas, strict=True)))
        assert len(decisions) == 3, decisions
        # Each by one replica, and a full interval after the one before.
        assert all(len(deciders) == 1 for deciders in decisions.values()), decisions
        times = sorted(at for _, at in decisions)
        assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(times)), times


def advances(replicas: dict[str, ProxyProcess]) -> dict[tuple[int, float], set[str]]:
    """Every ramp step in the replicas' audit logs, (weight before, when decided): the
    replicas that decided it (its own event names no replica; a followed one, the decider)."""
    decided: dict[tuple[int, float], set[str]] = {}
    for name, replica in replicas.items():
        for event in audit(replica):
            if event["action"] == "advance":
                key = (event["weight_before_bp"], event["at"])
                decided.setdefault(key, set()).add(event.get("replica", name))
    return decided


@pytest.mark.slow
async def test_when_the_lease_holder_dies_another_replica_finishes_the_ramp(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    guard = {"window": "2s", "min_requests": 1, "max_error_rate": 0.5}
    rollout = {"steps": [10, 30, 60], "interval": "1s"}
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(
            tmp_path, "abc", stable, canary, redis, weight=None, guard=guard, rollout=rollout
        ) as replicas,
        open_session() as session,
    ):
        loads = [Traffic(replica.url, 2, 100.0) for replica in replicas]
        for load in loads:
            load.start()
        try:
            await all_connected(session, replicas)

            async def holders() -> list[ProxyProcess]:
                documents = [await status_of(session, r) for r in replicas]
                return [
                    r
                    for r, d in zip(replicas, documents, strict=True)
                    if d["cluster"]["ramp_lease"]
                ]

            async def one_holder() -> bool:
                return len(await holders()) == 1

            await eventually(one_holder, within=5.0)
            (holder,) = await holders()
            await until_state(session, holder, "progressing", within=3.0)
            holder.process.send_signal(signal.SIGKILL)
            await holder.process.wait()
            killed = time.time()
            survivors = [r for r in replicas if r is not holder]

            async def taken_over() -> bool:
                documents = [await status_of(session, r) for r in survivors]
                return sum(bool(d["cluster"]["ramp_lease"]) for d in documents) == 1

            await eventually(taken_over, within=10.0)
            assert time.time() - killed <= 5.0  # the contract: within the lease's TTL (<= 5 s)
            for replica in survivors:
                await until_state(session, replica, "promoted", within=15.0)
            named = dict(zip("abc", replicas, strict=True))
            alive = {n: r for n, r in named.items() if r is not holder}
            after = {k: v for k, v in advances(alive).items() if k[1] > killed}
            assert after, advances(alive)  # the survivors moved the ramp on
            assert all(deciders <= set(alive) for deciders in after.values()), after
        finally:
            for load in loads:
                with contextlib.suppress(TimeoutError):
                    await load.finish()


# -- workers and a password --------------------------------------------------------------------


async def test_with_worker_processes_the_supervisor_is_the_replica_and_every_worker_obeys(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(tmp_path, "a", stable, canary, redis, workers=2) as (a,),
        running_fleet(tmp_path, "b", stable, canary, redis) as (b,),
        open_session() as session,
    ):
        await all_connected(session, (a, b))
        assert len((await status_of(session, a))["workers"]) == 2
        status, _ = await admin(session, b, "POST", "/routes/shop/abort", {"reason": "b says"})
        assert status == 200
        await until_state(session, a, "aborted", within=3.0)
        # Many connections: the kernel spreads them over both workers.
        async with open_session(force_close=True) as fresh:
            seen = {v for _, v in await versions(fresh, a, 60, force="always")}
        assert seen == {"stable"}


async def test_a_password_from_the_environment_lets_a_replica_in_and_a_wrong_one_does_not(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    variable = "CANARY_PROXY_TEST_REDIS_PASSWORD"
    async with running_redis(tmp_path, password="s3cret") as redis, open_session() as session:
        right = replica_config(tmp_path, "a", stable, canary, redis, password_env=variable)
        wrong = replica_config(tmp_path, "b", stable, canary, redis, password_env=variable)
        async with (
            running_proxy(right, token=TOKEN, env={**os.environ, variable: "s3cret"}) as a,
            running_proxy(wrong, token=TOKEN, env={**os.environ, variable: "nope"}) as b,
        ):
            await all_connected(session, (a,))
            assert not await connected(session, b)
            # Cut off, b still serves, from its own state.
            assert {s for s, _ in await versions(session, b, 20)} == {200}
            assert "redis" in b.logged().lower()
            assert "s3cret" not in a.logged() + b.logged()


async def test_two_processes_with_one_replica_id_are_told_so(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    async with running_redis(tmp_path) as redis, open_session() as session:
        first = replica_config(tmp_path, "a", stable, canary, redis)
        twin = tmp_path / "twin"
        twin.mkdir()
        (twin / "proxy.yaml").write_text(first.read_text())
        async with (
            running_proxy(first, token=TOKEN) as a,
            running_proxy(twin / "proxy.yaml", token=TOKEN) as b,
        ):
            await all_connected(session, (a, b))

            def told() -> bool:
                return "another process also runs as replica 'a'" in a.logged() + b.logged()

            await eventually(told, within=5.0)


@pytest.mark.slow
async def test_an_abort_made_while_redis_was_away_survives_a_restart_and_wins_on_reconnect(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(tmp_path, "a", stable, canary, redis) as (a,),
        open_session() as session,
    ):
        config_b = replica_config(tmp_path, "b", stable, canary, redis)
        async with running_proxy(config_b, token=TOKEN) as b:
            await all_connected(session, (a, b))
            await redis.kill()
            await eventually(lambda: _disconnected(session, (a, b)), within=5.0)
            status, _ = await admin(session, b, "POST", "/routes/shop/abort", {"reason": "cut"})
            assert status == 200
            b.process.send_signal(signal.SIGKILL)
            await b.process.wait()
        async with running_proxy(config_b, token=TOKEN) as b:  # Redis still away
            assert (await route_of(session, b))["state"] == "aborted"  # from its state_dir
            assert (await route_of(session, a))["state"] == "steady"
            await redis.start()  # empty: it kept nothing
            await until_state(session, a, "aborted", within=CONVERGE_SECONDS)
            await eventually(lambda: _all_connected(session, (a, b)), within=CONVERGE_SECONDS)
            assert (await route_of(session, b))["state"] == "aborted"
            taken = audit(a)[-1]
            assert (taken["action"], taken["after"], taken["replica"]) == (
                "restore",
                "aborted",
                "b",
            )
            assert taken["reason"] == "taken from the fleet: admin: cut"


async def test_a_redis_that_hangs_blocks_no_request_and_the_replica_serves_degraded(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    async with (
        running_redis(tmp_path) as redis,
        running_fleet(tmp_path, "a", stable, canary, redis) as (a,),
        open_session() as session,
    ):
        await all_connected(session, (a,))
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)  # alive, connected, answering nothing
        try:
            # Served while Redis still hangs: nothing on the request path waits for it.
            assert {s for s, _ in await versions(session, a, 50)} == {200}
            await eventually(lambda: _disconnected(session, (a,)), within=5.0)
            status, document = await admin(session, a, "POST", "/routes/shop/promote?to=100")
            assert status == 503, document
            assert {s for s, _ in await versions(session, a, 50)} == {200}
        finally:
            redis.process.send_signal(signal.SIGCONT)
        await eventually(lambda: _all_connected(session, (a,)), within=CONVERGE_SECONDS)
        status, _ = await admin(session, a, "PUT", "/routes/shop/weight", {"weight": 60})
        assert status == 200  # raising works again once Redis answers
