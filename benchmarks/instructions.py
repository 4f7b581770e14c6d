"""Instructions per request: canary-proxy under callgrind, a fixed count of requests.

Wall-clock benchmarks move with whatever else the machine runs; the number of instructions
the proxy executes for a request does not. Per scenario: the upstream nginx (as run.py starts
it), canary-proxy under `valgrind --tool=callgrind --instr-atstart=no`, a warm-up over
keep-alive, then callgrind switched on and its counters dumped before and after exactly N
requests; instructions per request = Ir of that section / N. Then 5 s without requests: the
Ir per second of its timers alone, to estimate their share of the section (it grows with the
section's wall time, which valgrind and a busy machine stretch). `--compare CHECKOUT` does the
same with another checkout's `.venv/bin/canary-proxy` and prints the ratio. See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import toolchain
from processes import EXIT_OK, ProcessFailed, ensure_alive, guarded_main, pin_self, wait_for_line
from scenarios import CLOSE_HEADER, SCENARIOS, STICKY_HEADER, Scenario
from targets import Host, Placement, Target, start_canary_proxy, start_upstream

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
DEFAULT_SCENARIOS: Final = "small,sticky,guarded"
START_TIMEOUT_SECONDS: Final = 120.0  # canary-proxy's start under valgrind
REQUEST_TIMEOUT_SECONDS: Final = 30.0  # one request or connect, under valgrind
CONTROL_TIMEOUT_SECONDS: Final = 60.0  # one callgrind_control command
LOG_LINE_TIMEOUT_SECONDS: Final = 30.0  # the `data plane:` line, after the listening one
DUMP_WAIT_SECONDS: Final = 30.0  # until a dump's file holds its totals
IDLE_SECONDS: Final = 5.0  # after the requests: the Ir of a proxy that serves nothing
HASH_SEED: Final = "0"  # PYTHONHASHSEED of the proxy: the same dict and set layouts every run
KEY_SEED: Final = 5  # the sticky keys: the same sequence for every checkout
_DATA_PLANE: Final = re.compile(r"\bdata plane: (.+)$")


class MeasureFailed(RuntimeError):
    """A request failed or was not 2xx, or callgrind did not dump what was asked."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    scenarios: tuple[Scenario, ...]
    requests: int
    warmup: int
    connections: int
    compare: Path | None
    load_cpu: int
    proxy_cpu: int
    keep_workdir: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkout:
    label: str  # `this` or `compare`
    script: Path  # its .venv/bin/canary-proxy
    revision: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    checkout: Checkout
    data_plane: str  # as the proxy logged it: `compiled with mypyc` or `interpreted ...`
    requests: int
    instructions: int  # Ir of the whole process (every thread) over the measured requests
    seconds: float  # the measured requests' wall time, under valgrind
    idle_per_second: float  # Ir per second with no request: timers, the guard's ticks

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests

    @property
    def net_per_request(self) -> float:
        """Less the timers' share, estimated as the idle rate over the section's wall time:
        valgrind's slowdown, and with it that share, varies with the load on the machine."""
        timers = self.idle_per_second * self.seconds
        return (self.instructions - timers) / self.requests


# --- options -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/instructions.py", description=__doc__.splitlines()[0]
    )
    keep_alive = ", ".join(s.name for s in SCENARIOS if s.kind == "throughput")
    parser.add_argument(
        "--scenario",
        default=DEFAULT_SCENARIOS,
        help=f"comma list of {keep_alive} (default %(default)s)",
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="measured requests (default 2000)"
    )
    parser.add_argument("--warmup", type=int, default=200, help="requests before (default 200)")
    parser.add_argument(
        "--connections", type=int, default=4, help="keep-alive connections (default 4)"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another checkout (its .venv/bin/canary-proxy) to measure the same way",
    )
    parser.add_argument("--load-cpu", type=int, default=0, help="core for the client and upstream")
    parser.add_argument("--proxy-cpu", type=int, default=1, help="core for the proxy under test")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs, logs, dumps")
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.scenario.split(",") if name.strip()]
    by_name = {s.name: s for s in SCENARIOS if s.kind == "throughput"}
    unknown = [name for name in names if name not in by_name]
    if unknown or not names:
        parser.error(f"--scenario: choose from {', '.join(by_name)}; got {args.scenario!r}")
    if min(args.requests, args.connections) < 1 or args.warmup < 0:
        parser.error("--requests and --connections must be at least 1, --warmup not negative")
    usable = os.sched_getaffinity(0)
    for cpu in (args.load_cpu, args.proxy_cpu):
        if cpu not in usable:
            parser.error(f"core {cpu} is not usable here (usable: {sorted(usable)})")
    return Options(
        scenarios=tuple(by_name[name] for name in dict.fromkeys(names)),
        requests=args.requests,
        warmup=args.warmup,
        connections=args.connections,
        compare=args.compare,
        load_cpu=args.load_cpu,
        proxy_cpu=args.proxy_cpu,
        keep_workdir=args.keep_workdir,
    )


