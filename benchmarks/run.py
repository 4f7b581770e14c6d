"""`make bench`: canary-proxy side by side with the direct upstream, nginx and HAProxy.

One upstream (nginx, one worker) and wrk share the load core; each proxy under test has the
proxy core to itself. Rounds are interleaved across targets; the table shows medians. Besides
throughput: the memory of idle keep-alive clients, and canary-proxy's guard reacting to a
canary that starts failing. `--workers 1,2` runs every proxy at each count too (canary-proxy
`workers: N`, nginx `worker_processes N`, HAProxy `nbthread N`), an N > 1 on N cores. See
benchmarks/README.md for the method.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Final

import idle
import reaction
import report
import toolchain
import wrk
from idle import IdleFailed, IdleResult
from processes import EXIT_OK, cpu_list, ensure_alive, group_cpu_seconds, guarded_main, pin_self
from reaction import ReactionFailed, ReactionSummary
from report import Summary, WorkerBalance
from scenarios import (
    CANARY_WEIGHT,
    CLOSE_HEADER,
    GUARD_MAX_ERROR_RATE,
    GUARD_MAX_ERROR_RATE_INCREASE,
    GUARD_MIN_REQUESTS,
    GUARD_RATES,
    GUARD_REPEATS,
    GUARD_WINDOW_SECONDS,
    IDLE_CONNECTIONS,
    SCENARIOS,
    Scenario,
)
from targets import (
    DISPLAY_NAMES,
    TARGET_KEYS,
    TIMES,
    Host,
    Placement,
    SmokeFailed,
    Target,
    TargetKey,
    problem_lines,
    smoke_check,
    start_fake_canary,
    start_target,
    start_upstream,
    worker_status,
)

from proxy.app import data_plane_build

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
RESULTS: Final = HERE / "results"
STICKY_SCRIPT: Final = HERE / "sticky.lua"
_ALIASES: Final[dict[str, TargetKey]] = {"canary-proxy": "proxy", "canary": "proxy"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    scenarios: tuple[Scenario, ...]
    targets: tuple[TargetKey, ...]
    rounds: int
    duration: int  # wrk takes whole seconds
    warmup: int
    connections: int
    load_cpu: int
    proxy_cpu: int
    keep_workdir: bool
    idle_connections: int = IDLE_CONNECTIONS
    guard_rates: tuple[int, ...] = GUARD_RATES
    guard_repeats: int = GUARD_REPEATS
    workers: tuple[int, ...] = (1,)  # worker counts every proxy under test runs at, ascending


@dataclass(frozen=True, slots=True, kw_only=True)
class ScenarioResult:
    scenario: Scenario
    proxy_log: list[str]  # warnings and errors canary-proxy logged during the scenario
    summaries: tuple[Summary, ...] = ()  # throughput scenarios
    rounds: dict[str, list[wrk.WrkReport]] | None = None  # by row name (`nginx x2`)
    balances: tuple[WorkerBalance, ...] = ()  # canary-proxy xN, N > 1: the work per worker
    idle: tuple[IdleResult, ...] = ()  # the idle scenario
    reaction: tuple[ReactionSummary, ...] = ()  # the guard scenario
    not_applicable: tuple[str, ...] = ()  # targets the scenario cannot measure (n/a rows)


# --- options -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    names = ", ".join(s.name for s in SCENARIOS)
    keys = ", ".join(TARGET_KEYS)
    parser.add_argument("--scenario", default="all", help=f"comma list of {names} (default all)")
    parser.add_argument("--only", default="", help=f"comma list of targets: {keys}")
    parser.add_argument("--skip", default="", help="comma list of targets to leave out")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted seconds before each")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--load-cpu", type=int, default=0, help="core for wrk and the upstream")
    parser.add_argument("--proxy-cpu", type=int, default=1, help="core for the proxy under test")
    parser.add_argument(
        "--workers",
        default="1",
        help="comma list of worker counts every proxy runs at, e.g. 1,2 (default 1); N > 1"
        " pins the proxy to N cores, the proxy core first, the load core last",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=IDLE_CONNECTIONS,
        help=f"idle scenario: idle keep-alive clients (default {IDLE_CONNECTIONS})",
    )
    parser.add_argument(
        "--guard-rates",
        default=",".join(str(rate) for rate in GUARD_RATES),
        help="guard scenario: comma list of offered req/s (default %(default)s)",
    )
    parser.add_argument(
        "--guard-repeats",
        type=int,
        default=GUARD_REPEATS,
        help=f"guard scenario: repeats per rate (default {GUARD_REPEATS})",
    )
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = Options(
            scenarios=_scenarios(args.scenario),
            targets=_targets(args.only, args.skip),
            rounds=args.rounds,
            duration=args.duration,
            warmup=args.warmup,
            connections=args.connections,
            load_cpu=args.load_cpu,
            proxy_cpu=args.proxy_cpu,
            keep_workdir=args.keep_workdir,
            idle_connections=args.idle_connections,
            guard_rates=_rates(args.guard_rates),
            guard_repeats=args.guard_repeats,
            workers=_worker_counts(args.workers),
        )
        _validate(options)
    except ValueError as error:
        parser.error(str(error))
    return options


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _rates(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(int(item) for item in _split(text))
    except ValueError:
        raise ValueError(f"--guard-rates must be whole req/s, got {text!r}") from None
    if not rates or min(rates) < 1:
        raise ValueError("--guard-rates needs at least one rate of 1 req/s or more")
    return rates


def _worker_counts(text: str) -> tuple[int, ...]:
    try:
        counts = {int(item) for item in _split(text)}
    except ValueError:
        raise ValueError(f"--workers must be whole numbers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError("--workers needs at least one count of 1 or more")
    return tuple(sorted(counts))


def _scenarios(text: str) -> tuple[Scenario, ...]:
    wanted = {s.name for s in SCENARIOS} if text == "all" else set(_split(text))
    unknown = wanted - {s.name for s in SCENARIOS}
    if unknown:
        raise ValueError(f"unknown scenario: {', '.join(sorted(unknown))}")
    return tuple(s for s in SCENARIOS if s.name in wanted)


def _targets(only: str, skip: str) -> tuple[TargetKey, ...]:
    chosen = _target_keys(only) if only else set(TARGET_KEYS)
    chosen -= _target_keys(skip)
    return tuple(key for key in TARGET_KEYS if key in chosen)


def _target_keys(text: str) -> set[TargetKey]:
    keys: set[TargetKey] = set()
    for name in _split(text):
        key = _ALIASES.get(name) or next((k for k in TARGET_KEYS if k == name), None)
        if key is None:
            raise ValueError(f"unknown target {name!r}: choose from {', '.join(TARGET_KEYS)}")
        keys.add(key)
    return keys


def _validate(options: Options) -> None:
    if not options.scenarios or not options.targets:
        raise ValueError("nothing to run: no scenario or no target left")
    if options.rounds < 1 or options.connections < 1:
        raise ValueError("--rounds and --connections must be at least 1")
    if options.duration < 1 or options.warmup < 0:
        raise ValueError("--duration must be at least 1 and --warmup not negative")
    if options.idle_connections < 1 or options.guard_repeats < 1:
        raise ValueError("--idle-connections and --guard-repeats must be at least 1")
    usable = os.sched_getaffinity(0)
    for cpu in (options.load_cpu, options.proxy_cpu):
        if cpu not in usable:
            raise ValueError(f"core {cpu} is not usable here (usable: {sorted(usable)})")
    if max(options.workers) > len(usable):
        raise ValueError(
            f"--workers {max(options.workers)}: only {len(usable)} usable cores here, and a"
            " proxy running N workers gets N cores"
        )


def placements(options: Options) -> tuple[Placement, ...]:
    """Each worker count with its cores. One worker: the proxy core alone, as always. N: N
    cores, the proxy core first, then cores nobody else is pinned to, the load core last, so
    on a 2-core machine x2 runs on cores 0,1 and shares the load core with wrk and the
    upstream."""
    labelled = options.workers != (1,)
    return tuple(
        Placement(workers=count, cpus=_proxy_cpus(options, count), labelled=labelled)
        for count in options.workers
    )


def _proxy_cpus(options: Options, count: int) -> tuple[int, ...]:
    if count == 1:
        return (options.proxy_cpu,)
    others = sorted(os.sched_getaffinity(0) - {options.proxy_cpu, options.load_cpu})
    order = list(dict.fromkeys([options.proxy_cpu, *others, options.load_cpu]))
    return tuple(sorted(order[:count]))


# --- the run -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    return guarded_main(
        lambda: _run(options),
        prog="bench",
        failures=(SmokeFailed, wrk.WrkFailed, IdleFailed, ReactionFailed),
    )


def _run(options: Options) -> int:
    tools = toolchain.ensure(_required_tools(options.targets))
    if any(s.kind == "idle" for s in options.scenarios):
        # Before any target starts: they inherit it (nginx and HAProxy also set their own).
        idle.raise_fd_limit(options.idle_connections)
    started = datetime.now(UTC)
    machine = _machine(tools)
    print(_header(started, machine, options), flush=True)
    with ExitStack() as stack:
        host = _host(stack, tools, options)
        upstream = start_upstream(stack, host)
        results = [
            _run_scenario(host, upstream, scenario, options) for scenario in options.scenarios
        ]
    _write_results(started, machine, options, results)
    return EXIT_OK


def _required_tools(targets: Sequence[TargetKey]) -> list[str]:
    return ["taskset", "wrk", "nginx", *(["haproxy"] if "haproxy" in targets else [])]


def _host(stack: ExitStack, tools: dict[str, str], options: Options) -> Host:
    workdir = Path(tempfile.mkdtemp(prefix="canary-bench-"))
    workdir.chmod(0o755)  # nginx workers run as `nobody` and read the 64 KB file in here
    if options.keep_workdir:
        print(f"work dir (kept): {workdir}")
    else:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # runs after the stops
    return Host(
        tools=tools,
        workdir=workdir,
        canary_proxy=_canary_proxy_script(),
        load_cpu=options.load_cpu,
    )


def _canary_proxy_script() -> Path:
    for candidate in (
        Path(sys.executable).parent / "canary-proxy",
        ROOT / ".venv/bin/canary-proxy",
    ):
        if candidate.exists():
            return candidate
    raise toolchain.MissingTools("no canary-proxy script in the venv: run `make test` first")


def _run_scenario(
    host: Host, upstream: Target, scenario: Scenario, options: Options
) -> ScenarioResult:
    print(f"\n## {scenario.name}: {scenario.description}", flush=True)
    if scenario.kind == "idle":
        return _run_idle(host, upstream, scenario, options)
    if scenario.kind == "reaction":
        return _run_reaction(host, upstream, scenario, options)
    with ExitStack() as stack:
        targets = _start_targets(stack, host, upstream, scenario, options)
        for target in targets:
            smoke_check(target, scenario)
        rounds = _interleaved_rounds(host, targets, scenario, options)
        balances = tuple(
            _balance(t, rounds[t.label])
            for t in targets
            if t.name == report.REFERENCE and (t.workers or 1) > 1
        )
        proxy_log = _proxy_log(targets, labelled=options.workers != (1,))
    summaries = tuple(
        report.summarise(t.label, rounds[t.label], name=t.name, workers=t.workers) for t in targets
    )
    _print_scenario(summaries, proxy_log, balances)
    return ScenarioResult(
        scenario=scenario,
        summaries=summaries,
        rounds=rounds,
        balances=balances,
        proxy_log=proxy_log,
    )


def _start_targets(
    stack: ExitStack, host: Host, upstream: Target, scenario: Scenario, options: Options
) -> list[Target]:
    """direct once (it has no workers), then every proxy at every worker count: all of them
    take part in the same interleaved rounds."""
    every = placements(options)
    targets = []
    if "direct" in options.targets:
        targets.append(start_target(stack, host, "direct", scenario, upstream, placement=every[0]))
    for placement in every:
        proxies = (key for key in options.targets if key != "direct")
        targets += [
            start_target(stack, host, key, scenario, upstream, placement=placement)
            for key in proxies
        ]
    return targets


def _proxy_log(targets: Sequence[Target], *, labelled: bool) -> list[str]:
    """canary-proxy's warnings and errors, prefixed with its row (`[canary-proxy x2]`) in a run
    of several worker counts."""
    ours = [t for t in targets if t.name == report.REFERENCE]
    return [f"[{t.label}] {line}" if labelled else line for t in ours for line in problem_lines(t)]


def _balance(target: Target, reports: Sequence[wrk.WrkReport]) -> WorkerBalance:
    """The requests each worker served (the supervisor's admin view, so over the whole
    scenario) and the CPU each process used during the measured runs (median)."""
    status = worker_status(target) or []
    per_process = [r.cpu_percent_by_process for r in reports if r.cpu_percent_by_process]
    processes = min((len(p) for p in per_process), default=0)
    medians = [statistics.median(p[i] for p in per_process) for i in range(processes)]
    return WorkerBalance(
        target=target.label,
        requests=tuple(_whole(worker.get("requests")) for worker in status),
        restarts=tuple(_whole(worker.get("restarts")) for worker in status),
        cpu_percent_supervisor=medians[0] if medians else None,
        cpu_percent_workers=tuple(medians[1:]),
    )


def _whole(value: object) -> int:
    return value if isinstance(value, int) else 0


def _interleaved_rounds(
    host: Host, targets: Sequence[Target], scenario: Scenario, options: Options
) -> dict[str, list[wrk.WrkReport]]:
    """Round r runs every target once, starting from a different one each round."""
    load = wrk.Load(
        wrk=host.tools["wrk"],
        cpu=host.load_cpu,
        connections=options.connections,
        script=STICKY_SCRIPT if scenario.sticky else None,
        headers=(CLOSE_HEADER,) if scenario.close else (),
    )
    rounds: dict[str, list[wrk.WrkReport]] = {t.label: [] for t in targets}
    for number in range(options.rounds):
        shift = number % len(targets)
        for target in [*targets[shift:], *targets[:shift]]:
            rounds[target.label].append(_measure(load, target, scenario, options, number))
    return rounds


def _measure(
    load: wrk.Load, target: Target, scenario: Scenario, options: Options, number: int
) -> wrk.WrkReport:
    url = target.url(scenario.path)
    if options.warmup > 0:
        wrk.run(load, url=url, seconds=options.warmup)  # not counted
    pgid = target.process.popen.pid  # the target leads its process group
    opens = _tcp_active_opens() if scenario.close else None
    cpu_before, started = group_cpu_seconds(pgid), time.monotonic()
    result = wrk.run(load, url=url, seconds=options.duration)
    cpu_after, elapsed = group_cpu_seconds(pgid), time.monotonic() - started
    if opens is not None:
        after = _tcp_active_opens()
        result = replace(result, tcp_opens=None if after is None else after - opens)
    per_process = _cpu_percent(pgid, cpu_before, cpu_after, elapsed)
    result = replace(
        result,
        cpu_percent=sum(per_process) if per_process else None,
        cpu_percent_by_process=per_process,
    )
    ensure_alive(target.process)
    print(f"  round {number + 1}/{options.rounds}  {_progress(target.label, result)}", flush=True)
    return result


def _cpu_percent(
    pgid: int, before: dict[int, float], after: dict[int, float], seconds: float
) -> tuple[float, ...]:
    """CPU each process of the group used over `seconds`, in % of one core: the leader first,
    then the others by pid. A process started meanwhile counts from 0; one that exited
    meanwhile is missing (and its CPU with it)."""
    if seconds <= 0:
        return ()
    pids = sorted(after, key=lambda pid: (pid != pgid, pid))
    return tuple(100 * (after[pid] - before.get(pid, 0.0)) / seconds for pid in pids)


def _tcp_active_opens() -> int | None:
    """The host's count of TCP connects so far (its network namespace's, in fact)."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    except OSError:
        return None
    tcp = [fields for fields in lines if fields and fields[0] == "Tcp:"]
    if len(tcp) < 2 or "ActiveOpens" not in tcp[0]:
        return None
    return int(tcp[1][tcp[0].index("ActiveOpens")])


