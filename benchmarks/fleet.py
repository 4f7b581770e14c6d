"""The fleet's reaction and cost: three canary-proxy replicas sharing one rollout through Redis.

    .venv/bin/python benchmarks/fleet.py [--rate 600] [--repeats 5] [--rounds 3] [--duration 5]

- **Reaction** (per repeat, everything fresh: a redis-server, three replicas, their
  state_dirs): an open-loop load of `--rate` GET/s spread evenly over the three replicas, 10 %
  to the switchable fake canary; after one full guard window of healthy traffic the canary
  answers 500 from T0 on. Each replica's audit log gives the instant its weight went to 0: the
  replica whose guard tripped stamps its rollback `at`, the others stamp `applied_at` when
  they applied the fleet's decision. Reported: per replica, T0 to weight 0 (median and max
  over the repeats); the spread (slowest replica minus first); the fleet's failed requests
  (5xx or none) from T0 on. Beside it, the single-proxy guard scenario (benchmarks/reaction.py)
  at the same rate, in the same run.
- **Cost**: the `guarded` throughput scenario (wrk, keep-alive, sticky, guard on) against one
  canary-proxy without a `cluster` section and one with it (and a Redis), in alternating
  rounds; the ratio of their medians.

Pinning as in run.py: the load (this process, wrk), the upstream and the fake canary on core
0; the proxies and Redis on core 1. Needs redis-server, nginx and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import reaction
import wrk
from loadgen import STATUS_FAILED, PacedLoad
from processes import free_port, launch, pin_self, wait_for_port
from scenarios import GUARD_WINDOW_SECONDS, SCENARIOS, canary_proxy_yaml, guard_reaction_yaml
from targets import (
    Host,
    Placement,
    Target,
    start_fake_canary,
    start_proxy_process,
    start_upstream,
)

REPLICAS: Final = ("r1", "r2", "r3")
CLUSTER: Final = "bench-fleet"
LOAD_CPU: Final = 0
PROXY_CPU: Final = 1
CONNECTIONS_PER_REPLICA: Final = 12
CONNECT_WITHIN_SECONDS: Final = 10.0
REACTION_TIMEOUT_SECONDS: Final = 10.0
TAIL_SECONDS: Final = 0.5
AUDIT_POLL_SECONDS: Final = 0.005
WRK_CONNECTIONS: Final = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetRun:
    repeat: int
    zero_ms: dict[str, float | None]  # replica: T0 to its weight 0 (None: not within the bound)
    tripped: str  # the replica whose decision it was
    reason: str  # its guard's reason
    failed: int  # 5xx or no response from T0 on, all three replicas' users

    @property
    def first_ms(self) -> float | None:
        times = [t for t in self.zero_ms.values() if t is not None]
        return min(times) if times else None

    @property
    def spread_ms(self) -> float | None:
        times = list(self.zero_ms.values())
        if not times or any(t is None for t in times):
            return None
        return max(t for t in times if t is not None) - min(t for t in times if t is not None)


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    tools = {name: shutil.which(name) for name in ("redis-server", "nginx", "wrk")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install redis-server nginx wrk)")
        return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("needs two usable cores")
        return 2
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="canary-bench-fleet-"))
        workdir.chmod(0o755)
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        host = Host(
            tools={k: v for k, v in tools.items() if v is not None},
            workdir=workdir,
            canary_proxy=Path(sys.executable).with_name("canary-proxy"),
            load_cpu=LOAD_CPU,
        )
        upstream = start_upstream(stack, host)
        print(_header(options))
        previous = pin_self(LOAD_CPU)
        try:
            canary = start_fake_canary(stack, host)
            runs = [
                _reaction_repeat(host, upstream, canary, options, n) for n in range(options.repeats)
            ]
            single = reaction.run(
                host,
                upstream,
                canary,
                next(s for s in SCENARIOS if s.name == "guard"),
                Placement(workers=1, cpus=(PROXY_CPU,)),
                rates=(options.rate,),
                repeats=options.repeats,
                log=[],
            )
        finally:
            os.sched_setaffinity(0, previous)
        print()
        print(_reaction_table(runs, single[0], options))
        print()
        print(_cost(host, upstream, options))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=600, help="offered req/s, all replicas")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="wrk rounds per target (cost)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk round")
    return parser


def _header(options: argparse.Namespace) -> str:
    return (
        f"fleet benchmark: {len(REPLICAS)} replicas, {options.rate} req/s open-loop spread"
        f" evenly, {options.repeats} repeats; guard window {GUARD_WINDOW_SECONDS}s;"
        f" load on core {LOAD_CPU}, proxies and Redis on core {PROXY_CPU};"
        f" {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )


# -- the reaction ------------------------------------------------------------------------------


def _start_redis(stack: ExitStack, host: Host, name: str) -> int:
    home = host.workdir / name
    home.mkdir()
    port = free_port()
    argv = [host.tools["redis-server"], "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(home)]
    process = launch(stack, name="redis", argv=argv, cpu=PROXY_CPU, log_path=home / "redis.log")
    wait_for_port(process, port, timeout=10.0)
    return port


def _cluster_lines(redis_port: int, replica: str) -> str:
    return (
        f'cluster: {{redis: "redis://127.0.0.1:{redis_port}/0", name: {CLUSTER},'
        f" replica: {replica}}}\n"
    )


def _start_replicas(
    stack: ExitStack,
    host: Host,
    *,
    upstream: Target,
    canary: Target,
    redis_port: int,
    repeat: int,
) -> list[tuple[str, Target, Path]]:
    replicas = []
    for name in REPLICAS:
        home = host.workdir / f"fleet-{repeat}-{name}"
        home.mkdir()
        port = free_port()
        text = guard_reaction_yaml(
            home=home, port=port, stable_port=upstream.port, canary_port=canary.port
        ) + _cluster_lines(redis_port, name)
        config = home / "proxy.yaml"
        config.write_text(text)
        target = start_proxy_process(
            stack,
            host,
            home=home,
            config=config,
            port=port,
            placement=Placement(workers=1, cpus=(PROXY_CPU,)),
        )
        replicas.append((name, target, home / "state" / "audit.jsonl"))
    _until_connected([t for _, t, _ in replicas])
    return replicas


def _until_connected(targets: Sequence[Target]) -> None:
    deadline = time.monotonic() + CONNECT_WITHIN_SECONDS
    while time.monotonic() < deadline:
        if all(_status(t).get("cluster", {}).get("connected") for t in targets):
            return
        time.sleep(0.05)
    raise RuntimeError("the replicas did not connect to Redis")


def _status(target: Target) -> dict[str, dict[str, object]]:
    url = f"http://127.0.0.1:{target.admin_port}/status"
    with urllib.request.urlopen(url, timeout=2.0) as response:
        document: dict[str, dict[str, object]] = json.load(response)
        return document


def _reaction_repeat(
    host: Host, upstream: Target, canary: Target, options: argparse.Namespace, repeat: int
) -> FleetRun:
    with ExitStack() as stack:
        redis_port = _start_redis(stack, host, f"redis-{repeat}")
        replicas = _start_replicas(
            stack, host, upstream=upstream, canary=canary, redis_port=redis_port, repeat=repeat
        )
        reaction.switch(canary.port, "heal")
        run = asyncio.run(_measure(replicas, canary, options.rate, repeat))
    zero = "  ".join(
        f"{name} {'-' if t is None else f'{t:6.1f}'} ms" for name, t in run.zero_ms.items()
    )
    print(
        f"  fleet repeat {repeat + 1}/{options.repeats}: {zero}  failed {run.failed}"
        f"  decided by {run.tripped}: {run.reason}"
    )
    return run


async def _measure(
    replicas: Sequence[tuple[str, Target, Path]], canary: Target, rate: int, repeat: int
) -> FleetRun:
    loads = [
        PacedLoad(
            port=target.port,
            path="/",
            rate=rate / len(replicas),
            connections=CONNECTIONS_PER_REPLICA,
            max_seconds=GUARD_WINDOW_SECONDS + REACTION_TIMEOUT_SECONDS + TAIL_SECONDS + 1,
        )
        for _, target, _ in replicas
    ]
    tasks = [asyncio.create_task(load.run()) for load in loads]
    try:
        await asyncio.sleep(GUARD_WINDOW_SECONDS)  # one full window of healthy traffic
        t0 = await asyncio.to_thread(reaction.switch, canary.port, "fail")
        zero: dict[str, float | None] = {name: None for name, _, _ in replicas}
        tripped = reason = ""
        deadline = time.monotonic() + REACTION_TIMEOUT_SECONDS
        while time.monotonic() < deadline and any(v is None for v in zero.values()):
            for name, _, audit in replicas:
                if zero[name] is None and (found := _weight_zero(audit)) is not None:
                    at, decider, why = found
                    zero[name] = (at - t0) * 1000
                    if decider is None:  # this replica decided (its own guard tripped)
                        tripped, reason = name, why
            await asyncio.sleep(AUDIT_POLL_SECONDS)
        await asyncio.sleep(TAIL_SECONDS)
    finally:
        for load in loads:
            load.stop()
        outcomes = [o for task in tasks for o in await task]
        await asyncio.to_thread(reaction.switch, canary.port, "heal")
    failed = sum(
        1 for o in outcomes if o.done >= t0 and (o.status >= 500 or o.status == STATUS_FAILED)
    )
    return FleetRun(repeat=repeat + 1, zero_ms=zero, tripped=tripped, reason=reason, failed=failed)


def _weight_zero(audit: Path) -> tuple[float, str | None, str] | None:
    """When this replica's weight went to 0 (its own rollback's `at`, or the fleet's rollback
    `applied_at`), which replica decided (None: this one), and why."""
    try:
        lines = audit.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or event.get("action") != "rollback":
            continue
        replica = event.get("replica")
        at = event.get("applied_at") if replica is not None else event.get("at")
        if isinstance(at, int | float):
            decider = replica if isinstance(replica, str) else None
            return float(at), decider, str(event.get("reason", ""))
    return None


def _reaction_table(
    runs: Sequence[FleetRun], single: reaction.ReactionSummary, options: argparse.Namespace
) -> str:
    def stat(values: Sequence[float | None]) -> str:
        present = [v for v in values if v is not None]
        missed = len(values) - len(present)
        if not present:
            return "missed"
        text = f"{statistics.median(present):7.1f} / {max(present):7.1f}"
        return text + (f" ({missed} missed)" if missed else "")

    lines = [
        f"reaction at {options.rate} req/s, T0 -> weight 0, ms (median / max of {len(runs)})",
        f"  {'fleet: first replica':<34}{stat([r.first_ms for r in runs])}",
    ]
    for name in REPLICAS:
        lines.append(f"  {'fleet: ' + name:<34}{stat([r.zero_ms[name] for r in runs])}")
    lines.append(f"  {'fleet: slowest minus first':<34}{stat([r.spread_ms for r in runs])}")
    failed = [r.failed for r in runs]
    lines.append(
        f"  {'fleet: failed requests':<34}{statistics.median(failed):7.0f} / {max(failed):7d}"
    )
    single_ms = (
        "missed"
        if single.rollback_ms_median is None or single.rollback_ms_max is None
        else f"{single.rollback_ms_median:7.1f} / {single.rollback_ms_max:7.1f}"
    )
    lines.append(f"  {'single proxy (reaction.py)':<34}{single_ms}")
    lines.append(
        f"  {'single proxy: failed requests':<34}"
        f"{single.failed_median:7.0f} / {single.failed_max:7d}"
    )
    return "\n".join(lines)


# -- the cost ----------------------------------------------------------------------------------


def _cost(host: Host, upstream: Target, options: argparse.Namespace) -> str:
    guarded = next(s for s in SCENARIOS if s.name == "guarded")
    script = Path(__file__).resolve().parent / "sticky.lua"
    load = wrk.Load(wrk=host.tools["wrk"], cpu=LOAD_CPU, connections=WRK_CONNECTIONS, script=script)
    results: dict[str, list[float]] = {"without cluster": [], "with cluster": []}
    with ExitStack() as stack:
        redis_port = _start_redis(stack, host, "redis-cost")
        targets = {}
        for label, cluster in (("without cluster", False), ("with cluster", True)):
            home = host.workdir / f"cost-{label.replace(' ', '-')}"
            home.mkdir()
            port = free_port()
            text = canary_proxy_yaml(
                home=home, port=port, upstream_port=upstream.port, sticky=True, guard=True
            )
            if cluster:
                text += _cluster_lines(redis_port, "cost")
            config = home / "proxy.yaml"
            config.write_text(text)
            targets[label] = start_proxy_process(
                stack,
                host,
                home=home,
                config=config,
                port=port,
                placement=Placement(workers=1, cpus=(PROXY_CPU,)),
            )
        _until_connected([targets["with cluster"]])
        for _ in range(options.rounds):
            for label, target in targets.items():
                # One at a time on the proxy core: the other target sits idle meanwhile.
                report = wrk.run(load, url=target.url(guarded.path), seconds=options.duration)
                results[label].append(report.requests_per_second)
    without = statistics.median(results["without cluster"])
    with_cluster = statistics.median(results["with cluster"])
    rows = [
        f"cost: `guarded` scenario, wrk -c{WRK_CONNECTIONS}, {options.rounds} alternating rounds"
        f" of {options.duration}s (median req/s)",
        f"  {'without cluster':<34}{without:10,.0f}   {_rounds(results['without cluster'])}",
        f"  {'with cluster (Redis)':<34}{with_cluster:10,.0f}   {_rounds(results['with cluster'])}",
        f"  {'ratio with / without':<34}{with_cluster / without:10.3f}",
    ]
    return "\n".join(rows)


def _rounds(values: Sequence[float]) -> str:
    return "rounds " + ", ".join(f"{v:,.0f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
