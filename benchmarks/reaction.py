"""Shell: how fast canary-proxy's guard rolls back a canary that starts failing, and at what cost.

Per offered rate, per repeat, with a fresh canary-proxy (fresh state_dir) each time:
an open-loop load (loadgen.py) of `rate` GET/s through the proxy, whose route sends 10 % to
the fake canary (fake_canary.py) and the rest to the upstream nginx; after one full guard
window of healthy traffic the fake canary is switched to answer 500 — the instant it switched
is T0 — and the proxy's audit log (`state_dir/audit.jsonl`, polled every 10 ms) is watched for
the route's `rollback` event, whose `at` is the wall-clock instant the weight went to 0.
Measured: rollback - T0, and the responses that failed (5xx or none) from T0 on — those
before the rollback and the few already routed to the canary when it happened.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from loadgen import STATUS_FAILED, Outcome, PacedLoad
from processes import ensure_alive
from scenarios import CANARY_CONTROL_PREFIX, GUARD_WINDOW_SECONDS, Scenario
from targets import Host, Placement, Target, problem_lines, smoke_check, start_guarded_proxy

ROUTE: Final = "bench"
AUDIT_POLL_SECONDS: Final = 0.010
REACTION_TIMEOUT_SECONDS: Final = 10.0  # no rollback this long after T0: recorded as missed
TAIL_SECONDS: Final = 0.5  # load kept on after the rollback, to see the requests in flight
CONNECTIONS: Final = 32  # client connections of the paced load: ample at 2 000 req/s
SWITCH_TIMEOUT_SECONDS: Final = 2.0


class ReactionFailed(RuntimeError):
    """The fake canary's switch did not answer, or the proxy died during the run."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReactionRun:
    rate: int
    repeat: int
    t0: float  # wall clock the canary began to fail
    rollback_at: float | None  # wall clock of the rollback (audit `at`); None: missed
    rollback_ms: float | None
    reason: str  # the guard's reason for the rollback
    requests: int  # answered or failed, due during the run
    achieved_rate: float
    late: int  # due but never sent when the run ended (the load fell behind)
    failed: int  # 5xx or no response, answered from T0 on (all caused by the failing canary)
    failed_after_rollback: int  # of those, answered after the rollback instant (in flight)
    failed_before_t0: int  # should be 0: the canary was healthy
    no_response: int  # of all requests: refused, reset or timed out
    p99_ms: float  # latency from due to answered, whole run


@dataclass(frozen=True, slots=True, kw_only=True)
class ReactionSummary:
    target: str  # the row's name: `canary-proxy`, or `canary-proxy x2` in a run of several
    rate: int
    repeats: int
    sent_median: float  # req/s the load really sent: below `rate`, it could not keep up
    rollback_ms_median: float | None  # over the repeats that rolled back
    rollback_ms_max: float | None
    failed_median: float
    failed_max: int
    missed: int  # repeats with no rollback within REACTION_TIMEOUT_SECONDS
    runs: tuple[ReactionRun, ...]
    workers: int = 1  # canary-proxy's worker processes


def run(
    host: Host,
    upstream: Target,
    canary: Target,
    scenario: Scenario,
    placement: Placement,
    *,
    rates: Sequence[int],
    repeats: int,
    log: list[str],
) -> tuple[ReactionSummary, ...]:
    summaries = []
    label = placement.label("canary-proxy")
    for rate in rates:
        runs = []
        for repeat in range(repeats):
            with ExitStack() as stack:
                proxy, audit = start_guarded_proxy(
                    stack,
                    host,
                    placement,
                    name=f"guard-{rate}-{repeat + 1}",
                    stable_port=upstream.port,
                    canary_port=canary.port,
                )
                switch(canary.port, "heal")
                smoke_check(proxy, scenario)
                result = asyncio.run(_one(proxy, canary, audit, rate=rate, repeat=repeat))
                ensure_alive(proxy.process)
                log.extend(line for line in problem_lines(proxy) if not _is_rollback_note(line))
            print(
                f"  {label:<15} {rate:>5,} req/s  repeat {repeat + 1}/{repeats}"
                f"  {_progress(result)}"
            )
            runs.append(result)
        summaries.append(summarise(label, rate, runs, workers=placement.workers))
    return tuple(summaries)


def _is_rollback_note(line: str) -> bool:
    """The warning the proxy logs for the very rollback this scenario provokes."""
    return f"route {ROUTE}: " in line and "-> aborted, weight 0%: guard:" in line