def _progress(name: str, result: wrk.WrkReport) -> str:
    opens = ""
    if result.tcp_opens is not None and result.requests:
        opens = f"  conn/req {result.tcp_opens / result.requests:.2f}"
    cpu = "" if result.cpu_percent is None else f"  CPU {result.cpu_percent:3.0f} %"
    return (
        f"{name:<15} {result.requests_per_second:>9,.0f} req/s  p50 {result.p50_ms:6.2f} ms"
        f"  p99 {result.p99_ms:6.2f} ms  socket errors {result.socket_errors.total}"
        f"  non-2xx {result.non_2xx}{opens}{cpu}"
    )


def _run_idle(host: Host, upstream: Target, scenario: Scenario, options: Options) -> ScenarioResult:
    """Each proxy alone, started fresh (at each worker count): its RSS before and after the
    idle connections."""
    results: list[IdleResult] = []
    proxy_log: list[str] = []
    previous = pin_self(options.load_cpu)  # the client side, on the load core
    try:
        for placement, key in ((p, k) for p in placements(options) for k in options.targets):
            if key == "direct":
                continue
            with ExitStack() as stack:
                target = start_target(stack, host, key, scenario, upstream, placement=placement)
                smoke_check(target, scenario)
                result = idle.measure(target, path=scenario.path, count=options.idle_connections)
                ensure_alive(target.process)
                if target.name == report.REFERENCE:
                    proxy_log += _proxy_log([target], labelled=placement.labelled)
            print(
                f"  {result.target:<15} {result.per_connection_kb:6.1f} KB/conn"
                f"  RSS {result.rss_before_kb:,} -> {result.rss_after_kb:,} KiB"
                f"  ({result.processes}; {result.still_open:,}/{result.connections:,} still open)",
                flush=True,
            )
            results.append(result)
    finally:
        os.sched_setaffinity(0, previous)
    skipped = ("direct",) if "direct" in options.targets else ()
    print()
    print(report.idle_table(results, skipped))
    print(report.idle_verdict(results))
    _print_log(proxy_log)
    return ScenarioResult(
        scenario=scenario, proxy_log=proxy_log, idle=tuple(results), not_applicable=skipped
    )


