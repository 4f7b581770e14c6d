"""The self-contained demo (`canary-proxy demo`): a canary ramps 5 -> 25 -> 50 %, starts failing
and the guard rolls it back; or, `--scenario healthy`, it ramps on to 100 % and is promoted.

Everything runs in one process on loopback ports the kernel picks: a stable and a canary
upstream, the proxy (data plane, admin API, controller) and a paced crowd of sticky users. What
the demo shows is read off the proxy itself: the route's rollout state, its guard windows, its
request counters and the controller's audit events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Final, Literal, Protocol, TextIO

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from proxy.app import Proxy
from proxy.core.bucketing import bucket, in_canary
from proxy.core.config import BASIS_POINTS, Config, parse_config
from proxy.core.window import LATENCY_BOUNDS, WindowCounts
from proxy.dataplane.runtime import RouteRuntime

Scenario = Literal["failing", "healthy"]

ROUTE: Final = "shop"
USER_HEADER: Final = "X-User-ID"
VERSION_HEADER: Final = "X-Version"
CANARY_REVISION: Final = "v2"
USERS: Final = 300

FAILING_STEPS: Final = (5, 25, 50)
HEALTHY_STEPS: Final = (5, 25, 50, 100)
# The story lasts this many ramp intervals: three to climb (the healthy ramp's third ends in
# promoted), and the rest to watch the failure, the rollback and the route after it.
INTERVALS_PER_STORY: Final = 3.75
FAIL_AFTER_INTERVALS: Final = 0.4  # healthy dwell at 50 % before the canary breaks
FAILURE_EVERY: Final = 2  # a failing canary answers every second request with a 500
GUARD_WINDOW_SECONDS: Final = 3.0
MAX_ERROR_RATE: Final = 0.05
MIN_GUARD_REQUESTS: Final = 3
MAX_GUARD_REQUESTS: Final = 20
MIN_DURATION_SECONDS: Final = 4.0
MAX_RATE: Final = 2000.0  # one process plays the users, the proxy and both upstreams

SERVICE_SECONDS: Final = (0.002, 0.008)  # each upstream's simulated work per request
MAX_IN_FLIGHT: Final = 100  # open loop, bounded: a request due beyond this is skipped
PACE_SECONDS: Final = 0.01
POLL_SECONDS: Final = 0.05
FRAME_SECONDS: Final = 0.25  # the live view redraws four times a second
STATUS_SECONDS: Final = 1.0  # plain mode: one status line a second
RATE_SECONDS: Final = 2.0  # req/s is measured over the last two seconds
RECENT_LINES: Final = 6
BAR_WIDTH: Final = 20

log = logging.getLogger("canary_proxy")


# --- The plan: what the story does, scaled to --duration and --rate -----------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    scenario: Scenario
    duration: float  # seconds of traffic
    rate: float  # requests per second
    users: int
    steps: tuple[int, ...]  # percent
    interval: float  # seconds of healthy dwell per step
    guard_window: float
    min_requests: int
    fail_after: float  # seconds at 50 % before the canary starts failing

    @property
    def failing(self) -> bool:
        return self.scenario == "failing"


def plan_story(scenario: Scenario, *, duration: float, rate: float) -> Plan:
    """The story for the options, or ValueError saying which option to change and why."""
    if duration < MIN_DURATION_SECONDS:
        raise ValueError(
            f"--duration must be at least {MIN_DURATION_SECONDS:g} seconds for the ramp to fit"
        )
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"--rate must be more than 0 and at most {MAX_RATE:g} requests/s")
    steps = HEALTHY_STEPS if scenario == "healthy" else FAILING_STEPS
    interval = round(duration / INTERVALS_PER_STORY, 2)
    first_step_requests = rate * steps[0] / 100 * interval
    # The ramp holds a step that saw fewer than min_requests canary requests, and a hold makes
    # the story overrun: ask for a third of what the first step should see, which leaves room
    # for a cohort of a few hundred users that is never exactly 5 % and for a slow start.
    min_requests = min(MAX_GUARD_REQUESTS, int(first_step_requests / 3))
    if min_requests < MIN_GUARD_REQUESTS:
        raise ValueError(
            f"--rate {rate:g} for --duration {duration:g} is too little traffic: the "
            f"{steps[0]} % step would see about {first_step_requests:.0f} canary requests, and "
            f"the story needs {3 * MIN_GUARD_REQUESTS}; raise --rate or --duration"
        )
    return Plan(
        scenario=scenario,
        duration=duration,
        rate=rate,
        users=USERS,
        steps=steps,
        interval=interval,
        guard_window=GUARD_WINDOW_SECONDS,
        min_requests=min_requests,
        fail_after=round(interval * FAIL_AFTER_INTERVALS, 2),
    )


def demo_config(plan: Plan, *, stable: str, canary: str, state_dir: str) -> Config:
    """One route with a sticky split, the plan's ramp and a rolling-back guard; every listener
    on loopback port 0."""
    return parse_config(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "state_dir": state_dir,
            "timeouts": {"shutdown": "1s"},
            "routes": [
                {
                    "name": ROUTE,
                    "stable": {"upstreams": [stable]},
                    "canary": {"upstreams": [canary], "revision": CANARY_REVISION},
                    "split": {"sticky": {"header": USER_HEADER}},
                    "rollout": {"steps": list(plan.steps), "interval": plan.interval},
                    "guard": {
                        "window": plan.guard_window,
                        "min_requests": plan.min_requests,
                        "max_error_rate": MAX_ERROR_RATE,
                        "action": "rollback",
                    },
                }
            ],
        },
        base_dir=state_dir,
    )


def user_ids(count: int) -> list[str]:
    return [f"user-{n}" for n in range(count)]


# --- The cast: two upstreams and a crowd of users -----------------------------------------------


class DemoUpstream:
    """One version of the service on a loopback port; the canary can be told to fail."""

    def __init__(self, version: str, rng: random.Random) -> None:
        self.version = version
        self.failing = False
        self.first_failure: float | None = None  # wall-clock time of the first 500
        self.url = ""
        self._rng = rng
        self._answered = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self._rng.uniform(*SERVICE_SECONDS))
        self._answered += 1
        headers = {VERSION_HEADER: self.version}
        if self.failing and self._answered % FAILURE_EVERY == 0:
            if self.first_failure is None:
                self.first_failure = time.time()
            return web.Response(status=500, text="simulated failure\n", headers=headers)
        return web.Response(text=f"hello from {self.version}\n", headers=headers)


class Crowd:
    """Sticky users sending `rate` requests a second between them.

    Users take turns in a freshly shuffled order each round, so every user sends about as
    often as the others and the canary's share of requests is its cohort's share of users
    (purely random picks can starve a 5 % step of the requests the ramp needs). Open loop:
    requests go out on schedule whether or not earlier answers are back, as real users do, up
    to MAX_IN_FLIGHT outstanding (a request due beyond that is skipped).
    """

    def __init__(
        self,
        session: ClientSession,
        url: str,
        users: Sequence[str],
        rate: float,
        rng: random.Random,
    ) -> None:
        self.session = session
        self.url = url
        self.users = users
        self.rate = rate
        self.rng = rng
        self.sent = 0
        self.skipped = 0  # due while MAX_IN_FLIGHT were outstanding: the crowd fell behind
        self.unanswered = 0  # no HTTP answer at all: connection error or timeout
        self.canary_errors = 0  # 5xx answers from the canary, as the users saw them
        self.exposed_users: set[str] = set()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._round: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        started = monotonic()
        try:
            while not stop.is_set():
                due = int((monotonic() - started) * self.rate)
                while self.sent + self.skipped < due:
                    if len(self._in_flight) >= MAX_IN_FLIGHT:
                        self.skipped += 1
                    else:
                        self._send(self._next_user())
                await asyncio.sleep(PACE_SECONDS)
        finally:
            # Every request gets its answer before the proxy stops: no task outlives the crowd.
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _next_user(self) -> str:
        if not self._round:
            self._round = list(self.users)
            self.rng.shuffle(self._round)
        return self._round.pop()

    def _send(self, user: str) -> None:
        self.sent += 1
        task = asyncio.get_running_loop().create_task(self._ask(user))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _ask(self, user: str) -> None:
        try:
            async with self.session.get(self.url, headers={USER_HEADER: user}) as response:
                await response.read()
                status, version = response.status, response.headers.get(VERSION_HEADER)
        except (ClientError, TimeoutError):
            self.unanswered += 1
            return
        if status >= 500 and version == "canary":
            self.canary_errors += 1
            self.exposed_users.add(user)


# --- What the view shows: a snapshot of the proxy, rendered by pure functions -------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionNumbers:
    rate: float | None  # req/s over the last RATE_SECONDS, from the proxy's counters
    requests: int  # in the guard window
    error_rate: float | None  # over the guard window; None without requests
    p99: float | None  # seconds, the guard window's p99 bucket bound; None without requests


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    scenario: Scenario
    elapsed: float
    duration: float
    route: str
    state: str
    weight_bp: int
    step: int | None  # 0-based index into the rollout steps
    steps: int
    window: float  # the guard window, seconds
    canary_failing: bool
    stable: VersionNumbers
    canary: VersionNumbers
    recent: tuple[str, ...]  # the last few journal lines, oldest first


def render_live(view: Snapshot, width: int) -> list[str]:
    """The live block: always the same height, so a redraw overwrites the previous one."""
    recent = [*view.recent[-RECENT_LINES:]]
    recent += [""] * (RECENT_LINES - len(recent))
    lines = [
        _headline(view),
        _route_line(view),
        "",
        f"  {'':8}{'req/s':>8}{'errors':>10}{'p99':>11}"
        f"    errors and p99: the guard's last {view.window:g} s",
        _version_row("stable", view.stable),
        _version_row("canary", view.canary),
        "",
        "  events (controller audit log) and what the demo does",
        *(f"    {line}" for line in recent),
    ]
    return [_fit(line, width) for line in lines]


def render_status(view: Snapshot) -> str:
    """The one-line status of plain mode (stdout is not a terminal)."""
    return (
        f"+{view.elapsed:.1f}s status {view.route}: {view.state} {_pct(view.weight_bp)}"
        f"{_step_text(view)} | stable {_numbers(view.stable)} | canary {_numbers(view.canary)}"
    )


def format_event(event: Mapping[str, object], t0: float) -> str:
    """An audit event as one line: when (since the story began), who, what, and why."""
    at = _number(event.get("at")) - t0
    return (
        f"+{at:.3f}s {event.get('actor')}/{event.get('action')}: "
        f"{event.get('before')} {_pct(_int(event.get('weight_before_bp')))} -> "
        f"{event.get('after')} {_pct(_int(event.get('weight_after_bp')))}: {event.get('reason')}"
    )


def _headline(view: Snapshot) -> str:
    shown = min(view.elapsed, view.duration)
    line = f"canary-proxy demo - scenario {view.scenario} - {shown:4.1f} s of {view.duration:g} s"
    if view.canary_failing:
        line += f" - canary upstream FAILING: 1 in {FAILURE_EVERY} -> 500"
    return line


def _route_line(view: Snapshot) -> str:
    filled = round(BAR_WIDTH * view.weight_bp / BASIS_POINTS)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    step = f"{view.step + 1}/{view.steps}" if view.step is not None else "-"
    return (
        f"route {view.route}   state {view.state:<11}   step {step:<5}   "
        f"canary weight {view.weight_bp / 100:5.1f} %  [{bar}]"
    )


def _version_row(name: str, numbers: VersionNumbers) -> str:
    rate = "-" if numbers.rate is None else f"{numbers.rate:.1f}"
    return (
        f"  {name:<8}{rate:>8}{_rate_text(numbers.error_rate):>10}{_latency(numbers.p99):>11}"
        f"    ({numbers.requests} requests in the window)"
    )


def _numbers(numbers: VersionNumbers) -> str:
    rate = "-" if numbers.rate is None else f"{numbers.rate:.1f}"
    return f"{rate} req/s, errors {_rate_text(numbers.error_rate)}, p99 {_latency(numbers.p99)}"


def _step_text(view: Snapshot) -> str:
    return f" (step {view.step + 1}/{view.steps})" if view.step is not None else ""


def _fit(line: str, width: int) -> str:
    # A line that wraps would take two rows and break the redraw's count of rows to go back up.
    return line if len(line) < width else line[: max(0, width - 1)]


def _rate_text(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.2f}%"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return f">{LATENCY_BOUNDS[-1]:g}s"  # the window's overflow bucket has no upper bound
    return f"{seconds * 1000:.3g}ms" if seconds < 1 else f"{seconds:.3g}s"


def _pct(weight_bp: int) -> str:
    return f"{weight_bp / 100:g}%"


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def new_events(
    events: Sequence[Mapping[str, object]], last: Mapping[str, object] | None
) -> list[Mapping[str, object]]:
    """The events after `last` (by identity: the controller keeps a bounded deque, so
    positions shift once it is full)."""
    fresh = []
    for event in reversed(events):
        if event is last:
            break
        fresh.append(event)
    return fresh[::-1]


class RateMeter:
    """Requests per second per version from the proxy's cumulative counters (the ones
    /metrics exports), over the last RATE_SECONDS."""

    def __init__(self, span: float = RATE_SECONDS) -> None:
        self.span = span
        self._samples: deque[tuple[float, int, int]] = deque()

    def sample(self, now: float, stable: int, canary: int) -> tuple[float | None, float | None]:
        samples = self._samples
        samples.append((now, stable, canary))
        while now - samples[0][0] > self.span:
            samples.popleft()
        then, stable_then, canary_then = samples[0]
        if now - then < self.span / 4:
            return None, None  # too short a stretch to call it a rate
        return (stable - stable_then) / (now - then), (canary - canary_then) / (now - then)


def version_numbers(rate: float | None, counts: WindowCounts | None) -> VersionNumbers:
    if counts is None or not counts.requests:
        return VersionNumbers(rate=rate, requests=0, error_rate=None, p99=None)
    return VersionNumbers(
        rate=rate, requests=counts.requests, error_rate=counts.error_rate, p99=counts.p99
    )


# --- Judging the story: did what the scenario promised happen? -----------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """What happened, read off the proxy (events, state, counters) and the crowd (users)."""

    plan: Plan
    t0: float  # wall-clock time the story began
    events: tuple[Mapping[str, object], ...]
    state: str
    weight_bp: int
    failure_started: float | None  # wall-clock time of the canary's first failed response
    exposed_requests: int  # canary 5xx answers, as the proxy counted them
    exposed_users: int  # distinct users who got one
    users_seen_errors: int  # canary 5xx answers as the users counted them
    cohort_users: int  # users in the canary at the highest weight the ramp reached
    stable_requests: int
    canary_requests: int
    sent: int
    skipped: int
    unanswered: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    ok: bool
    lines: tuple[str, ...]  # what happened, one fact a line
    verdict: str  # "OK: ..." or "FAILED: ..."


RAMP_ACTIONS: Final = ("start", "advance", "promote")


def ramp_weights(events: Sequence[Mapping[str, object]]) -> list[int]:
    """The weights (basis points) the ramp reached, in order."""
    weights: list[int] = []
    for event in events:
        if event.get("action") in RAMP_ACTIONS:
            weight = _int(event.get("weight_after_bp"))
            if not weights or weights[-1] != weight:
                weights.append(weight)
    return weights


def judge(record: Record) -> Outcome:
    return _judge_failing(record) if record.plan.failing else _judge_healthy(record)


def _judge_failing(record: Record) -> Outcome:
    plan, events = record.plan, record.events
    weights = ramp_weights(events)
    lines = [f"ramp:     {_ramp_text(weights)}"]
    rollback = next((e for e in events if e.get("action") == "rollback"), None)
    failure = record.failure_started
    if rollback is not None and (failure is None or _number(rollback.get("at")) < failure):
        reason = rollback.get("reason")
        return _failed(lines, f"the guard rolled back the canary before it failed: {reason}")
    if failure is None:
        return _failed(
            lines,
            f"the ramp reached only {_pct(max(weights, default=0))} in {plan.duration:g} s, "
            f"so the canary never got to fail ({_where(record)})",
        )
    lines.append(
        f"failure:  the canary began failing at +{failure - record.t0:.3f}s "
        f"(1 in {FAILURE_EVERY} of its requests answered 500)"
    )
    if rollback is None:
        return _failed(lines, f"no rollback within {plan.duration:g} s: {_where(record)}")
    at = _number(rollback.get("at"))
    lines += [
        f"rollback: weight {_pct(_int(rollback.get('weight_before_bp')))} -> "
        f"{_pct(_int(rollback.get('weight_after_bp')))} at +{at - record.t0:.3f}s, "
        f"{at - failure:.3f} s after the canary began failing (the controller's rollback event)",
        f"reason:   {rollback.get('reason')}",
        f"exposed:  {record.exposed_requests} requests got an error from the failing canary, "
        f"from {record.exposed_users} distinct users ({record.cohort_users} of the "
        f"{plan.users} users were in its {_pct(max(weights, default=0))} cohort)"
        + _users_disagree(record),
        _traffic(record),
    ]
    verdict = f"OK: the guard rolled the failing canary back; {_where(record)}"
    return Outcome(ok=True, lines=tuple(lines), verdict=verdict)


def _judge_healthy(record: Record) -> Outcome:
    events = record.events
    lines = [f"ramp:     {_ramp_text(ramp_weights(events))}"]
    rollback = next((e for e in events if e.get("action") == "rollback"), None)
    if rollback is not None:
        return _failed(lines, f"the guard rolled back a healthy canary: {rollback.get('reason')}")
    promoted = next((e for e in events if e.get("after") == "promoted"), None)
    if promoted is None or record.state != "promoted":
        return _failed(
            lines, f"the ramp did not finish within {record.plan.duration:g} s: {_where(record)}"
        )
    lines += [
        f"promoted: at +{_number(promoted.get('at')) - record.t0:.3f}s: {promoted.get('reason')}",
        f"canary:   {record.exposed_requests} errors in {record.canary_requests} requests",
        _traffic(record),
    ]
    verdict = f"OK: the canary was promoted; {_where(record)}"
    return Outcome(ok=True, lines=tuple(lines), verdict=verdict)


def _failed(lines: list[str], why: str) -> Outcome:
    return Outcome(ok=False, lines=tuple(lines), verdict=f"FAILED: {why}")


def _ramp_text(weights: Sequence[int]) -> str:
    return " -> ".join(_pct(w) for w in weights) or "(no ramp event)"


def _where(record: Record) -> str:
    return f"route {ROUTE} is {record.state} at {_pct(record.weight_bp)}"


def _users_disagree(record: Record) -> str:
    if record.users_seen_errors == record.exposed_requests:
        return ""
    return f" (the users counted {record.users_seen_errors} errors)"


def _traffic(record: Record) -> str:
    unanswered = f", {record.unanswered} unanswered" if record.unanswered else ""
    skipped = f", {record.skipped} skipped (too many in flight)" if record.skipped else ""
    return (
        f"traffic:  {record.sent} requests sent{unanswered}{skipped}; the proxy sent "
        f"{record.stable_requests} to stable, {record.canary_requests} to the canary"
    )


# --- Painting: a live block on a terminal, plain lines otherwise --------------------------------


class Painter(Protocol):
    def show(self, view: Snapshot, new_lines: Sequence[str]) -> None: ...

    def close(self) -> None: ...


class LivePainter:
    """Redraws the live block in place (ANSI cursor movement), four times a second."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._rows = 0
        out.write("\x1b[?25l")  # hide the cursor while it jumps around

    def show(self, view: Snapshot, new_lines: Sequence[str]) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        lines = render_live(view, width)
        up = f"\r\x1b[{self._rows}A" if self._rows else ""
        # Each row is rewritten and the rest of it erased, then anything below: no flicker.
        body = "".join(f"{line}\x1b[K\n" for line in lines)
        self.out.write(f"{up}{body}\x1b[J")
        self.out.flush()
        self._rows = len(lines)

    def close(self) -> None:
        self.out.write("\x1b[?25h")
        self.out.flush()