def summarise(
    target: str, rate: int, runs: Sequence[ReactionRun], *, workers: int = 1
) -> ReactionSummary:
    times = [r.rollback_ms for r in runs if r.rollback_ms is not None]
    failed = [r.failed for r in runs]
    return ReactionSummary(
        target=target,
        rate=rate,
        repeats=len(runs),
        sent_median=statistics.median(r.achieved_rate for r in runs) if runs else 0.0,
        rollback_ms_median=statistics.median(times) if times else None,
        rollback_ms_max=max(times) if times else None,
        failed_median=statistics.median(failed) if failed else 0.0,
        failed_max=max(failed, default=0),
        missed=len(runs) - len(times),
        runs=tuple(runs),
        workers=workers,
    )


def _progress(run: ReactionRun) -> str:
    rollback = "no rollback" if run.rollback_ms is None else f"rollback {run.rollback_ms:7.1f} ms"
    return (
        f"{rollback}  failed {run.failed:>4} ({run.failed_after_rollback} after it)"
        f"  sent {run.achieved_rate:,.0f} req/s  late {run.late}  p99 {run.p99_ms:.1f} ms"
    )


async def _one(
    proxy: Target, canary: Target, audit: Path, *, rate: int, repeat: int
) -> ReactionRun:
    load = PacedLoad(
        port=proxy.port,
        path="/",
        rate=rate,
        connections=CONNECTIONS,
        max_seconds=GUARD_WINDOW_SECONDS + REACTION_TIMEOUT_SECONDS + TAIL_SECONDS + 1,
    )
    task = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(GUARD_WINDOW_SECONDS)  # one full window of healthy traffic
        early = _rollback_event(audit)
        t0 = await asyncio.to_thread(switch, canary.port, "fail")
        event = early or await _watch(audit)
        await asyncio.sleep(TAIL_SECONDS)
    finally:
        load.stop()
        outcomes = await task
        await asyncio.to_thread(switch, canary.port, "heal")
    return _result(rate, repeat, t0, event, outcomes, late=load.late, started=load.started)


async def _watch(audit: Path) -> dict[str, object] | None:
    """Poll the audit log for the rollback, for REACTION_TIMEOUT_SECONDS at most."""
    deadline = time.monotonic() + REACTION_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        event = _rollback_event(audit)
        if event is not None:
            return event
        await asyncio.sleep(AUDIT_POLL_SECONDS)
    return None


def _rollback_event(audit: Path) -> dict[str, object] | None:
    """The route's first `rollback` audit event, if there is one yet."""
    try:
        lines = audit.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being appended right now
        if not isinstance(event, dict):
            continue
        if event.get("route") == ROUTE and event.get("action") == "rollback":
            return event
    return None


def switch(port: int, verb: str) -> float:
    """Flip the fake canary; returns the wall-clock instant it took effect."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SWITCH_TIMEOUT_SECONDS)
    try:
        connection.request("GET", f"{CANARY_CONTROL_PREFIX}{verb}")
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as error:
        raise ReactionFailed(f"fake canary switch {verb!r} failed: {error}") from error
    finally:
        connection.close()
    if response.status != 200:
        raise ReactionFailed(f"fake canary switch {verb!r} answered {response.status}")
    return float(body)


def _result(
    rate: int,
    repeat: int,
    t0: float,
    event: dict[str, object] | None,
    outcomes: Sequence[Outcome],
    *,
    late: int,
    started: float,
) -> ReactionRun:
    at = event.get("at") if event is not None else None
    rollback_at = float(at) if isinstance(at, int | float) else None
    failing = [o for o in outcomes if o.status >= 500 or o.status == STATUS_FAILED]
    after_t0 = [o for o in failing if o.done >= t0]
    ended = max((o.done for o in outcomes), default=started)
    latencies = sorted(o.done - o.due for o in outcomes)
    return ReactionRun(
        rate=rate,
        repeat=repeat + 1,
        t0=t0,
        rollback_at=rollback_at,
        rollback_ms=None if rollback_at is None else (rollback_at - t0) * 1000,
        reason=str(event.get("reason", "")) if event is not None else "",
        requests=len(outcomes),
        achieved_rate=len(outcomes) / (ended - started) if ended > started else 0.0,
        late=late,
        failed=len(after_t0),
        failed_after_rollback=sum(
            1 for o in after_t0 if rollback_at is not None and o.done > rollback_at
        ),
        failed_before_t0=len(failing) - len(after_t0),
        no_response=sum(1 for o in outcomes if o.status == STATUS_FAILED),
        p99_ms=_percentile(latencies, 0.99) * 1000,
    )


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