def _run_reaction(
    host: Host, upstream: Target, scenario: Scenario, options: Options
) -> ScenarioResult:
    """canary-proxy only: nginx and HAProxy have no guard (n/a rows in the table)."""
    peers = tuple(DISPLAY_NAMES[key] for key in options.targets if key != "proxy")
    if "proxy" not in options.targets:
        print("  skipped: only canary-proxy has a guard, and it is not among the targets")
        return ScenarioResult(scenario=scenario, proxy_log=[], not_applicable=peers)
    proxy_log: list[str] = []
    summaries: tuple[ReactionSummary, ...] = ()
    previous = pin_self(options.load_cpu)  # the paced load runs in this process
    try:
        with ExitStack() as stack:
            canary = start_fake_canary(stack, host)
            for placement in placements(options):
                log: list[str] = []
                summaries += reaction.run(
                    host,
                    upstream,
                    canary,
                    scenario,
                    placement,
                    rates=options.guard_rates,
                    repeats=options.guard_repeats,
                    log=log,
                )
                label = placement.label(report.REFERENCE)
                proxy_log += [f"[{label}] {line}" for line in log] if placement.labelled else log
    finally:
        os.sched_setaffinity(0, previous)
    print()
    print(report.reaction_table(summaries, peers))
    _print_log(proxy_log)
    return ScenarioResult(
        scenario=scenario, proxy_log=proxy_log, reaction=summaries, not_applicable=peers
    )