def _checkouts(options: Options) -> list[Checkout]:
    this = _script_of(ROOT)
    if this is None:
        raise toolchain.MissingTools("no .venv/bin/canary-proxy here: run `make compile` first")
    checkouts = [Checkout(label="this", script=this, revision=toolchain.git_revision(ROOT))]
    if options.compare is not None:
        other = _script_of(options.compare)
        if other is None:
            raise toolchain.MissingTools(f"--compare {options.compare}: no .venv/bin/canary-proxy")
        root = other.parent.parent.parent
        revision = toolchain.git_revision(root)
        checkouts.append(Checkout(label="compare", script=other, revision=revision))
    return checkouts


def _script_of(path: Path) -> Path | None:
    """A checkout's console script: `path` itself, or its .venv/bin/canary-proxy."""
    for candidate in (path, path / ".venv/bin/canary-proxy"):
        if candidate.is_file():
            return candidate.absolute()  # not resolved: the venv's own path makes it the venv
    return None


# --- the run -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    return guarded_main(lambda: _run(options), prog="instructions", failures=(MeasureFailed,))


def _run(options: Options) -> int:
    tools = toolchain.ensure(["taskset", "nginx", "valgrind", "callgrind_control"])
    checkouts = _checkouts(options)
    # The proxy inherits it: the same string hashes, so the same dict probing, every run.
    os.environ["PYTHONHASHSEED"] = HASH_SEED
    print(_header(tools, checkouts, options), flush=True)
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="canary-instr-"))
        workdir.chmod(0o755)  # nginx workers run as `nobody`
        if options.keep_workdir:
            print(f"work dir (kept): {workdir}")
        else:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # after the stops
        host = Host(
            tools=tools,
            workdir=workdir,
            canary_proxy=checkouts[0].script,
            load_cpu=options.load_cpu,
        )
        upstream = start_upstream(stack, host)
        previous = pin_self(options.load_cpu)  # the client, next to the upstream
        stack.callback(os.sched_setaffinity, 0, previous)
        for scenario in options.scenarios:
            print(f"\n## {scenario.name}: {scenario.description}", flush=True)
            results = [
                _measure(host, upstream, scenario, checkout, options) for checkout in checkouts
            ]
            print()
            print(_table(results))
    return EXIT_OK


def _header(tools: dict[str, str], checkouts: Sequence[Checkout], options: Options) -> str:
    valgrind = toolchain.version("valgrind", tools["valgrind"])
    lines = [
        f"# canary-proxy instructions per request, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}"
        " UTC",
        f"tool: {valgrind} --tool=callgrind --instr-atstart=no (switched on after the warm-up)",
        f"load: {options.warmup:,} warm-up + {options.requests:,} measured GETs over"
        f" {options.connections} keep-alive connections, one request in flight on each;"
        " every response must be 2xx",
        f"proxy: one process on core {options.proxy_cpu}, PYTHONHASHSEED={HASH_SEED};"
        f" client and upstream nginx on core {options.load_cpu}",
    ]
    lines += [f"{c.label}: {c.script} (git {c.revision})" for c in checkouts]
    return "\n".join(lines)