class PlainPainter:
    """Plain lines for logs and pipes: each event as it happens, a status line a second."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._periods = 0  # status lines printed so far

    def show(self, view: Snapshot, new_lines: Sequence[str]) -> None:
        for line in new_lines:
            print(line, file=self.out, flush=True)
        # On the second's boundary, not a second after the last line: frames drift.
        period = int(view.elapsed / STATUS_SECONDS)
        if period > self._periods:
            self._periods = period
            print(render_status(view), file=self.out, flush=True)

    def close(self) -> None:
        pass


# --- The stage: everything running, and what the view reads from it -----------------------------


class Journal:
    """The story's lines in order: the controller's events and the demo's own notes."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.lines: list[str] = []
        self._shown = 0
        self._last_event: Mapping[str, object] | None = None

    def note(self, text: str) -> None:
        self.lines.append(f"+{time.time() - self.t0:.3f}s demo: {text}")

    def take_events(self, events: Sequence[Mapping[str, object]]) -> None:
        fresh = new_events(events, self._last_event)
        if fresh:
            self._last_event = fresh[-1]
            self.lines.extend(format_event(event, self.t0) for event in fresh)

    def unshown(self) -> list[str]:
        lines, self._shown = self.lines[self._shown :], len(self.lines)
        return lines


@dataclass(slots=True)
class Stage:
    plan: Plan
    stable: DemoUpstream
    canary: DemoUpstream
    proxy: Proxy
    crowd: Crowd
    t0: float  # wall clock, for the controller's event times
    started: float  # monotonic
    journal: Journal

    def route(self) -> RouteRuntime:
        return self.proxy.holder.current.routes[ROUTE]

    def weight_bp(self) -> int:
        live = self.route().state
        return 0 if live.aborted else live.weight_bp