def _print_scenario(
    summaries: Sequence[Summary], proxy_log: Sequence[str], balances: Sequence[WorkerBalance]
) -> None:
    print()
    print(report.table(summaries))
    print(report.verdict(summaries))
    for balance in balances:
        print(report.balance_line(balance))
    _print_log(proxy_log)


def _print_log(proxy_log: Sequence[str]) -> None:
    if proxy_log:
        print(f"canary-proxy logged {len(proxy_log)} warning/error lines, first ones:")
        print("\n".join(f"  {line}" for line in proxy_log[:5]))
    sys.stdout.flush()


# --- description and results ---------------------------------------------------------------


def _machine(tools: dict[str, str]) -> dict[str, object]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_before": _load_average(),
        "canary_proxy": _canary_proxy_version(),
        "data_plane": data_plane_build(),
        "tools": {tool: toolchain.version(tool, path) for tool, path in sorted(tools.items())},
    }


def _load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine is noise in the table."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    models = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(models, "unknown")


def _canary_proxy_version() -> str:
    try:
        version = metadata.version("canary-proxy")
    except metadata.PackageNotFoundError:
        version = "not installed"
    return f"{version} (git {toolchain.git_revision(ROOT)})"


def _header(started: datetime, machine: dict[str, object], options: Options) -> str:
    tools = machine["tools"]
    assert isinstance(tools, dict)
    per_target = f"{options.warmup:g}s warm-up (not counted) + {options.duration:g}s"
    return "\n".join(
        [
            f"# canary-proxy benchmark, {started:%Y-%m-%d %H:%M} UTC",
            f"machine: {machine['nproc']} CPUs, {machine['cpu_model']}, {machine['kernel']}",
            f"canary-proxy {machine['canary_proxy']}, data plane {machine['data_plane']},"
            f" Python {machine['python']}",
            "tools: " + "; ".join(str(v) for v in tools.values()),
            _pinning(options),
            *_workers_lines(options),
            f"load: wrk -t1 -c{options.connections}, {options.rounds} interleaved rounds x"
            f" ({per_target}) per target; table = medians of the rounds",
            f"idle: {options.idle_connections:,} idle keep-alive clients per proxy;"
            f" guard: {', '.join(f'{r:,}' for r in options.guard_rates)} req/s open-loop,"
            f" {options.guard_repeats} repeats each",
            "upstream: nginx, 1 worker; split 10% canary, stable and canary both that upstream",
            f"targets: {', '.join(DISPLAY_NAMES[key] for key in options.targets)}",
            f"load average before the run: {machine['load_average_before']}",
        ]
    )