def _measure(
    host: Host, upstream: Target, scenario: Scenario, checkout: Checkout, options: Options
) -> Measurement:
    """One checkout, one scenario: a fresh proxy under callgrind, stopped at the end."""
    home = host.workdir / checkout.label
    home.mkdir(mode=0o755, exist_ok=True)
    own = replace(host, workdir=home, canary_proxy=checkout.script)
    out_file = home / f"{scenario.name}.callgrind"
    wrapper = [
        host.tools["valgrind"],
        "--tool=callgrind",
        "--instr-atstart=no",  # the start (imports) runs 10-20x faster uninstrumented
        f"--callgrind-out-file={out_file}",
    ]
    started = time.monotonic()
    with ExitStack() as stack:
        target = start_canary_proxy(
            stack,
            own,
            scenario,
            upstream.port,
            Placement(workers=1, cpus=(options.proxy_cpu,)),
            wrapper=wrapper,
            timeout=START_TIMEOUT_SECONDS,
        )
        pid = target.process.popen.pid  # taskset execs valgrind: the same pid
        found = _DATA_PLANE.search(_logged(target, _DATA_PLANE))
        data_plane = "unknown (no `data plane:` line)" if found is None else found.group(1)
        print(
            f"  {checkout.label}: listening after {time.monotonic() - started:.0f}s under"
            f" valgrind; data plane {data_plane}",
            flush=True,
        )
        load = Load(port=target.port, scenario=scenario, connections=options.connections)
        load.send(options.warmup)
        _control(pid, "-i", "on")
        before = _dump(pid, out_file)
        section = time.monotonic()
        load.send(options.requests)
        after = _dump(pid, out_file)
        idle_from = time.monotonic()
        section = idle_from - section
        time.sleep(IDLE_SECONDS)  # no requests: what its timers cost by themselves
        idle = _dump(pid, out_file)
        idle_seconds = time.monotonic() - idle_from  # the dump itself takes about a second
        ensure_alive(target.process)
        load.close()
    measured = Measurement(
        checkout=checkout,
        data_plane=data_plane,
        requests=options.requests,
        instructions=after.instructions,
        seconds=section,
        idle_per_second=idle.instructions / idle_seconds,
    )
    print(
        f"  {checkout.label}: {measured.instructions:,} Ir over {measured.requests:,} requests"
        f" in {section:.1f}s = {measured.per_request:,.0f} per request; idle {idle_seconds:.1f}s"
        f" after: {measured.idle_per_second:,.0f} Ir/s (callgrind parts: {before.part} switching"
        f" on, {after.part} the requests, {idle.part} idle)",
        flush=True,
    )
    return measured


def _logged(target: Target, pattern: re.Pattern[str]) -> str:
    """The line the proxy logs a moment after it listens; empty if it never does."""
    try:
        return wait_for_line(target.process, pattern, timeout=LOG_LINE_TIMEOUT_SECONDS)
    except ProcessFailed:
        ensure_alive(target.process)
        return ""


# --- callgrind -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Dump:
    part: int
    instructions: int  # Ir since the previous dump: callgrind zeroes its counters on a dump


