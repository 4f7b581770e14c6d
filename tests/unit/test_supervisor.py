"""Workers and their supervisor, in one process: what a worker reports and is told, and how the
supervisor adds reports up — one guard and one set of counters for all workers (the channel's
framing: test_channel.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import re
from bisect import bisect_left
from collections.abc import AsyncIterator
from dataclasses import replace
from time import monotonic
from typing import cast

import pytest
from configs import guarded
from socket_pairs import channel

import proxy.control.supervisor as supervisor_module
from proxy.control.channel import (
    Configure,
    Counters,
    Draining,
    Ready,
    Report,
    States,
    Sync,
    Synced,
    Tallied,
    receive,
    send,
)
from proxy.control.controller import RouteStates
from proxy.control.counters import SharedCounters, create_block
from proxy.control.holder import RuntimeHolder
from proxy.control.supervisor import Backoff, WorkerHandle, WorkerPool, worker_count
from proxy.control.worker import Worker
from proxy.core.config import Config, Upstream
from proxy.core.window import LATENCY_BOUNDS, Tally
from proxy.dataplane.outcomes import DURATION_BUCKETS, CounterMemory, StatsDelta, VersionStats
from proxy.dataplane.runtime import RouteRuntime

FAST = 0.01  # seconds: every response of these tests lands in one latency bucket
FAST_BUCKET = 22  # its index into LATENCY_BOUNDS
V3 = {"upstreams": ["http://127.0.0.1:9002"], "revision": "v3"}


def config(**route: object) -> Config:
    return guarded("127.0.0.1:0", **route)


def shop(holder: RuntimeHolder) -> RouteRuntime:
    return holder.current.routes["shop"]


def tally(evidence: object) -> Tally:
    assert isinstance(evidence, Tally)
    return evidence


def serve(worker: Worker, *, ok: int, errors: int, version: str = "canary") -> None:
    """Count responses the way a worker's data path does: stats, then the route's tally."""
    route = shop(worker.holder)
    canary = version == "canary"
    stats = route.canary_stats if canary else route.stable_stats
    evidence = tally(route.state.canary_evidence if canary else route.state.stable_evidence)
    for error in [False] * ok + [True] * errors:
        stats.observe(503 if error else 200, FAST)
        evidence.record(monotonic(), error=error, latency=FAST)
        if error and canary:
            worker.holder.controller.canary_failed(route.name, route.state)


def report(*tallies: tuple[str, int, bool, int, int]) -> Report:
    """A report of tallies alone (route, epoch, canary?, requests, errors), all fast."""
    return Report(
        stats=[],
        rejected={},
        tallies=[(r, e, c, n, err, ((FAST_BUCKET, n),)) for r, e, c, n, err in tallies],
        connections=0,
    )


def counted(*stats: Counters) -> Report:
    """A report of counters alone."""
    return Report(stats=list(stats), rejected={}, tallies=[], connections=0)


def take(pool: WorkerPool, report: Report) -> None:
    """The supervisor takes `report` as from its first worker."""
    pool.take(pool.workers[0], report)


def delta(codes: dict[int, int], duration: float = FAST) -> StatsDelta:
    stats = VersionStats()
    for code, n in codes.items():
        for _ in range(n):
            stats.observe(code, duration)
    found = stats.since(VersionStats())
    assert found is not None
    return found


@contextlib.asynccontextmanager
async def in_process(
    worker_config: Config, states: RouteStates | None = None, memory: CounterMemory | None = None
) -> AsyncIterator[Worker]:
    """A worker built in this process, following `states` if given (as `serve` does)."""
    async with channel() as (reader, writer, _, _):
        worker = Worker(reader, writer, worker_config, memory)
        if states is not None:
            worker.holder.controller.follow(states)
        yield worker


# -- how many workers -------------------------------------------------------------------------


def test_auto_is_one_worker_per_cpu_this_process_may_run_on_and_a_number_is_that_many(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert worker_count(3) == 3
    assert worker_count(1) == 1
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})  # e.g. taskset 0x25
    assert worker_count("auto") == 3


# -- what a worker reports -----------------------------------------------------------------------


async def test_a_worker_reports_its_counts_and_tallies_since_the_previous_report() -> None:
    async with in_process(config()) as worker:
        epoch = shop(worker.holder).state.epoch
        serve(worker, ok=3, errors=1)
        serve(worker, ok=2, errors=0, version="stable")
        shop(worker.holder).canary_stats.upstream_error("connect")
        worker.holder.outcomes.record_rejected(400)
        worker.holder.outcomes.record_rejected(400)

        first = worker.collect()
        assert [(r, v, d[0], d[3]) for r, v, _, d in first.stats] == [
            ("shop", "canary", {200: 3, 503: 1}, {"connect": 1}),
            ("shop", "stable", {200: 2}, {}),
        ]
        canary_delta = first.stats[0][3]
        assert canary_delta[1][DURATION_BUCKETS.index(FAST)] == 4
        assert canary_delta[2] == pytest.approx(4 * FAST)
        assert first.rejected == {400: 2}
        assert sorted(first.tallies) == [
            ("shop", epoch, False, 2, 0, ((FAST_BUCKET, 2),)),
            ("shop", epoch, True, 4, 1, ((FAST_BUCKET, 4),)),
        ]
        assert first.connections == 0

        assert worker.collect() == Report(stats=[], rejected={}, tallies=[], connections=0)

        serve(worker, ok=1, errors=0, version="stable")
        worker.holder.outcomes.record_rejected(431)
        third = worker.collect()
        assert [(r, v, d[0]) for r, v, _, d in third.stats] == [("shop", "stable", {200: 1})]
        assert third.rejected == {431: 1}
        assert third.tallies == [("shop", epoch, False, 1, 0, ((FAST_BUCKET, 1),))]


async def test_a_reports_tally_carries_the_epoch_its_supervisor_gave() -> None:
    async with in_process(config(), {"shop": (1000, False, 41)}) as worker:
        serve(worker, ok=1, errors=1)
        assert [t[:2] for t in worker.collect().tallies] == [("shop", 41)]


async def test_what_an_old_epochs_tally_counted_is_never_reported() -> None:
    async with in_process(config()) as worker:
        epoch = shop(worker.holder).state.epoch
        serve(worker, ok=5, errors=5)
        worker.apply(States(states={"shop": (1000, False, epoch + 1)}))
        serve(worker, ok=1, errors=0)
        assert worker.collect().tallies == [("shop", epoch + 1, True, 1, 0, ((FAST_BUCKET, 1),))]


async def test_a_route_without_a_guard_reports_stats_but_no_tallies() -> None:
    async with in_process(config(guard=None)) as worker:
        route = shop(worker.holder)
        assert route.state.canary_evidence is None
        route.canary_stats.observe(200, FAST)
        collected = worker.collect()
        assert [(r, v, d[0]) for r, v, _, d in collected.stats] == [("shop", "canary", {200: 1})]
        assert collected.tallies == []


async def test_a_route_dropped_and_added_again_between_reports_counts_from_zero() -> None:
    async with in_process(config()) as worker:
        for _ in range(3):
            shop(worker.holder).canary_stats.observe(200, FAST)
        worker.collect()
        # Two reloads within one report interval.
        worker.apply(Configure(config=config(name="blog"), states={}, listen=None))
        worker.apply(Configure(config=config(), states={}, listen=None))
        for _ in range(2):
            shop(worker.holder).canary_stats.observe(200, FAST)
        assert [(r, v, d[0]) for r, v, _, d in worker.collect().stats] == [
            ("shop", "canary", {200: 2})
        ]


async def test_a_route_dropped_and_added_again_across_reports_counts_from_zero() -> None:
    async with in_process(config()) as worker:
        for _ in range(3):
            shop(worker.holder).canary_stats.observe(200, FAST)
        worker.collect()
        worker.apply(Configure(config=config(name="blog"), states={}, listen=None))
        worker.collect()
        worker.apply(Configure(config=config(), states={}, listen=None))
        for _ in range(2):
            shop(worker.holder).canary_stats.observe(200, FAST)
        assert [(r, v, d[0]) for r, v, _, d in worker.collect().stats] == [
            ("shop", "canary", {200: 2})
        ]


# -- what a worker is told -----------------------------------------------------------------------


async def test_a_worker_takes_its_supervisors_weights_and_aborts() -> None:
    async with in_process(config()) as worker:
        route = shop(worker.holder)
        worker.apply(States(states={"shop": (0, True, route.state.epoch)}))
        assert (route.state.weight_bp, route.state.aborted) == (0, True)
        worker.apply(States(states={"shop": (2500, False, route.state.epoch)}))
        assert (route.state.weight_bp, route.state.aborted) == (2500, False)


async def test_canary_errors_send_one_report_at_once_without_waiting_for_the_interval() -> None:
    async with channel() as (reader, writer, supervisor, _):
        worker = Worker(reader, writer, config())
        epoch = shop(worker.holder).state.epoch
        serve(worker, ok=2, errors=3)  # three errors, one report
        sent = await asyncio.wait_for(receive(supervisor), timeout=5)
        assert isinstance(sent, Report)
        assert sent.tallies == [("shop", epoch, True, 5, 3, ((FAST_BUCKET, 5),))]
        send(writer, Draining())
        assert await asyncio.wait_for(receive(supervisor), timeout=5) == Draining()
        assert worker.collect().tallies == []  # the report took them


async def test_a_new_config_and_its_states_are_applied_together() -> None:
    async with in_process(config()) as worker:
        epoch = shop(worker.holder).state.epoch
        new = config(canary=V3, split={"weight": 50})
        worker.apply(
            Configure(config=new, states={"shop": (0, True, epoch + 5)}, listen=new.listen)
        )
        route = shop(worker.holder)
        assert worker.holder.current.config is new
        assert route.route.canary is not None
        assert route.route.canary.revision == "v3"
        assert (route.state.weight_bp, route.state.aborted, route.state.epoch) == (
            0,
            True,
            epoch + 5,
        )


async def test_a_worker_that_cannot_build_a_config_drains_on_the_old_one_to_be_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with in_process(config()) as worker:
        old = worker.holder.current.config
        before = worker.holder.controller.route_states()
        (route,) = config(canary=V3).routes
        broken = replace(route, stable=replace(route.stable, upstreams=(cast(Upstream, None),)))
        new = replace(old, routes=(broken,))  # the runtime cannot be built from it
        with caplog.at_level(logging.ERROR, logger="canary_proxy"):
            worker.apply(Configure(config=new, states={"shop": (0, True, 9)}, listen=new.listen))
        assert "cannot apply the new config; draining, to be started again" in caplog.text
        assert worker.stopping.is_set()  # its supervisor starts it again, on the new config
        assert worker.holder.current.config is old  # what it drains with
        assert worker.holder.controller.route_states() == before


async def test_a_message_a_worker_does_not_know_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with in_process(config()) as worker:
        before = worker.holder.controller.route_states()
        with caplog.at_level(logging.ERROR, logger="canary_proxy"):
            worker.apply(Ready(pid=1))  # one for the supervisor
        assert "unknown message" in caplog.text
        assert worker.holder.controller.route_states() == before


@pytest.mark.parametrize(
    ("junk", "says"),
    [
        pytest.param(pickle.dumps(("states", {})), "a frame holding a tuple", id="unknown"),
        pytest.param(
            b"not a pickle", "a frame of 12 bytes that cannot be decoded", id="undecodable"
        ),
    ],
)
async def test_a_frame_that_is_not_a_message_is_logged_and_the_worker_keeps_following(
    junk: bytes, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with channel() as (reader, writer, supervisor_reader, supervisor):
        worker = Worker(reader, writer, config())
        epoch = shop(worker.holder).state.epoch
        listening = asyncio.create_task(worker._listen())
        try:
            with caplog.at_level(logging.ERROR, logger="canary_proxy"):
                supervisor.write(len(junk).to_bytes(4, "big") + junk)
                send(supervisor, States(states={"shop": (2500, False, epoch)}))
                send(supervisor, Sync(number=1))
                async with asyncio.timeout(5):
                    assert await receive(supervisor_reader) == Synced(number=1)
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
        assert f"cannot read a message from the supervisor: {says}" in caplog.text
        assert (shop(worker.holder).state.weight_bp, shop(worker.holder).state.aborted) == (
            2500,
            False,
        )
        assert not worker.stopping.is_set()


# -- the supervisor adds reports up --------------------------------------------------------------


async def test_a_message_the_supervisor_does_not_know_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = WorkerPool(RuntimeHolder(config()), 1)
    handle = pool.workers[0]
    with caplog.at_level(logging.ERROR, logger="canary_proxy"):
        pool._heard(handle, Sync(number=1))  # one for a worker
    assert "worker 0 sent an unknown message: Sync" in caplog.text
    assert not handle.ready.is_set()
    assert handle.requests == 0


async def test_two_workers_below_min_requests_alone_trip_one_guard_together() -> None:
    leader = RuntimeHolder(config())  # min_requests 20, max_error_rate 5 %
    pool = WorkerPool(leader, 2)
    states = leader.controller.route_states()
    async with in_process(config(), states) as one, in_process(config(), states) as two:
        serve(one, ok=8, errors=2)  # 10 requests: too few to judge, in either worker
        serve(two, ok=8, errors=2)
        take(pool, one.collect())
        live = shop(leader).state
        assert not live.aborted
        assert live.assessment is not None
        assert live.assessment.verdict == "inconclusive"  # judged on arrival: it had errors
        take(pool, two.collect())
        assert live.aborted  # 4 errors in 20 requests, over both workers
        assert live.weight_bp == 0
        assert leader.outcomes.rollbacks == {("shop", "error_rate"): 1}
        for worker in (one, two):  # the next states message reaches every worker
            worker.apply(States(states=leader.controller.route_states()))
            assert (shop(worker.holder).state.weight_bp, shop(worker.holder).state.aborted) == (
                0,
                True,
            )


async def test_a_report_with_canary_errors_is_judged_on_arrival_and_one_without_is_not() -> None:
    leader = RuntimeHolder(config())
    pool = WorkerPool(leader, 1)
    live = shop(leader).state
    take(pool, report(("shop", live.epoch, True, 30, 0), ("shop", live.epoch, False, 30, 30)))
    assert live.assessment is None  # left for the tick
    assert not live.aborted
    take(pool, report(("shop", live.epoch, True, 1, 1)))
    assert live.assessment is not None
    assert live.assessment.verdict == "healthy"  # 1 error in 31 requests
    take(pool, report(("shop", live.epoch, True, 10, 10)))
    assert live.aborted


async def test_slow_canary_responses_reported_by_workers_trip_the_guard_on_the_tick() -> None:
    leader = RuntimeHolder(
        config(guard={"window": "10s", "min_requests": 20, "max_p99_latency": "500ms"})
    )
    pool = WorkerPool(leader, 2)
    live = shop(leader).state
    slow = bisect_left(LATENCY_BOUNDS, 2.0)
    for _ in range(2):  # two workers, 15 slow responses each, no errors
        tallied: Tallied = ("shop", live.epoch, True, 15, 0, ((slow, 15),))
        take(pool, Report(stats=[], rejected={}, tallies=[tallied], connections=0))
    assert not live.aborted  # no error: left for the tick
    leader.controller.tick(leader.canary_stats)
    assert live.aborted
    assert leader.outcomes.rollbacks == {("shop", "latency"): 1}


async def test_a_report_of_an_old_epoch_is_ignored() -> None:
    leader = RuntimeHolder(config())
    pool = WorkerPool(leader, 1)
    live = shop(leader).state
    leader.controller.act("shop", "abort", leader.canary_stats("shop"), reason="bad")
    old = live.epoch
    leader.controller.act("shop", "retry", leader.canary_stats("shop"))
    take(pool, report(("shop", old, True, 40, 40), ("shop", old, False, 40, 0)))
    assert not live.aborted
    assert live.canary_window is not None
    assert live.stable_window is not None
    assert live.canary_window.snapshot(monotonic()).requests == 0
    assert live.stable_window.snapshot(monotonic()).requests == 0
    take(pool, report(("shop", live.epoch, True, 40, 40)))  # the current epoch does count
    assert live.aborted


async def test_a_report_for_a_route_no_longer_in_the_config_adds_no_series() -> None:
    leader = RuntimeHolder(config())
    pool = WorkerPool(leader, 1)
    epoch = shop(leader).state.epoch
    leader.swap(config(name="blog"))
    late = Report(
        stats=[("shop", "canary", -1, delta({503: 4})), ("blog", "stable", -1, delta({200: 1}))],
        rejected={},
        tallies=[("shop", epoch, True, 40, 40, ((FAST_BUCKET, 40),))],
        connections=1,
    )
    take(pool, late)
    assert {route for route, _, _ in leader.outcomes.series()} == {"blog"}
    assert leader.outcomes.requests == {("blog", "stable", 200): 1}
    assert "shop" not in leader.controller.live


async def test_every_workers_counts_add_up_in_the_supervisors_recorder() -> None:
    leader = RuntimeHolder(config())
    pool = WorkerPool(leader, 2)
    states = leader.controller.route_states()
    async with in_process(config(), states) as one, in_process(config(), states) as two:
        workers = (one, two)
        for round_ in range(3):
            for index, worker in enumerate(workers):
                serve(worker, ok=index + 1, errors=0, version="stable")
                serve(worker, ok=1, errors=0)
                shop(worker.holder).stable_stats.observe(404, 0.2 * (round_ + 1))
                shop(worker.holder).stable_stats.upstream_error("timeout")
                worker.holder.outcomes.record_rejected(400)
                take(pool, worker.collect())
            take(pool, one.collect())  # nothing new: adds nothing
        for version in ("stable", "canary"):
            total = leader.outcomes.stats_for("shop", version)
            each = [w.holder.outcomes.stats_for("shop", version) for w in workers]
            assert total.codes == {
                code: sum(s.codes.get(code, 0) for s in each)
                for code in set().union(*(s.codes for s in each))
            }
            assert total.buckets == [sum(b) for b in zip(*(s.buckets for s in each), strict=True)]
            assert total.duration_sum == pytest.approx(sum(s.duration_sum for s in each))
            assert total.upstream_errors == {
                kind: sum(s.upstream_errors[kind] for s in each) for kind in total.upstream_errors
            }
        assert leader.outcomes.requests == {
            ("shop", "stable", 200): 9,
            ("shop", "stable", 404): 6,
            ("shop", "canary", 200): 6,
        }
        assert leader.outcomes.upstream_errors == {("shop", "stable", "timeout"): 6}
        assert leader.outcomes.rejected == {400: 6}
        # One guard: the tallies of both workers are in the supervisor's windows.
        live = shop(leader).state
        assert live.stable_window is not None
        assert live.canary_window is not None
        assert live.stable_window.snapshot(monotonic()).requests == 9
        assert live.canary_window.snapshot(monotonic()).requests == 6
        assert live.canary_window.snapshot(monotonic()).p99 == LATENCY_BOUNDS[FAST_BUCKET]


async def test_counts_added_from_reports_survive_a_reload_that_keeps_the_route() -> None:
    leader = RuntimeHolder(config())
    pool = WorkerPool(leader, 1)
    take(pool, counted(("shop", "canary", -1, delta({200: 2}))))
    leader.swap(config(split={"weight": 20}))
    take(pool, counted(("shop", "canary", -1, delta({200: 3}))))
    assert leader.outcomes.requests == {("shop", "canary", 200): 5}
    assert shop(leader).canary_stats.requests == 5  # the data path's object is the same one


# -- what a worker that has gone leaves behind ----------------------------------------------------


@contextlib.asynccontextmanager
async def supervised() -> AsyncIterator[tuple[WorkerPool, Worker, int]]:
    """A supervisor's pool of one, the worker of its slot 0 (in this process) and the
    supervisor's descriptor of that worker's counter block."""
    pool = WorkerPool(RuntimeHolder(config()), 1)
    block = create_block(capacity=8)
    try:
        async with in_process(config(), memory=SharedCounters(os.dup(block))) as worker:
            yield pool, worker, block
    finally:
        os.close(block)


async def test_what_a_gone_worker_counted_after_its_last_report_is_recovered_once() -> None:
    async with supervised() as (pool, worker, block):
        leader, handle = pool.holder, pool.workers[0]
        serve(worker, ok=3, errors=1)
        worker.holder.outcomes.record_rejected(400)
        pool.take(handle, worker.collect())
        # Counted after the last report, as by a worker then killed with SIGKILL.
        serve(worker, ok=2, errors=2)
        serve(worker, ok=1, errors=0, version="stable")
        worker.holder.outcomes.record_rejected(431)
        pool.recover(handle, block)

    assert leader.outcomes.requests == {
        ("shop", "canary", 200): 5,
        ("shop", "canary", 503): 3,
        ("shop", "stable", 200): 1,
    }
    assert leader.outcomes.rejected == {400: 1, 431: 1}
    assert handle.requests == 9
    assert shop(leader).canary_stats.duration_sum == pytest.approx(8 * FAST)


async def test_a_worker_whose_last_report_had_it_all_leaves_nothing_to_recover(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with supervised() as (pool, worker, block):
        leader, handle = pool.holder, pool.workers[0]
        serve(worker, ok=3, errors=1)
        pool.take(handle, worker.collect())
        serve(worker, ok=2, errors=0, version="stable")
        pool.take(handle, worker.collect())  # a draining worker's last report
        with caplog.at_level(logging.INFO, logger="canary_proxy"):
            pool.recover(handle, block)

    assert leader.outcomes.requests == {
        ("shop", "canary", 200): 3,
        ("shop", "canary", 503): 1,
        ("shop", "stable", 200): 2,
    }
    assert handle.requests == 6
    assert "recovered" not in caplog.text


async def test_a_gone_workers_counts_for_a_route_a_reload_removed_are_not_recovered() -> None:
    async with supervised() as (pool, worker, block):
        serve(worker, ok=2, errors=0)
        pool.holder.swap(config(name="blog"))
        pool.recover(pool.workers[0], block)
    assert pool.holder.outcomes.requests == {}


async def test_a_block_that_cannot_be_read_costs_the_recovery_not_the_supervisor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = WorkerPool(RuntimeHolder(config()), 1)
    not_a_block = os.memfd_create("empty")
    try:
        with caplog.at_level(logging.ERROR, logger="canary_proxy"):
            pool.recover(pool.workers[0], not_a_block)
    finally:
        os.close(not_a_block)
    assert "worker 0: cannot read its counters" in caplog.text


# -- restarts and broadcasts -------------------------------------------------------------------


def test_a_worker_that_keeps_dying_waits_longer_each_time_up_to_5s() -> None:
    backoff = Backoff()
    pauses = [backoff.pause(uptime=0.5) for _ in range(8)]
    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


def test_a_worker_that_had_lived_10s_before_dying_starts_from_the_first_pause() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.pause(uptime=0.5)
    assert backoff.pause(uptime=10.0) == 0.1
    assert backoff.pause(uptime=9.9) == 0.2  # and doubles again if it dies young


async def test_a_burst_of_decisions_reaches_each_worker_as_one_message_of_the_last_states() -> None:
    leader = RuntimeHolder(config())
    pool = WorkerPool(leader, 2)
    async with channel() as (_, first, first_end, _), channel() as (_, second, second_end, _):
        pool.workers[0].writer, pool.workers[1].writer = first, second
        live = shop(leader).state
        for weight in (2000, 3000, 4000):  # three decisions in one turn of the loop
            live.weight_bp = weight
            pool.states_changed()
        await asyncio.sleep(0)  # the loop's next turn sends
        for writer in (first, second):
            send(writer, Sync(number=99))
        for end in (first_end, second_end):
            assert await receive(end) == States(states={"shop": (4000, False, live.epoch)})
            assert await receive(end) == Sync(number=99)  # nothing else in between


@contextlib.asynccontextmanager
async def followed_by(pool: WorkerPool, *relayed: int) -> AsyncIterator[list[Worker]]:
    """Workers for the pool's slots `relayed`, each in this process on its own channel, applying
    what its slot sends and answering as `_run_process` hears it; the pool's other slots get a
    channel nobody reads (a worker that is stuck)."""
    async with contextlib.AsyncExitStack() as stack:
        workers: list[Worker] = []
        tasks: list[asyncio.Task[None]] = []
        for handle in pool.workers:
            reader, writer, their_reader, their_writer = await stack.enter_async_context(channel())
            handle.writer = writer
            handle.ready.set()
            if handle.index not in relayed:
                continue
            worker = Worker(their_reader, their_writer, pool.holder.current.config)
            worker.holder.controller.follow(pool.holder.controller.route_states())
            workers.append(worker)

            async def apply(
                worker: Worker = worker, reader: asyncio.StreamReader = their_reader
            ) -> None:
                while True:
                    worker.apply(await receive(reader))

            async def hear(
                handle: WorkerHandle = handle, reader: asyncio.StreamReader = reader
            ) -> None:
                while True:
                    pool._heard(handle, await receive(reader))

            tasks += [asyncio.create_task(apply()), asyncio.create_task(hear())]
        try:
            yield workers
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_settled_returns_once_every_worker_applies_the_decisions_made_so_far() -> None:
    leader = RuntimeHolder(config())
    pool = WorkerPool(leader, 2)
    async with followed_by(pool, 0, 1) as workers:
        shop(leader).state.weight_bp = 4200
        pool.states_changed()  # not yet sent: settled sends it at once
        await pool.settled()
        assert [shop(w.holder).state.weight_bp for w in workers] == [4200, 4200]

        leader.swap(config(split={"weight": 7}, canary=V3))
        pool.config_changed()
        await pool.settled()
        for worker in workers:
            canary = shop(worker.holder).route.canary
            assert canary is not None
            assert canary.revision == "v3"


async def test_settled_does_not_wait_for_a_worker_that_is_not_ready() -> None:
    pool = WorkerPool(RuntimeHolder(config()), 2)
    async with followed_by(pool, 0):
        pool.workers[1].ready.clear()  # starting: it gets the config and states first anyway
        async with asyncio.timeout(0.5):
            await pool.settled()


async def test_settled_gives_up_on_a_silent_worker_and_names_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervisor_module, "SETTLE_SECONDS", 0.05)
    pool = WorkerPool(RuntimeHolder(config()), 2)
    async with followed_by(pool, 0):
        with caplog.at_level(logging.WARNING, logger="canary_proxy"):
            await pool.settled()
    assert "worker 1 did not confirm the change within 0.05s" in caplog.text
    assert pool.workers[1].syncs == {}


async def test_settled_stops_waiting_for_a_worker_that_has_gone() -> None:
    pool = WorkerPool(RuntimeHolder(config()), 1)
    async with followed_by(pool):
        waiting = asyncio.create_task(pool.settled())
        await asyncio.sleep(0)
        assert not waiting.done()
        pool.workers[0].synced(1)  # what `_run_process` does when the channel closes
        async with asyncio.timeout(0.5):
            await waiting


async def test_a_worker_that_drains_is_not_ready_and_no_change_waits_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = WorkerPool(RuntimeHolder(config()), 1)
    async with followed_by(pool, 0) as (worker,):
        (route,) = config(canary=V3).routes
        broken = replace(route, stable=replace(route.stable, upstreams=(cast(Upstream, None),)))
        new = replace(pool.holder.current.config, routes=(broken,))
        with caplog.at_level(logging.WARNING, logger="canary_proxy"):
            writer = pool.workers[0].writer
            assert writer is not None
            send(writer, Configure(config=new, states={}, listen=new.listen))  # it cannot build it
            async with asyncio.timeout(0.5):
                await pool.settled()  # no wait for a worker on its way out
        assert worker.stopping.is_set()
        assert not pool.workers[0].ready.is_set()
        assert "did not confirm" not in caplog.text


async def test_counts_are_marked_brought_even_if_judging_the_report_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with supervised() as (pool, worker, block):
        serve(worker, ok=2, errors=1)

        def broken(*_: object) -> None:
            raise RuntimeError("a bug in the guard")

        monkeypatch.setattr(pool, "add_tallies", broken)
        with pytest.raises(RuntimeError):
            pool.take(pool.workers[0], worker.collect())
        pool.recover(pool.workers[0], block)  # adds nothing: the report's counts are in
    assert pool.holder.outcomes.requests == {("shop", "canary", 200): 2, ("shop", "canary", 503): 1}


class Restarts(logging.Handler):
    """Notes the pause of each "starting it again" the supervisor logs."""

    def __init__(self, wanted: int) -> None:
        super().__init__()
        self.pauses: list[str] = []
        self.wanted = wanted
        self.enough = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if found := re.search(r"starting it again in ([0-9.]+)s", record.getMessage()):
            self.pauses.append(found[1])
            if len(self.pauses) >= self.wanted:
                self.enough.set()


async def test_a_slot_whose_process_cannot_even_start_backs_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = WorkerPool(RuntimeHolder(config()), 1)
    slot = pool.workers[0]
    slot.started_at = pool.loop.time() - 3600  # its last process had lived an hour

    def no_block(capacity: int = 0) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(supervisor_module, "create_block", no_block)
    restarts = Restarts(wanted=3)
    logger = logging.getLogger("canary_proxy")
    logger.addHandler(restarts)
    try:
        kept = asyncio.create_task(pool._keep_running(slot))
        async with asyncio.timeout(5):
            await restarts.enough.wait()
        pool.stopping = True
        kept.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await kept
    finally:
        logger.removeHandler(restarts)
    assert restarts.pauses[:3] == ["0.1", "0.2", "0.4"]