def _pinning(options: Options) -> str:
    load = f"pinning: wrk and the upstream nginx on core {options.load_cpu}"
    if options.workers == (1,):
        return f"{load}; each proxy under test alone on core {options.proxy_cpu} (taskset -c)"
    parts = []
    for placement in placements(options):
        cores = cpu_list(placement.cpus)
        if placement.workers == 1:
            parts.append(f"{TIMES}1: each proxy under test alone on core {cores}")
        elif options.load_cpu in placement.cpus:
            parts.append(
                f"{TIMES}{placement.workers}: each proxy on cores {cores}, SHARING core"
                f" {options.load_cpu} with wrk and the upstream"
            )
        else:
            parts.append(f"{TIMES}{placement.workers}: each proxy alone on cores {cores}")
    return f"{load}; " + "; ".join(parts) + " (taskset -c)"


def _workers_lines(options: Options) -> list[str]:
    if options.workers == (1,):
        return []
    counts = ", ".join(str(n) for n in options.workers)
    return [
        f"workers: {counts} (canary-proxy `workers: N`, nginx `worker_processes N`, HAProxy"
        " `nbthread N`); ratios within the same N; direct once per round (it has no workers);"
        " idle and guard at every N too"
    ]


def _write_results(
    started: datetime,
    machine: dict[str, object],
    options: Options,
    results: Sequence[ScenarioResult],
) -> None:
    payload = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_after": _load_average(),
        "machine": machine,
        "method": _method(options),
        "scenarios": {r.scenario.name: _scenario_json(r) for r in results},
    }
    path = RESULTS / "latest.json"
    report.write_json(path, payload)
    print(f"\nresults: {path.relative_to(ROOT)}")
    chart = report.ChartData(
        throughput={r.scenario.name: r.summaries for r in results if r.summaries},
        idle=[item for r in results for item in r.idle],
        reaction=[item for r in results for item in r.reaction],
    )
    print(report.write_chart(RESULTS / "latest.png", chart))