def _control(pid: int, *command: str) -> None:
    control = toolchain.find("callgrind_control") or "callgrind_control"
    done = subprocess.run(
        [control, *command, str(pid)],
        capture_output=True,
        text=True,
        timeout=CONTROL_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0 or "OK" not in done.stdout:
        raise MeasureFailed(
            f"callgrind_control {' '.join(command)} {pid}: {done.stdout}{done.stderr}"
        )


def _dump(pid: int, out_file: Path) -> Dump:
    """Dump callgrind's counters (and zero them); read the new part's total Ir."""
    known = set(out_file.parent.glob(f"{out_file.name}.*"))
    _control(pid, "--dump")
    deadline = time.monotonic() + DUMP_WAIT_SECONDS
    while time.monotonic() < deadline:
        for path in sorted(set(out_file.parent.glob(f"{out_file.name}.*")) - known):
            dump = _read_dump(path)
            if dump is not None:
                return dump
        time.sleep(0.1)
    raise MeasureFailed(f"callgrind wrote no dump {out_file}.N within {DUMP_WAIT_SECONDS:.0f}s")


def _read_dump(path: Path) -> Dump | None:
    """`part:`, `events:` and `totals:` (or `summary:`) of a callgrind file; None while the
    file is not complete."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon and key in ("part", "events", "totals", "summary"):
            fields.setdefault(key, value.strip())
    total = fields.get("totals") or fields.get("summary")
    if total is None or "events" not in fields:
        return None
    events = fields["events"].split()
    if "Ir" not in events:
        raise MeasureFailed(f"{path}: no Ir among the events {events}")
    return Dump(
        part=int(fields.get("part", "0")), instructions=int(total.split()[events.index("Ir")])
    )


# --- the load ------------------------------------------------------------------------------


class Load:
    """Exactly N GETs over `connections` keep-alive connections, one request in flight on
    each (a thread per connection); each response must be 2xx with the scenario's body.
    sticky and guarded send an X-User-ID per request, the same sequence for every checkout."""

    def __init__(self, *, port: int, scenario: Scenario, connections: int) -> None:
        self.port = port
        self.scenario = scenario
        self.connections = [
            http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_SECONDS)
            for _ in range(connections)
        ]
        self.keys = random.Random(KEY_SEED)
        self.sent = 0

    def send(self, count: int) -> None:
        headers = [self._headers() for _ in range(count)]
        shares = [headers[i :: len(self.connections)] for i in range(len(self.connections))]
        problems: list[str] = []
        threads = [
            threading.Thread(target=self._send_on, args=(c, share, problems), daemon=True)
            for c, share in zip(self.connections, shares, strict=True)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS + count  # 1 s a request at worst
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise MeasureFailed(f"{count} requests did not finish in time")
        if problems:
            raise MeasureFailed(f"{len(problems)} of {count} requests failed: {problems[0]}")
        self.sent += count

    def close(self) -> None:
        for connection in self.connections:
            connection.close()

    def _headers(self) -> dict[str, str]:
        headers = {}
        if self.scenario.sticky:
            headers[STICKY_HEADER] = f"user-{self.keys.randrange(1_000_000_000)}"
        if self.scenario.close:
            name, _, value = CLOSE_HEADER.partition(": ")
            headers[name] = value  # http.client reconnects for the next request
        return headers

    def _send_on(
        self,
        connection: http.client.HTTPConnection,
        share: list[dict[str, str]],
        problems: list[str],
    ) -> None:
        for headers in share:
            try:
                connection.request("GET", self.scenario.path, headers=headers)
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as error:
                problems.append(f"GET {self.scenario.path}: {error!r}")
                connection.close()
                return
            if not 200 <= response.status < 300 or len(body) != self.scenario.body_bytes:
                problems.append(f"GET {self.scenario.path}: {response.status}, {len(body)} bytes")


# --- the table -----------------------------------------------------------------------------


def _table(results: Sequence[Measurement]) -> str:
    compared = len(results) == 2
    head = ["checkout", "git", "data plane", "requests", "Ir measured", "s", "Ir / request"]
    head += ["÷ compare"] if compared else []
    head += ["idle Ir/s", "net Ir / request"]
    head += ["÷ compare"] if compared else []
    rows = []
    for m in results:
        row = [m.checkout.label, m.checkout.revision, m.data_plane, f"{m.requests:,}"]
        row += [f"{m.instructions:,}", f"{m.seconds:.1f}", f"{m.per_request:,.0f}"]
        row += [f"{m.per_request / results[-1].per_request:.3f}"] if compared else []
        row += [f"{m.idle_per_second:,.0f}", f"{m.net_per_request:,.0f}"]
        row += [f"{m.net_per_request / results[-1].net_per_request:.3f}"] if compared else []
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        aligned = (
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(aligned) + " |"

    text = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    if compared:
        this, other = results
        text.append(
            f"this / compare: {this.per_request / other.per_request:.3f}"
            f" ({this.per_request - other.per_request:+,.0f} instructions per request);"
            f" net of timers {this.net_per_request / other.net_per_request:.3f}"
            f" ({this.net_per_request - other.net_per_request:+,.0f})"
        )
    return "\n".join(text)


if __name__ == "__main__":
    sys.exit(main())
