"""`canary-proxy demo --scenario fleet`: three replicas share one rollout through Redis; the
canary fails for the users behind one of them, that replica's guard rolls it back, and the
other two follow through the fleet. Printed with each replica's time from the first failure.

Everything runs in this process on loopback ports the kernel picks, except a `redis-server`
(Debian's package) started on a free port in a temporary folder and stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from proxy.app import Proxy
from proxy.control.fleet import Fleet
from proxy.core.config import Config, parse_config
from proxy.demo import (
    CANARY_REVISION,
    MAX_IN_FLIGHT,
    ROUTE,
    USER_HEADER,
    VERSION_HEADER,
    Crowd,
    DemoUpstream,
    quiet_proxy_log,
)

REPLICAS: Final = ("edge-1", "edge-2", "edge-3")
FAILING_REGION: Final = "eu"  # the users of the first replica; the canary fails only for them
WEIGHT: Final = 20  # percent
USERS_PER_REPLICA: Final = 100
HEALTHY_SECONDS: Final = 3.0
WATCH_SECONDS: Final = 3.0  # after the first failure: every replica must be at 0 % by then
AFTER_SECONDS: Final = 1.0  # traffic after the rollback: no canary request may come
SETTLE_SECONDS: Final = 0.2
POLL_SECONDS: Final = 0.002
REACH_SECONDS: Final = 1.0  # the promise: every replica applies a decision within a second
REDIS_READY_SECONDS: Final = 10.0


@dataclass(slots=True)
class Replica:
    name: str
    proxy: Proxy
    crowd: Crowd
    state_dir: Path
    zero_at: float | None = None  # wall clock its weight was first seen at 0

    def weight_bp(self) -> int:
        live = self.proxy.holder.current.routes[ROUTE].state
        return 0 if live.aborted else live.weight_bp


class RegionalCanary(DemoUpstream):
    """The canary: once `region_failing`, it fails every request from the failing region's
    users (and serves everyone else as usual)."""

    region_failing = False

    async def _handle(self, request: web.Request) -> web.Response:
        user = request.headers.get(USER_HEADER, "")
        if self.region_failing and user.startswith(FAILING_REGION):
            if self.first_failure is None:
                self.first_failure = time.time()
            headers = {VERSION_HEADER: self.version}
            return web.Response(status=500, text="simulated failure\n", headers=headers)
        return await super()._handle(request)


def fleet_config(
    replica: str, *, redis_url: str, stable: str, canary: str, state_dir: str
) -> Config:
    return parse_config(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "state_dir": state_dir,
            "timeouts": {"shutdown": "1s"},
            "cluster": {"redis": redis_url, "name": "demo-fleet", "replica": replica},
            "routes": [
                {
                    "name": ROUTE,
                    "stable": {"upstreams": [stable]},
                    "canary": {"upstreams": [canary], "revision": CANARY_REVISION},
                    "split": {"weight": WEIGHT, "sticky": {"header": USER_HEADER}},
                    "guard": {"window": "3s", "min_requests": 10, "max_error_rate": 0.05},
                }
            ],
        },
        base_dir=state_dir,
    )


@contextlib.asynccontextmanager
async def running_redis(folder: Path) -> AsyncIterator[str]:
    """A redis-server on a free loopback port, keeping nothing on disk; its URL."""
    server = shutil.which("redis-server")
    assert server is not None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        server,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        *("--dir", str(folder)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + REDIS_READY_SECONDS
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            if time.monotonic() > deadline or process.returncode is not None:
                raise RuntimeError("redis-server did not start")
            await asyncio.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def start_replica(
    name: str, *, redis_url: str, stable: str, canary: str, folder: Path
) -> Proxy:
    state_dir = folder / name
    state_dir.mkdir()
    config = fleet_config(
        name, redis_url=redis_url, stable=stable, canary=canary, state_dir=str(state_dir)
    )
    assert config.cluster is not None
    fleet = Fleet(config.cluster, name)
    await fleet.seed(route.name for route in config.routes)
    proxy = Proxy(config, config_path=None, fleet=fleet)
    await proxy.start()
    return proxy


async def play_fleet(out: TextIO, rate: float) -> int:
    if shutil.which("redis-server") is None:
        print(
            "canary-proxy demo: the fleet scenario needs redis-server"
            " (Debian: apt-get install redis-server)",
            file=out,
        )
        return 1
    rng = random.Random()
    with quiet_proxy_log(), tempfile.TemporaryDirectory(prefix="canary-proxy-fleet-") as temp:
        folder = Path(temp)
        async with contextlib.AsyncExitStack() as stack:
            redis_url = await stack.enter_async_context(running_redis(folder))
            stable, canary = DemoUpstream("stable", rng), RegionalCanary("canary", rng)
            for upstream in (stable, canary):
                await upstream.start()
                stack.push_async_callback(upstream.close)
            session = await stack.enter_async_context(
                ClientSession(
                    connector=TCPConnector(limit=MAX_IN_FLIGHT), timeout=ClientTimeout(total=10)
                )
            )
            replicas = []
            for index, name in enumerate(REPLICAS):
                proxy = await start_replica(
                    name, redis_url=redis_url, stable=stable.url, canary=canary.url, folder=folder
                )
                stack.push_async_callback(proxy.stop)
                host, port = proxy.data_address or ("127.0.0.1", 0)
                region = FAILING_REGION if index == 0 else f"region{index}"
                users = [f"{region}-user-{n}" for n in range(USERS_PER_REPLICA)]
                crowd = Crowd(session, f"http://{host}:{port}/", users, rate / len(REPLICAS), rng)
                replicas.append(Replica(name, proxy, crowd, folder / name))
            return await _tell(replicas, canary, out, rate)


async def _tell(
    replicas: Sequence[Replica], canary: RegionalCanary, out: TextIO, rate: float
) -> int:
    say = _printer(out)
    say(
        f"three replicas ({', '.join(r.name for r in replicas)}) share route {ROUTE} through"
        f" Redis; canary {CANARY_REVISION} at {WEIGHT} %, {rate:g} req/s over the three"
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.crowd.run(stop)) for r in replicas]
    try:
        await asyncio.sleep(HEALTHY_SECONDS)  # real time: healthy traffic on every replica
        say(f"{HEALTHY_SECONDS:g} s healthy: " + ", ".join(_line(r) for r in replicas))
        canary.region_failing = True
        say(f"the canary starts failing for the users behind {replicas[0].name} ({FAILING_REGION})")
        deadline = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < deadline and any(r.zero_at is None for r in replicas):
            for replica in replicas:
                if replica.zero_at is None and replica.weight_bp() == 0:
                    replica.zero_at = time.time()
            await asyncio.sleep(POLL_SECONDS)
        await asyncio.sleep(SETTLE_SECONDS)  # requests routed before the rollback finish
        served_before = _canary_answers(replicas)
        await asyncio.sleep(AFTER_SECONDS)  # real time: traffic after the rollback
        served_after = _canary_answers(replicas)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    first = canary.first_failure
    if first is None:
        say("the canary never failed: nothing to show")
        return 1
    ok = True
    for replica in replicas:
        decided = _decider(replica)
        if replica.zero_at is None:
            say(f"  {replica.name}: still sending users to the canary after {WATCH_SECONDS:g} s")
            ok = False
            continue
        took = replica.zero_at - first
        how = "its own guard rolled back" if decided is None else f"applied {decided}'s rollback"
        errors = replica.crowd.canary_errors
        say(
            f"  {replica.name}: weight 0 % {took * 1000:6.0f} ms after the first failure ({how});"
            f" its users got {errors} canary error{'' if errors == 1 else 's'}"
        )
    spread = [r.zero_at for r in replicas if r.zero_at is not None]
    if len(spread) == len(replicas):
        slowest = (max(spread) - min(spread)) * 1000
        say(f"slowest replica {slowest:.0f} ms after the first (the promise: within 1 s)")
        ok = ok and slowest <= REACH_SECONDS * 1000
    more = served_after - served_before
    say(f"requests the canary answered in the {AFTER_SECONDS:g} s after: {more}")
    ok = ok and more == 0
    say("every replica rolled back" if ok else "FAILED: not every replica rolled back in time")
    return 0 if ok else 1


def _canary_answers(replicas: Sequence[Replica]) -> int:
    return sum(r.proxy.holder.current.routes[ROUTE].canary_stats.requests for r in replicas)


def _line(replica: Replica) -> str:
    stats = replica.proxy.holder.current.routes[ROUTE].canary_stats
    return f"{replica.name} {replica.weight_bp() / 100:g} % ({stats.requests} canary requests)"


def _decider(replica: Replica) -> str | None:
    """The replica whose rollback this one applied (None: its own guard's)."""
    audit = replica.state_dir / "audit.jsonl"
    for line in reversed(audit.read_text().splitlines()):
        event = json.loads(line)
        if event.get("action") == "rollback":
            origin = event.get("replica")
            return origin if isinstance(origin, str) else None
    return None


def _printer(out: TextIO) -> Callable[[str], None]:
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:5.2f}s] {text}", file=out, flush=True)

    return say


def run_fleet_demo(*, rate: float, out: TextIO) -> int:
    import uvloop

    try:
        return uvloop.run(play_fleet(out, rate))
    except KeyboardInterrupt:
        return 130