def _method(options: Options) -> dict[str, object]:
    return {
        "tool": "wrk -t1 --latency",
        "connections": options.connections,
        "rounds": options.rounds,
        "duration_seconds": options.duration,
        "warmup_seconds": options.warmup,
        "load_cpu": options.load_cpu,
        "proxy_cpu": options.proxy_cpu,
        "workers": list(options.workers),
        "proxy_cpus": {str(p.workers): list(p.cpus) for p in placements(options)},
        "workers_means": (
            "canary-proxy `workers: N` (a supervisor + N worker processes), nginx"
            " `worker_processes N`, HAProxy `nbthread N`; each pinned to proxy_cpus[N]; direct"
            " measured once per round; ratios within the same N"
        ),
        "targets": [DISPLAY_NAMES[key] for key in options.targets],
        "aggregation": "median of rounds for req/s, p50, p99, CPU %; errors summed",
        "cpu_percent": (
            "CPU time (user + system) of the target's process group during the measured wrk run"
            " / its wall time, 100 = one core; direct: the upstream nginx"
        ),
        "newconn": f"wrk -H '{CLOSE_HEADER}'; conn/req = host-wide TCP ActiveOpens / requests",
        "idle": {
            "connections": options.idle_connections,
            "rss": "VmRSS summed over the target's process group, KiB",
            "per_connection_kb": "(rss_after_kb - rss_before_kb) / connections",
        },
        "guard": {
            "rates": list(options.guard_rates),
            "repeats": options.guard_repeats,
            "load": f"open-loop, {reaction.CONNECTIONS} keep-alive connections",
            "healthy_seconds_before_t0": GUARD_WINDOW_SECONDS,
            "canary_weight_percent": CANARY_WEIGHT,
            "guard": {
                "window_seconds": GUARD_WINDOW_SECONDS,
                "min_requests": GUARD_MIN_REQUESTS,
                "max_error_rate": GUARD_MAX_ERROR_RATE,
                "max_error_rate_increase": GUARD_MAX_ERROR_RATE_INCREASE,
                "action": "rollback",
            },
            "rollback_ms": "audit event `at` of the rollback - T0 (the fake canary's switch)",
            "failed": "5xx or no response, answered from T0 on",
        },
    }


def _scenario_json(result: ScenarioResult) -> dict[str, object]:
    scenario = result.scenario
    common: dict[str, object] = {"kind": scenario.kind, "description": scenario.description}
    if scenario.kind == "idle":
        return {
            **common,
            "results": [asdict(item) for item in result.idle],
            "not_applicable": list(result.not_applicable),
            "verdict": report.idle_verdict(result.idle),
            "canary_proxy_log": result.proxy_log,
        }
    if scenario.kind == "reaction":
        return {
            **common,
            "summary": [asdict(item) for item in result.reaction],
            "not_applicable": dict.fromkeys(result.not_applicable, "no guard"),
            "canary_proxy_log": result.proxy_log,
        }
    rounds = result.rounds or {}
    return {
        **common,
        "path": scenario.path,
        "sticky": scenario.sticky,
        "close": scenario.close,
        "summary": [asdict(summary) for summary in result.summaries],
        "verdict": report.verdict(result.summaries),
        "worker_balance": [asdict(balance) for balance in result.balances],
        "rounds": {name: [asdict(r) for r in reports] for name, reports in rounds.items()},
        "canary_proxy_log": result.proxy_log,
    }


if __name__ == "__main__":
    sys.exit(main())