@contextlib.asynccontextmanager
async def open_stage(plan: Plan, state_dir: str) -> AsyncIterator[Stage]:
    """Both upstreams, the proxy and a client session, torn down in reverse on the way out."""
    rng = random.Random()
    async with contextlib.AsyncExitStack() as stack:
        stable, canary = DemoUpstream("stable", rng), DemoUpstream("canary", rng)
        for upstream in (stable, canary):
            await upstream.start()
            stack.push_async_callback(upstream.close)
        config = demo_config(plan, stable=stable.url, canary=canary.url, state_dir=state_dir)
        # The ramp's first dwell starts when the proxy is built: so does the story.
        t0, started = time.time(), monotonic()
        proxy = Proxy(config, config_path=None)
        await proxy.start()
        stack.push_async_callback(proxy.stop)
        session = await stack.enter_async_context(
            ClientSession(
                connector=TCPConnector(limit=MAX_IN_FLIGHT),
                timeout=ClientTimeout(total=10),
            )
        )
        host, port = proxy.data_address or ("127.0.0.1", 0)
        crowd = Crowd(session, f"http://{host}:{port}/", user_ids(plan.users), plan.rate, rng)
        yield Stage(
            plan=plan,
            stable=stable,
            canary=canary,
            proxy=proxy,
            crowd=crowd,
            t0=t0,
            started=started,
            journal=Journal(t0),
        )


