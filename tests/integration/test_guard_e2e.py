"""The live guard and the ramp end to end, on real `canary-proxy run` processes (issue 4, "Must
show"; docs/semantics.md): a rollback under ~1 000 req/s within a second of the canary failing, with
few failed user requests; the state file and audit log say why; the abort survives `kill -9`
until `retry` or a new canary revision; observe mode changes nothing; a healthy ramp reaches
promoted step by step; a reload that changes nothing about a route keeps its state and windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Final

import aiohttp
from fakes import HOST, FakeUpstream, eventually, reply
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
from traffic import Traffic

TOKEN: Final = "guard-e2e-token"
AUTH: Final = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUTS: Final = {
    "connect": "1s",
    "response_header": "5s",
    "idle": "10s",
    "client_header": "5s",
    "shutdown": "1s",
}

Document = dict[str, Any]


# -- a real proxy process and its admin API ----------------------------------------------------


def proxy_config(
    tmp_path: Path,
    stable: FakeUpstream,
    canary: FakeUpstream,
    *,
    weight: float | None = 10,
    revision: str = "v2",
    guard: Document | None = None,
    rollout: Document | None = None,
    timeouts: dict[str, str] | None = None,
) -> Document:
    route: Document = {
        "name": "shop",
        "stable": {"upstreams": [stable.url]},
        "canary": {"upstreams": [canary.url], "revision": revision},
        "split": {"force": {"header": "X-Canary"}},
    }
    if weight is not None:  # a rollout starts at its first step: no weight of its own
        route["split"]["weight"] = weight
    if guard is not None:
        route["guard"] = guard
    if rollout is not None:
        route["rollout"] = rollout
    return {
        "listen": f"{HOST}:0",
        "admin": {"listen": f"{HOST}:0", "token_env": TOKEN_ENV},
        "state_dir": str(tmp_path / "state"),
        "timeouts": timeouts or TIMEOUTS,
        "routes": [route],
    }


async def route_doc(session: aiohttp.ClientSession, proxy: ProxyProcess) -> Document:
    async with session.get(proxy.admin_url + "/routes/shop") as response:
        assert response.status == 200, await response.text()
        document: Document = await response.json()
        return document


async def events(session: aiohttp.ClientSession, proxy: ProxyProcess) -> list[Document]:
    async with session.get(proxy.admin_url + "/events?limit=200") as response:
        assert response.status == 200, await response.text()
        body: Document = await response.json()
    listed: list[Document] = body["events"]
    return listed


async def post(
    session: aiohttp.ClientSession, proxy: ProxyProcess, path: str, body: Document | None = None
) -> tuple[int, Document]:
    async with session.post(proxy.admin_url + path, json=body, headers=AUTH) as response:
        document: Document = await response.json()
        return response.status, document


async def wait_for_route(
    session: aiohttp.ClientSession,
    proxy: ProxyProcess,
    done: str,
    within: float,
    every: float = 0.05,
) -> Document:
    """Poll GET /routes/shop until its state is `done` (bounded)."""
    document: Document = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            # polling: the proxy is another process, with no event to wait on
            while (document := await route_doc(session, proxy))["state"] != done:  # noqa: ASYNC110
                await asyncio.sleep(every)
    assert document["state"] == done, (document, proxy.logged()[-2000:])
    return document


def read_state(tmp_path: Path) -> Document:
    document: Document = json.loads((tmp_path / "state" / "state.json").read_text())
    route: Document = document["routes"]["shop"]
    return route


def read_audit(tmp_path: Path) -> list[Document]:
    lines = (tmp_path / "state" / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


async def send_batch(
    session: aiohttp.ClientSession, proxy: ProxyProcess, count: int, *, concurrency: int = 16
) -> list[tuple[int, str]]:
    """`count` GETs, `concurrency` at a time: (status, X-Version) each."""
    results: list[tuple[int, str]] = []
    numbers = iter(range(count))

    async def worker() -> None:
        for n in numbers:
            async with session.get(f"{proxy.url}/batch/{n}") as response:
                await response.read()
                results.append((response.status, response.headers.get("X-Version", "")))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


# -- T-rollback-under-load ---------------------------------------------------------------------

GUARD: Final[Document] = {"window": "2s", "min_requests": 20, "max_error_rate": 0.05}
LOAD_CLIENTS: Final = 16
LOAD_RATE: Final = 1000.0  # requests per second, all clients together
HEALTHY_SECONDS: Final = 2.0
AFTER_SWITCH_SECONDS: Final = 3.0


async def test_a_failing_canary_under_load_is_rolled_back_within_a_second_and_stays_aborted(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    config = proxy_config(tmp_path, stable, canary, weight=10, guard=GUARD)
    path = write_config(tmp_path, config)
    async with running_proxy(path, token=TOKEN) as proxy, open_session() as admin:
        traffic = Traffic(proxy.url, LOAD_CLIENTS, LOAD_RATE)
        traffic.start()
        try:
            began = time.monotonic()
            await asyncio.sleep(HEALTHY_SECONDS)  # healthy traffic for a while: real time
            healthy = list(traffic.seen)
            healthy_rate = len(healthy) / (time.monotonic() - began)
            assert {(s.status, s.version) for s in healthy} == {
                (200, "stable"),
                (200, "canary"),
            }, traffic.failures[:5]
            before = await route_doc(admin, proxy)
            assert (before["state"], before["weight"]) == ("steady", 10)
            assert before["window"]["canary"]["requests"] >= GUARD["min_requests"], before

            switched = time.time()
            canary.answer_with(reply(500))
            aborted = await wait_for_route(admin, proxy, "aborted", within=3.0, every=0.02)
            # reported, so already on disk: read at once, under load
            reported = read_state(tmp_path)
            assert (reported["state"], reported["weight_bp"]) == ("aborted", 0), reported
            assert reported["reason"] == aborted["reason"], (reported, aborted)
            assert aborted["weight"] == 0, aborted
            await asyncio.sleep(AFTER_SWITCH_SECONDS)  # traffic after the rollback: real time
        finally:
            await traffic.finish()

        # -- what the users saw
        assert traffic.failures == [], traffic.failures[:10]
        kinds = {(s.status, s.version) for s in traffic.seen}
        assert kinds <= {(200, "stable"), (200, "canary"), (500, "canary")}, kinds
        failed = [s for s in traffic.seen if s.status == 500]
        assert failed, "the canary never failed: the test did not test anything"
        assert len(failed) <= GUARD["min_requests"] + 10, len(failed)

        # -- the audit trail and the state file (what the proxy reported had been written)
        audit = read_audit(tmp_path)
        rollbacks = [e for e in audit if e["action"] == "rollback"]
        assert len(rollbacks) == 1, audit
        rollback = rollbacks[0]
        assert (rollback["actor"], rollback["route"], rollback["after"]) == (
            "guard",
            "shop",
            "aborted",
        )
        assert (rollback["weight_before_bp"], rollback["weight_after_bp"]) == (1000, 0)
        assert "canary error rate" in rollback["reason"], rollback
        state = read_state(tmp_path)
        assert (state["state"], state["weight_bp"]) == ("aborted", 0), state
        assert "canary error rate" in state["reason"], state
        assert state["reason"] == rollback["reason"] == aborted["reason"]
        listed = [e for e in await events(admin, proxy) if e["action"] == "rollback"]
        assert listed == [rollback]

        # -- how fast. The switch is the moment the test told the canary to answer 500 (wall
        # clock); the first 500 a client saw comes a little after it. The rollback took effect
        # at its event's `at`: the proxy stamps it (wall clock, same machine) in the same
        # synchronous step that sets the weight to 0, before the next request is routed. As a
        # cross-check from the users' side: the last canary answer any client saw (in-flight
        # requests routed just before the rollback finish a little after it).
        first_failure = min(s.answered for s in failed)
        last_canary = max(s.answered for s in traffic.seen if s.version == "canary")
        took_effect = float(rollback["at"])
        latency = took_effect - switched
        print(
            f"\nload {healthy_rate:.0f} req/s healthy; rollback {latency * 1000:.0f} ms after "
            f"the switch ({(took_effect - first_failure) * 1000:.0f} ms after the first 500 a "
            f"client saw); last canary answer {(last_canary - switched) * 1000:.0f} ms after "
            f"the switch; {len(failed)} failed user requests of {len(traffic.seen)}"
        )
        assert healthy_rate >= 0.5 * LOAD_RATE, f"the load was only {healthy_rate:.0f} req/s"
        assert 0 <= latency <= 1.0, latency
        assert first_failure <= took_effect + 0.5  # the failures the guard saw, users saw too
        assert last_canary - switched <= 1.0, last_canary - switched

        # -- after the rollback every request goes to stable
        after = [s for s in traffic.seen if s.sent > took_effect]
        assert len(after) >= 0.5 * LOAD_RATE * AFTER_SWITCH_SECONDS, len(after)
        assert {(s.status, s.version) for s in after} == {(200, "stable")}

        # -- metrics agree with the audit log
        samples = await scrape(admin, proxy.admin_url)
        # One rollback, under its reason; the other reasons are exported at 0.
        assert sorted(values(samples, "canary_proxy_rollbacks_total", route="shop")) == [
            0.0,
            0.0,
            0.0,
            1.0,
        ]
        assert values(
            samples, "canary_proxy_rollbacks_total", route="shop", reason="error_rate"
        ) == [1.0]
        assert values(samples, "canary_proxy_rollout_state", route="shop", state="aborted") == [1.0]
        states = values(samples, "canary_proxy_rollout_state", route="shop")
        assert sum(states) == 1.0, states
        assert values(samples, "canary_proxy_canary_weight_ratio", route="shop") == [0.0]

        # -- kill -9: nothing gets a chance to run on the way out
        os.kill(proxy.process.pid, signal.SIGKILL)
        async with asyncio.timeout(5):
            assert await proxy.process.wait() == -signal.SIGKILL

    canary.answer_with(reply())  # healthy again: only the saved abort keeps it out
    async with running_proxy(path, token=TOKEN) as proxy, open_session() as admin:
        restored = await route_doc(admin, proxy)
        assert (restored["state"], restored["weight"]) == ("aborted", 0), restored
        assert "canary error rate" in restored["reason"], restored
        async with admin.get(proxy.admin_url + "/status") as response:
            status = await response.json()
        assert [(r["name"], r["state"]) for r in status["routes"]] == [("shop", "aborted")]
        canary_before = len(canary.received)
        answers = await send_batch(admin, proxy, 200)
        assert answers == [(200, "stable")] * 200
        assert len(canary.received) == canary_before  # not a single request
        # forced users are evicted as well (docs/semantics.md, Version decision)
        async with admin.get(proxy.url + "/forced", headers={"X-Canary": "always"}) as response:
            assert response.headers["X-Version"] == "stable"
        assert len(canary.received) == canary_before

        # -- `canary-proxy retry` lets the canary back in
        code, out, err = await run_cli(
            "retry", "shop", "--admin", proxy.admin_url, "--token", TOKEN
        )
        assert code == 0, (out, err)
        assert "shop" in out, out
        assert "steady" in out, out
        retried = await route_doc(admin, proxy)
        assert (retried["state"], retried["weight"]) == ("steady", 10), retried
        answers = await send_batch(admin, proxy, 300)
        assert set(answers) == {(200, "stable"), (200, "canary")}
        assert len(canary.received) > canary_before
        assert read_state(tmp_path)["state"] == "steady"

        # -- a new canary revision clears an abort too (reload)
        status_code, document = await post(admin, proxy, "/routes/shop/abort", {"reason": "again"})
        assert (status_code, document["state"]) == (200, "aborted"), document
        assert await send_batch(admin, proxy, 50) == [(200, "stable")] * 50
        write_config(tmp_path, {**config, "routes": [_revised(config, "v3")]})
        status_code, reloaded = await post(admin, proxy, "/reload")
        assert status_code == 200, reloaded
        fresh = await route_doc(admin, proxy)
        assert (fresh["state"], fresh["weight"], fresh["revision"]) == ("steady", 10, "v3")
        canary_before = len(canary.received)
        answers = await send_batch(admin, proxy, 300)
        assert set(answers) == {(200, "stable"), (200, "canary")}
        assert len(canary.received) > canary_before
        new_revision = [e for e in await events(admin, proxy) if e["action"] == "new_revision"]
        assert [(e["actor"], e["before"], e["after"]) for e in new_revision] == [
            ("config", "aborted", "steady")
        ]
        assert read_state(tmp_path)["revision"] == "v3"


def _revised(config: Document, revision: str) -> Document:
    route: Document = json.loads(json.dumps(config["routes"][0]))
    route["canary"]["revision"] = revision
    return route


# -- T-observe ---------------------------------------------------------------------------------


async def test_observe_mode_records_the_breach_and_changes_nothing(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    config = proxy_config(tmp_path, stable, canary, guard={**GUARD, "action": "observe"})
    async with (
        running_proxy(write_config(tmp_path, config), token=TOKEN) as proxy,
        open_session() as admin,
    ):
        traffic = Traffic(proxy.url, 8, 400.0)
        traffic.start()
        weights: list[tuple[str, float]] = []
        try:
            await eventually(lambda: traffic.count("canary") >= 30, within=5.0)
            canary.answer_with(reply(500))
            switched = time.time()
            observed: list[Document] = []
            async with asyncio.timeout(5):
                while not observed:
                    document = await route_doc(admin, proxy)
                    weights.append((document["state"], document["weight"]))
                    observed = [
                        e for e in await events(admin, proxy) if e["action"] == "observe_breach"
                    ]
                    await asyncio.sleep(0.05)
            # keep watching for longer than the rollback would have needed, and until the
            # canary, still failing a guard window later, has been counted again
            async with asyncio.timeout(10):
                while time.time() < switched + 2.0 or len(observed) < 2:
                    document = await route_doc(admin, proxy)
                    weights.append((document["state"], document["weight"]))
                    observed = [
                        e for e in await events(admin, proxy) if e["action"] == "observe_breach"
                    ]
                    await asyncio.sleep(0.05)
        finally:
            await traffic.finish()

        assert traffic.failures == [], traffic.failures[:10]
        assert set(weights) == {("steady", 10)}, set(weights)
        breach = observed[0]
        assert (breach["actor"], breach["route"], breach["after"]) == ("guard", "shop", "steady")
        # counted at most once per guard window (2 s) while it lasts
        assert float(observed[1]["at"]) - float(breach["at"]) >= 2.0, observed
        assert breach["weight_after_bp"] == breach["weight_before_bp"] == 1000
        assert "canary error rate" in breach["reason"], breach
        assert not [e for e in await events(admin, proxy) if e["action"] == "rollback"]
        # traffic kept reaching the (failing) canary after the breach was noted
        later = [s for s in traffic.seen if s.sent > float(breach["at"]) + 0.1]
        assert sum(1 for s in later if s.version == "canary") >= 20, len(later)
        assert all(s.status == 500 for s in later if s.version == "canary")
        state = read_state(tmp_path)
        assert (state["state"], state["weight_bp"]) == ("steady", 1000), state
        samples = await scrape(admin, proxy.admin_url)
        assert set(values(samples, "canary_proxy_rollbacks_total", route="shop")) == {0.0}
        breaches = "canary_proxy_guard_breaches_total"
        assert values(samples, breaches, route="shop", action="rollback") == [0.0]
        # one count per audited breach (the canary still fails: there may be one more by now)
        (counted,) = values(samples, breaches, route="shop", action="observe")
        assert counted >= len(observed), (counted, observed)
        assert values(samples, "canary_proxy_canary_weight_ratio", route="shop") == [0.1]


# -- T-ramp ------------------------------------------------------------------------------------


async def test_a_healthy_ramp_goes_through_every_step_to_promoted(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    config = proxy_config(
        tmp_path,
        stable,
        canary,
        weight=None,
        guard={"window": "2s", "min_requests": 5, "max_error_rate": 0.05},
        rollout={"steps": [5, 25, 50, 100], "interval": "1s"},
    )
    async with (
        running_proxy(write_config(tmp_path, config), token=TOKEN) as proxy,
        open_session() as admin,
    ):
        start = await route_doc(admin, proxy)
        assert (start["state"], start["weight"]) == ("progressing", 5), start
        assert start["step"] == {"index": 0, "count": 4}
        traffic = Traffic(proxy.url, 8, 400.0)  # 5 % of it is 20 canary requests a second
        traffic.start()
        try:
            promoted = await wait_for_route(admin, proxy, "promoted", within=20.0, every=0.1)
            promoted_at = time.time()
            await eventually(
                lambda: any(s.sent > promoted_at + 0.1 for s in traffic.seen), within=5.0
            )
        finally:
            await traffic.finish()

    assert traffic.failures == [], traffic.failures[:10]
    assert {s.status for s in traffic.seen} == {200}
    assert promoted["weight"] == 100, promoted
    steps = [
        (e["actor"], e["before"], e["after"], e["weight_before_bp"], e["weight_after_bp"])
        for e in read_audit(tmp_path)
        if e["action"] == "advance"
    ]
    assert steps == [
        ("guard", "progressing", "progressing", 500, 2500),
        ("guard", "progressing", "progressing", 2500, 5000),
        ("guard", "progressing", "promoted", 5000, 10000),
    ]
    assert not [e for e in read_audit(tmp_path) if e["action"] == "rollback"]
    # promoted: everyone is on the canary
    after = [s for s in traffic.seen if s.sent > promoted_at + 0.1]
    assert {s.version for s in after} == {"canary"}
    assert read_state(tmp_path)["state"] == "promoted"


# -- T-reload-keeps-state ----------------------------------------------------------------------


async def test_a_reload_that_changes_nothing_about_a_route_keeps_its_state_and_windows(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    config = proxy_config(
        tmp_path,
        stable,
        canary,
        weight=None,
        guard={"window": "30s", "min_requests": 1000, "max_error_rate": 0.05},
        rollout={"steps": [5, 50], "interval": "60s"},
    )
    path = write_config(tmp_path, config)
    async with running_proxy(path, token=TOKEN) as proxy, open_session() as admin:
        forced = {"X-Canary": "always"}
        for n in range(40):
            async with admin.get(f"{proxy.url}/forced/{n}", headers=forced) as response:
                assert response.headers["X-Version"] == "canary"
        await send_batch(admin, proxy, 40)
        before = await route_doc(admin, proxy)
        assert before["state"] == "progressing", before
        assert before["window"]["canary"]["requests"] >= 40, before
        saved = read_state(tmp_path)
        events_before = await events(admin, proxy)

        for number, state in enumerate(("progressing", "paused")):
            if state == "paused":
                status, paused = await post(admin, proxy, "/routes/shop/pause")
                assert (status, paused["state"]) == (200, "paused"), paused
                before = paused
                saved = read_state(tmp_path)
                events_before = await events(admin, proxy)
            # only the timeouts change
            timeouts = {**TIMEOUTS, "response_header": f"{4 - number}s"}
            path.write_text(json.dumps({**config, "timeouts": timeouts}))
            status, reloaded = await post(admin, proxy, "/reload")
            assert status == 200, reloaded

            after = await route_doc(admin, proxy)
            assert (after["state"], after["weight"], after["step"], after["reason"]) == (
                before["state"],
                before["weight"],
                before["step"],
                before["reason"],
            )
            assert (
                after["window"]["canary"]["requests"] >= before["window"]["canary"]["requests"]
            ), (before["window"], after["window"])
            assert (
                after["window"]["stable"]["requests"] >= before["window"]["stable"]["requests"]
            ), (before["window"], after["window"])
            assert read_state(tmp_path) == saved  # not even the ramp's dwell restarted
            assert await events(admin, proxy) == events_before  # nothing happened to the route
