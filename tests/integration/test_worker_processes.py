"""Worker processes end to end (issue 7, "Must show"): `workers: 2` on real processes. Both
workers serve the port; errors spread over both trip the one guard once and both obey; the
metrics add up to the requests sent; a worker killed with SIGKILL under load costs only the
requests it had in flight and is replaced; reloads, admin verbs and a graceful shutdown reach
every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
from fakes import HOST, FakeUpstream, delay, eventually, reply
from proxy_process import (
    TOKEN_ENV,
    ProxyProcess,
    open_session,
    run_cli,
    running_proxy,
    scrape,
    values,
    write_config,
)

TOKEN: Final = "workers-token"
AUTH: Final = {"Authorization": f"Bearer {TOKEN}"}
CONNECTIONS: Final = 16  # enough that SO_REUSEPORT's hash puts some on each worker

Document = dict[str, Any]


def config(
    tmp_path: Path,
    stable: FakeUpstream,
    canary: FakeUpstream,
    *,
    weight: float = 10,
    guard: Document | None = None,
) -> Document:
    route: Document = {
        "name": "shop",
        "stable": {"upstreams": [stable.url]},
        "canary": {"upstreams": [canary.url], "revision": "v2"},
        "split": {"weight": weight},
    }
    if guard is not None:
        route["guard"] = guard
    return {
        "listen": f"{HOST}:0",
        "workers": 2,
        "admin": {"listen": f"{HOST}:0", "token_env": TOKEN_ENV},
        "state_dir": str(tmp_path / "state"),
        "timeouts": {"connect": "1s", "idle": "10s", "client_header": "5s", "shutdown": "5s"},
        "routes": [route],
    }


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path, document: Document) -> AsyncIterator[ProxyProcess]:
    async with running_proxy(write_config(tmp_path, document), token=TOKEN, within=30) as proxy:
        yield proxy


async def status(session: aiohttp.ClientSession, proxy: ProxyProcess) -> Document:
    async with session.get(proxy.admin_url + "/status") as response:
        assert response.status == 200
        document: Document = await response.json()
        return document


async def replaced(session: aiohttp.ClientSession, proxy: ProxyProcess, old: Document) -> bool:
    """Whether the worker slot `old` was in is served again, by a new process."""
    worker = (await status(session, proxy))["workers"][old["index"]]
    return bool(worker["ready"] and worker["pid"] != old["pid"])


async def send_requests(
    session: aiohttp.ClientSession, proxy: ProxyProcess, count: int
) -> list[int]:
    """`count` GETs, CONNECTIONS at a time (each on its own pooled connection): statuses."""
    gate = asyncio.Semaphore(CONNECTIONS)

    async def one() -> int:
        async with gate, session.get(proxy.url + "/") as response:
            await response.read()
            return response.status

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: bytes = b""
) -> bytes:
    """One GET on a raw keep-alive connection: the response head."""
    writer.write(b"GET / HTTP/1.1\r\nHost: shop\r\n" + headers + b"\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r")[0])
    await reader.readexactly(length)
    return head


async def total_requests(session: aiohttp.ClientSession, proxy: ProxyProcess) -> float:
    return sum(values(await scrape(session, proxy.admin_url), "canary_proxy_requests_total"))


async def test_both_workers_serve_and_the_metrics_add_up_to_the_requests_sent(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    async with (
        two_workers(tmp_path, config(tmp_path, stable, canary)) as proxy,
        open_session(limit=CONNECTIONS) as session,
    ):
        workers = (await status(session, proxy))["workers"]
        assert [w["index"] for w in workers] == [0, 1]
        assert len({w["pid"] for w in workers}) == 2
        assert proxy.process.pid not in {w["pid"] for w in workers}  # the supervisor serves none

        statuses = await send_requests(session, proxy, 600)
        assert statuses == [200] * 600

        async def counted() -> bool:  # reports arrive every 50 ms
            return await total_requests(session, proxy) == 600

        await eventually(counted)
        await asyncio.sleep(0.3)  # and nothing more comes: no count twice
        assert await total_requests(session, proxy) == 600
        assert len(stable.received) + len(canary.received) == 600
        per_worker = [w["requests"] for w in (await status(session, proxy))["workers"]]
        assert sum(per_worker) == 600
        assert all(n > 0 for n in per_worker), per_worker


async def test_errors_spread_over_both_workers_trip_the_guard_once_and_both_obey(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    guard = {"window": "5s", "min_requests": 20, "max_error_rate": 0.05}
    canary.answer_with(reply(500))
    async with (
        two_workers(tmp_path, config(tmp_path, stable, canary, weight=50, guard=guard)) as proxy,
        open_session(limit=CONNECTIONS) as session,
    ):
        await send_requests(session, proxy, 200)

        async def rolled_back() -> bool:
            route = (await status(session, proxy))["routes"][0]
            return bool(route["state"] == "aborted")

        await eventually(rolled_back)
        document = await status(session, proxy)
        assert all(w["requests"] > 0 for w in document["workers"]), document["workers"]
        samples = await scrape(session, proxy.admin_url)
        assert sum(values(samples, "canary_proxy_rollbacks_total", route="shop")) == 1
        async with session.get(proxy.admin_url + "/events") as response:
            events = (await response.json())["events"]
        assert [e["action"] for e in events].count("rollback") == 1

        await asyncio.sleep(1.0)  # every worker obeys within a second
        reached = len(canary.received)
        assert await send_requests(session, proxy, 200) == [200] * 200
        assert len(canary.received) == reached


async def test_a_guard_trips_on_errors_neither_worker_alone_had_enough_of(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    guard = {"window": "30s", "min_requests": 30, "max_error_rate": 0.05}
    canary.answer_with(reply(500))
    document = config(tmp_path, stable, canary, weight=0, guard=guard)
    document["routes"][0]["split"]["force"] = {"header": "X-Canary"}  # always: to the canary
    async with (
        two_workers(tmp_path, document) as proxy,
        open_session(limit=CONNECTIONS) as session,
        contextlib.AsyncExitStack() as held,
    ):
        # A connection held on each worker (the kernel picks the worker for a connection).
        on_worker: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        opened = 0
        while len(on_worker) < 2:
            assert opened < 64, "SO_REUSEPORT put 64 connections on one worker"
            before = [w["connections"] for w in (await status(session, proxy))["workers"]]
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            held.callback(writer.close)
            opened += 1
            await get(reader, writer)  # to stable: weight 0, not forced
            changed: list[int] = []

            async def counted(before: list[int] = before, changed: list[int] = changed) -> bool:
                now = [w["connections"] for w in (await status(session, proxy))["workers"]]
                changed[:] = [i for i, n in enumerate(now) if n > before[i]]
                return bool(changed)

            await eventually(counted)
            on_worker.setdefault(changed[0], (reader, writer))

        async def aborted() -> bool:
            route = (await status(session, proxy))["routes"][0]
            return bool(route["state"] == "aborted")

        forced = b"X-Canary: always\r\n"
        for _ in range(20):  # 20 errors on worker 0: below min_requests
            assert (await get(*on_worker[0], forced)).startswith(b"HTTP/1.1 500")

        async def reported() -> bool:  # in the supervisor's window too: one report carries both
            samples = await scrape(session, proxy.admin_url)
            return sum(values(samples, "canary_proxy_requests_total", version="canary")) == 20

        await eventually(reported)
        assert not await aborted()
        for _ in range(10):  # 10 on worker 1, below min_requests too: 30 in the one window
            assert (await get(*on_worker[1], forced)).startswith(b"HTTP/1.1 500")
        await eventually(aborted)
        assert len(canary.received) == 30

        async def to_stable() -> bool:  # the trip reaches worker 1 with the next states message
            return (await get(*on_worker[1], forced)).startswith(b"HTTP/1.1 200")

        await eventually(to_stable)


async def test_an_admin_verb_and_a_reload_reach_every_worker(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    document = config(tmp_path, stable, canary, weight=0)
    async with (
        two_workers(tmp_path, document) as proxy,
        open_session(limit=CONNECTIONS) as session,
    ):
        environment = {**os.environ, "CANARY_PROXY_ADMIN_TOKEN": TOKEN}
        code, _, err = await run_cli(
            "set-weight", "shop", "100", "--admin", proxy.admin_url, env=environment
        )
        assert code == 0, err
        # No pause: the admin API answers once every worker applies the change.
        before = len(canary.received)
        served_before = [w["requests"] for w in (await status(session, proxy))["workers"]]
        await send_requests(session, proxy, 100)
        assert len(canary.received) == before + 100  # every worker sends all to the canary

        async def both_served() -> bool:  # so both workers had the message
            served = [w["requests"] for w in (await status(session, proxy))["workers"]]
            return sum(served) - sum(served_before) == 100 and all(
                now > was for now, was in zip(served, served_before, strict=True)
            )

        await eventually(both_served)

        async with FakeUpstream("stable-2") as replacement:
            document["routes"][0]["stable"] = {"upstreams": [replacement.url]}
            document["routes"][0]["canary"]["revision"] = "v3"  # a new revision: weight 0 again
            document["routes"][0]["split"]["weight"] = 0
            proxy.config_path.write_text(json.dumps(document))
            code, out, err = await run_cli("reload", "--admin", proxy.admin_url, env=environment)
            assert code == 0, err + out
            await send_requests(session, proxy, 100)
            assert len(replacement.received) == 100


async def test_a_worker_killed_under_load_costs_only_its_in_flight_requests_and_comes_back(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    async with (
        two_workers(tmp_path, config(tmp_path, stable, canary)) as proxy,
        open_session(limit=CONNECTIONS) as session,
    ):
        victim = (await status(session, proxy))["workers"][0]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        failed_at: list[list[float]] = [[] for _ in range(CONNECTIONS)]
        successes = [0] * CONNECTIONS

        async def client(number: int) -> None:
            """One keep-alive connection at a time, one request in flight; after a failure it
            opens a new connection."""
            while not stop.is_set():
                try:
                    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                except OSError:
                    failed_at[number].append(loop.time())
                    continue
                try:
                    while not stop.is_set():
                        head = await get(reader, writer)
                        assert head.startswith(b"HTTP/1.1 200"), head
                        successes[number] += 1
                except (OSError, asyncio.IncompleteReadError):
                    failed_at[number].append(loop.time())
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()

        clients = [asyncio.create_task(client(n)) for n in range(CONNECTIONS)]
        await asyncio.sleep(1.0)
        killed_at = loop.time()
        os.kill(victim["pid"], signal.SIGKILL)

        await eventually(lambda: replaced(session, proxy, victim), within=10)
        replaced_at = loop.time()
        before = list(successes)
        await asyncio.sleep(1.0)  # traffic goes on, over both workers
        stop.set()
        await asyncio.gather(*clients)

        failures = [len(times) for times in failed_at]
        # Each client lost its one request in flight on the killed worker, and at most one
        # more: a reconnection the kernel had queued on the dying worker's listener.
        assert all(n <= 2 for n in failures), failures
        assert sum(failures) > 0, failures
        assert sum(1 for n in failures if n) < CONNECTIONS  # only the victim's connections
        every_failure = [t for times in failed_at for t in times]
        assert all(killed_at <= t <= replaced_at for t in every_failure)  # none before or after
        assert all(after > was for after, was in zip(successes, before, strict=True))
        worker = (await status(session, proxy))["workers"][0]
        assert worker["restarts"] == 1
        assert "exited with signal SIGKILL" in proxy.logged()

        # No count lost, none twice: every response a client had is counted, and at most the
        # failed requests besides (a response counted, then cut off by the kill).
        served = sum(successes)

        async def all_counted() -> bool:
            return await total_requests(session, proxy) >= served

        await eventually(all_counted)
        await asyncio.sleep(0.3)
        assert served <= await total_requests(session, proxy) <= served + sum(failures)


async def test_what_a_worker_counted_just_before_it_was_killed_is_in_the_metrics(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    async with (
        two_workers(tmp_path, config(tmp_path, stable, canary)) as proxy,
        open_session(limit=CONNECTIONS) as session,
    ):
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        await get(reader, writer)

        holders: list[Document] = []

        async def found_the_worker() -> bool:  # the one that holds the connection
            workers = (await status(session, proxy))["workers"]
            holders[:] = [w for w in workers if w["connections"] == 1]
            return bool(holders)

        await eventually(found_the_worker)
        victim = holders[0]
        for _ in range(29):
            await get(reader, writer)
        # At once: the worker's reports (every 50 ms) have not yet brought the last responses.
        os.kill(victim["pid"], signal.SIGKILL)
        writer.close()

        await eventually(lambda: replaced(session, proxy, victim), within=10)

        async def thirty() -> bool:
            return await total_requests(session, proxy) == 30

        await eventually(thirty)
        await asyncio.sleep(0.3)  # and no more: none counted twice
        assert await total_requests(session, proxy) == 30
        assert len(stable.received) + len(canary.received) == 30


async def test_a_change_does_not_wait_for_a_worker_that_dies_meanwhile(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    async with (
        two_workers(tmp_path, config(tmp_path, stable, canary)) as proxy,
        open_session(limit=CONNECTIONS) as session,
    ):
        stopped = (await status(session, proxy))["workers"][1]
        os.kill(stopped["pid"], signal.SIGSTOP)  # it cannot confirm the change

        async def set_weight() -> int:
            async with session.put(
                proxy.admin_url + "/routes/shop/weight", json={"weight": 50}, headers=AUTH
            ) as response:
                return response.status

        answer = asyncio.create_task(set_weight())
        await asyncio.sleep(0.2)  # the supervisor waits for the stopped worker (up to 1 s)
        os.kill(stopped["pid"], signal.SIGKILL)
        assert await answer == 200
        # Answered when the worker was gone (its replacement starts on the new weight), not
        # when the wait for its confirmation ran out.
        assert "did not confirm" not in proxy.logged()
        await eventually(lambda: replaced(session, proxy, stopped), within=10)


async def test_sigterm_drains_every_worker_and_exits_0(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    stable.answer_with(delay(1.0, reply(200, body=b"slow but complete")))
    async with (
        two_workers(tmp_path, config(tmp_path, stable, canary, weight=0)) as proxy,
        open_session(limit=CONNECTIONS) as session,
    ):
        pids = [w["pid"] for w in (await status(session, proxy))["workers"]]
        in_flight = asyncio.create_task(send_requests(session, proxy, CONNECTIONS))
        await eventually(lambda: len(stable.received) == CONNECTIONS)
        assert await proxy.shut_down(within=15) == 0
        assert await in_flight == [200] * CONNECTIONS

        assert all(_gone(pid) for pid in pids)  # the supervisor waited for its workers


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_workers_that_cannot_listen_fail_the_start_at_once(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    with socket.socket() as taken:  # a plain listener: SO_REUSEPORT cannot share its port
        taken.bind((HOST, 0))
        taken.listen()
        document = config(tmp_path, stable, canary)
        document["listen"] = f"{HOST}:{taken.getsockname()[1]}"
        code, _, err = await run_cli("run", "--config", str(write_config(tmp_path, document)))
    assert code == 1
    assert "address already in use" in err
    assert "workers did not start listening" in err
    assert "Traceback" not in err


async def test_a_stuck_worker_is_killed_and_replaced(
    tmp_path: Path, stable: FakeUpstream, canary: FakeUpstream
) -> None:
    async with (
        two_workers(tmp_path, config(tmp_path, stable, canary)) as proxy,
        open_session(limit=CONNECTIONS) as session,
    ):
        stuck = (await status(session, proxy))["workers"][1]
        os.kill(stuck["pid"], signal.SIGSTOP)  # alive, but silent: it no longer reports

        await eventually(lambda: replaced(session, proxy, stuck), within=15)
        assert "has not reported for" in proxy.logged()
        assert await send_requests(session, proxy, 100) == [200] * 100
        async with session.get(proxy.admin_url + "/readyz") as response:
            assert response.status == 200