def observe(stage: Stage, meter: RateMeter, now: float) -> Snapshot:
    """The proxy's view of the route now: state and weight, rates from its counters, error
    rates and p99 from its guard windows, the latest journal lines."""
    route = stage.route()
    live = route.state
    stable_rate, canary_rate = meter.sample(
        now, route.stable_stats.requests, route.canary_stats.requests
    )
    windows = live.windows(now)
    rollout = route.route.rollout
    return Snapshot(
        scenario=stage.plan.scenario,
        elapsed=now - stage.started,
        duration=stage.plan.duration,
        route=route.name,
        state=live.rollout.state,
        weight_bp=stage.weight_bp(),
        step=live.rollout.step,
        steps=len(rollout.steps_bp) if rollout is not None else 0,
        window=live.guard.window if live.guard is not None else 0.0,
        canary_failing=stage.canary.failing,
        stable=version_numbers(stable_rate, windows[0] if windows else None),
        canary=version_numbers(canary_rate, windows[1] if windows else None),
        recent=tuple(stage.journal.lines[-RECENT_LINES:]),
    )


def record_of(stage: Stage) -> Record:
    route = stage.route()
    live = route.state
    events = tuple(stage.proxy.holder.controller.events)
    top = max(ramp_weights(events), default=0)
    users = user_ids(stage.plan.users)
    return Record(
        plan=stage.plan,
        t0=stage.t0,
        events=events,
        state=live.rollout.state,
        weight_bp=stage.weight_bp(),
        failure_started=stage.canary.first_failure,
        exposed_requests=sum(n for code, n in route.canary_stats.codes.items() if code >= 500),
        exposed_users=len(stage.crowd.exposed_users),
        users_seen_errors=stage.crowd.canary_errors,
        cohort_users=sum(1 for user in users if in_canary(bucket(route.split.salt, user), top)),
        stable_requests=route.stable_stats.requests,
        canary_requests=route.canary_stats.requests,
        sent=stage.crowd.sent,
        skipped=stage.crowd.skipped,
        unanswered=stage.crowd.unanswered,
    )


# --- The story ------------------------------------------------------------------------------------


class Interrupt:
    """Set by SIGINT or SIGTERM: the story stops where it is and everything shuts down."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signum: int | None = None

    def fire(self, signum: int) -> None:
        self.signum = signum
        self.event.set()


@contextlib.contextmanager
def catching_signals(interrupt: Interrupt) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    signums = (signal.SIGINT, signal.SIGTERM)
    for signum in signums:
        loop.add_signal_handler(signum, interrupt.fire, signum)
    try:
        yield
    finally:
        for signum in signums:
            loop.remove_signal_handler(signum)


async def _sleep_until(when: float, interrupt: Interrupt) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(interrupt.event.wait(), max(0.0, when - monotonic()))


async def _until(condition: Callable[[], bool], deadline: float, interrupt: Interrupt) -> bool:
    """Poll `condition` until it holds (True), or the deadline or an interrupt comes (False)."""
    while not condition():
        if monotonic() >= deadline or interrupt.event.is_set():
            return False
        await _sleep_until(min(deadline, monotonic() + POLL_SECONDS), interrupt)
    return True


async def direct(stage: Stage, interrupt: Interrupt) -> None:
    """Run the story to its end: in the failing scenario, break the canary once the ramp has
    stood at its top step for a while; then watch until the duration is up."""
    plan = stage.plan
    deadline = stage.started + plan.duration
    top_bp = plan.steps[-1] * 100
    if plan.failing and await _until(lambda: stage.weight_bp() >= top_bp, deadline, interrupt):
        await _sleep_until(min(deadline, monotonic() + plan.fail_after), interrupt)
        if monotonic() < deadline and not interrupt.event.is_set():
            stage.canary.failing = True
            stage.journal.note(
                f"the canary upstream starts failing: 1 in {FAILURE_EVERY} requests gets a 500"
            )
    await _sleep_until(deadline, interrupt)


async def watch(stage: Stage, painter: Painter, stop: asyncio.Event) -> None:
    """Feed the painter a fresh snapshot every frame, and once more after the story ends."""
    meter = RateMeter()
    while True:
        done = stop.is_set()
        stage.journal.take_events(stage.proxy.holder.controller.events)
        painter.show(observe(stage, meter, monotonic()), stage.journal.unshown())
        if done:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FRAME_SECONDS)


async def tell(stage: Stage, painter: Painter, interrupt: Interrupt) -> Record:
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(stage.crowd.run(stop))
        tasks.create_task(watch(stage, painter, stop))
        try:
            await direct(stage, interrupt)
        finally:
            stop.set()
    return record_of(stage)


def introduce(stage: Stage, out: TextIO) -> None:
    plan = stage.plan
    data_host, data_port = stage.proxy.data_address or ("?", 0)
    admin_host, admin_port = stage.proxy.admin_address or ("?", 0)
    admin = f"http://{admin_host}:{admin_port}"
    ramp = " -> ".join(f"{step}%" for step in plan.steps)
    story = (
        "then it starts failing and the guard should roll it back"
        if plan.failing
        else "it stays healthy and should be promoted"
    )
    lines = [
        f"canary-proxy demo - scenario {plan.scenario}: the canary ramps {ramp}; {story}",
        f"  stable  {stage.stable.url}    canary  {stage.canary.url} (revision {CANARY_REVISION})",
        f"  proxy   http://{data_host}:{data_port}/    {plan.users} sticky users ({USER_HEADER}) "
        f"send {plan.rate:g} req/s for {plan.duration:g} s",
        f"  admin   {admin}    try: canary-proxy status --admin {admin}",
        f"  ramp    one step every {plan.interval:g} s while healthy; guard: roll back when "
        f"canary errors > {MAX_ERROR_RATE:.0%} over {plan.guard_window:g} s "
        f"(at least {plan.min_requests} canary requests)",
        "",
    ]
    for line in lines:
        print(line, file=out, flush=True)


@contextlib.contextmanager
def quiet_proxy_log() -> Iterator[None]:
    """The demo shows the controller's decisions itself; its log lines on stderr would only
    tear the live view (they are in the audit log all the same)."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


async def play(plan: Plan, out: TextIO, live: bool) -> int:
    interrupt = Interrupt()
    with (
        quiet_proxy_log(),
        tempfile.TemporaryDirectory(prefix="canary-proxy-demo-") as state_dir,
        catching_signals(interrupt),
    ):
        async with open_stage(plan, state_dir) as stage:
            introduce(stage, out)
            painter: Painter = LivePainter(out) if live else PlainPainter(out)
            try:
                record = await tell(stage, painter, interrupt)
            finally:
                painter.close()
    if interrupt.signum is not None:
        elapsed = monotonic() - stage.started
        print(f"\ninterrupted after {elapsed:.1f} s; everything stopped", file=out, flush=True)
        return 128 + interrupt.signum
    outcome = judge(record)
    print("\nsummary", file=out)
    for line in outcome.lines:
        print(f"  {line}", file=out)
    print(outcome.verdict, file=out, flush=True)
    return 0 if outcome.ok else 1


def run_demo(plan: Plan, *, out: TextIO = sys.stdout, live: bool | None = None) -> int:
    """Tell the story; the live view when `out` is a terminal, plain lines otherwise."""
    import uvloop

    if live is None:
        live = out.isatty()
    try:
        return uvloop.run(play(plan, out, live))
    except KeyboardInterrupt:  # Ctrl-C before the demo's own handler was in place
        return 128 + signal.SIGINT
