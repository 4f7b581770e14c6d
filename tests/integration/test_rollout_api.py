"""The rollout verbs of the admin API (docs/admin-api.md) and the CLI (docs/cli.md): every verb
from every state it applies to, what each answers (the ROUTE document, or 400/401/404/409 with
a message), the audit trail in GET /events, and the state file on disk after each response.

The proxy runs in-process (data plane and admin listener on port 0, a bearer token from a
token file); the CLI runs as a real `canary-proxy` subprocess against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import pytest
import yaml
from fakes import TEST_TIMEOUTS, FakeUpstream, unused_port
from proxy_process import run_cli

from proxy.app import Proxy
from proxy.control.loader import load_config_file

TOKEN: Final = "rollout-api-token-5d1e"
AUTH: Final = {"Authorization": f"Bearer {TOKEN}"}
STEPS: Final = [10, 50, 100]
ROUTE_KEYS: Final = {"name", "weight", "state", "reason", "revision", "step", "window", "verdict"}

Document = dict[str, Any]


# -- an in-process proxy -----------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Running:
    proxy: Proxy
    admin: str  # admin base URL
    data: str  # data plane base URL
    state_dir: Path
    session: aiohttp.ClientSession

    # -- admin calls

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Document]:
        async with self.session.request(
            method,
            self.admin + path,
            json=json_body,
            data=data,
            headers=AUTH if headers is None else headers,
        ) as response:
            body: Document = await response.json()
            return response.status, body

    async def verb(self, route: str, verb: str, body: object = None) -> tuple[int, Document]:
        """POST /routes/{route}/{verb}; `weight` is the PUT; `promote?to=100` keeps its query."""
        if verb == "weight":
            return await self.call("PUT", f"/routes/{route}/weight", json_body=body)
        return await self.call("POST", f"/routes/{route}/{verb}", json_body=body)

    async def ok(self, route: str, verb: str, body: object = None) -> Document:
        status, document = await self.verb(route, verb, body)
        assert status == 200, document
        return document

    async def route(self, name: str) -> Document:
        async with self.session.get(f"{self.admin}/routes/{name}") as response:
            assert response.status == 200
            document: Document = await response.json()
            return document

    async def events(self) -> list[Document]:
        async with self.session.get(f"{self.admin}/events?limit=200") as response:
            assert response.status == 200
            body: Document = await response.json()
        listed: list[Document] = body["events"]
        return listed

    # -- the data plane

    async def version(self, path: str = "/", headers: dict[str, str] | None = None) -> str:
        async with self.session.get(self.data + path, headers=headers) as response:
            assert response.status == 200, await response.text()
            await response.read()
            return response.headers["X-Version"]

    # -- disk

    def saved(self, name: str) -> Document:
        """The route's record in state.json, as it is on disk right now."""
        document: Document = json.loads((self.state_dir / "state.json").read_text())
        record: Document = document["routes"][name]
        return record

    def audit(self) -> list[Document]:
        lines = (self.state_dir / "audit.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


class Start(Protocol):
    async def __call__(self, *, interval: str = "1h") -> Running: ...


@pytest.fixture
async def start(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> AsyncIterator[Start]:
    """A proxy with two routes: `plain` (/plain, static 5 %, no rollout) and `shop` (everything
    else, a ramp 10 -> 50 -> 100 with a long dwell, force header X-Canary, sticky X-User-ID)."""
    started: list[Proxy] = []

    async def make(*, interval: str = "1h") -> Running:
        token_file = tmp_path / "admin.token"
        token_file.write_text(TOKEN + "\n")
        versions = {
            "stable": {"upstreams": [stable.url], "revision": "v1"},
            "canary": {"upstreams": [canary.url], "revision": "v2"},
        }
        document = {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0", "token_file": str(token_file)},
            "state_dir": str(tmp_path / "state"),
            "timeouts": TEST_TIMEOUTS,
            "routes": [
                {
                    "name": "plain",
                    "match": {"path_prefix": "/plain"},
                    **versions,
                    "split": {"weight": 5, "force": {"header": "X-Canary"}},
                },
                {
                    "name": "shop",
                    **versions,
                    "split": {
                        "sticky": {"header": "X-User-ID"},
                        "force": {"header": "X-Canary"},
                    },
                    "rollout": {"steps": STEPS, "interval": interval},
                },
            ],
        }
        path = tmp_path / "proxy.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        proxy = Proxy(load_config_file(str(path)), config_path=str(path))
        started.append(proxy)
        await proxy.start()
        assert proxy.admin_address is not None
        assert proxy.data_address is not None
        return Running(
            proxy=proxy,
            admin=f"http://127.0.0.1:{proxy.admin_address[1]}",
            data=f"http://127.0.0.1:{proxy.data_address[1]}",
            state_dir=tmp_path / "state",
            session=session,
        )

    yield make
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def running(start: Start) -> Running:
    return await start()


# -- every verb from every state -------------------------------------------------------------

# (route, setup verbs) for each starting state.
STATES: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "steady": ("plain", ()),
    "paused (no steps)": ("plain", ("pause",)),
    "progressing": ("shop", ()),
    "paused": ("shop", ("pause",)),
    "promoted": ("shop", ("promote?to=100",)),
    "aborted": ("shop", ("abort",)),
}
VERBS: Final = ("promote", "promote?to=100", "abort", "pause", "resume", "retry", "weight")
# What each verb does from each state: (state, weight percent) after it, or None for 409.
OUTCOMES: Final[dict[str, dict[str, tuple[str, float] | None]]] = {
    "steady": {
        "promote": None,  # no steps to go through
        "promote?to=100": ("promoted", 100),
        "abort": ("aborted", 0),
        "pause": ("paused", 5),
        "resume": None,
        "retry": None,
        "weight": ("steady", 12.5),
    },
    "paused (no steps)": {
        "promote": None,
        "promote?to=100": ("promoted", 100),
        "abort": ("aborted", 0),
        "pause": None,
        "resume": ("steady", 5),
        "retry": None,
        "weight": ("paused", 12.5),
    },
    "progressing": {
        "promote": ("progressing", 50),
        "promote?to=100": ("promoted", 100),
        "abort": ("aborted", 0),
        "pause": ("paused", 10),
        "resume": None,
        "retry": None,
        "weight": ("paused", 12.5),
    },
    "paused": {
        "promote": ("progressing", 50),  # a paused ramp resumes at the next step
        "promote?to=100": ("promoted", 100),
        "abort": ("aborted", 0),
        "pause": None,
        "resume": ("progressing", 10),
        "retry": None,
        "weight": ("paused", 12.5),
    },
    "promoted": {
        "promote": None,
        "promote?to=100": None,
        "abort": ("aborted", 0),
        "pause": None,
        "resume": None,
        "retry": None,
        "weight": ("paused", 12.5),
    },
    "aborted": {
        "promote": None,
        "promote?to=100": None,
        "abort": None,
        "pause": None,
        "resume": None,
        "retry": ("progressing", 10),  # from the first step again
        "weight": None,
    },
}
ACTIONS: Final = {"promote?to=100": "promote", "weight": "set_weight"}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("state", list(STATES))
async def test_every_verb_from_every_state(running: Running, state: str, verb: str) -> None:
    name, setup = STATES[state]
    for step in setup:
        await running.ok(name, step)
    before = await running.route(name)
    assert before["state"] == state.split(" ", maxsplit=1)[0], before
    events_before = await running.events()
    saved_before = running.saved(name)

    status, document = await running.verb(
        name, verb, {"weight": 12.5} if verb == "weight" else None
    )

    expected = OUTCOMES[state][verb]
    if expected is None:
        assert status == 409, document
        message = document["error"]
        assert name in message, message
        if name == "plain" and verb == "promote":
            assert "no rollout steps" in message, message
        else:
            assert f"it is {before['state']}" in message, message  # why: the state it is in
        assert (await running.route(name))["state"] == before["state"]
        assert running.saved(name) == saved_before
        assert await running.events() == events_before
        return
    assert status == 200, document
    assert document.keys() >= ROUTE_KEYS, document  # the ROUTE document
    assert (document["name"], document["state"], document["weight"]) == (name, *expected)
    assert document == await running.route(name) | {"window": document["window"]}
    # on disk the moment the response is in
    saved = running.saved(name)
    assert (saved["state"], saved["weight_bp"]) == (expected[0], round(expected[1] * 100))
    assert saved["reason"] == document["reason"]
    # one audit event, by the admin, with a reason
    new = (await running.events())[len(events_before) :]
    assert [(e["route"], e["actor"], e["action"]) for e in new] == [
        (name, "admin", ACTIONS.get(verb, verb))
    ]
    assert (new[0]["before"], new[0]["after"]) == (before["state"], expected[0])
    assert new[0]["reason"] == document["reason"] != ""
    assert running.audit()[-1] == new[0]


# -- verb by verb ------------------------------------------------------------------------------


async def test_promote_goes_one_step_at_a_time_and_to_100_finishes(running: Running) -> None:
    start = await running.route("shop")
    assert (start["state"], start["weight"], start["step"]) == (
        "progressing",
        10,
        {"index": 0, "count": 3},
    )
    first = await running.ok("shop", "promote")
    assert (first["state"], first["weight"], first["step"]) == (
        "progressing",
        50,
        {"index": 1, "count": 3},
    )
    assert running.saved("shop")["weight_bp"] == 5000
    second = await running.ok("shop", "promote")
    assert (second["state"], second["weight"]) == ("promoted", 100)
    assert running.saved("shop")["state"] == "promoted"
    status, refused = await running.verb("shop", "promote")
    assert status == 409, refused

    plain = await running.ok("plain", "promote?to=100")
    assert (plain["state"], plain["weight"]) == ("promoted", 100)
    assert {await running.version(f"/plain/{n}") for n in range(20)} == {"canary"}
    status, bad = await running.verb("shop", "promote?to=50")
    assert status == 400, bad


async def test_abort_sends_everyone_to_stable_including_forced_and_sticky_users(
    running: Running, canary: FakeUpstream
) -> None:
    forced = {"X-Canary": "always"}
    assert await running.version("/", forced) == "canary"
    users = [{"X-User-ID": f"user-{n}"} for n in range(60)]
    assert "canary" in {await running.version("/", user) for user in users}  # 10 % of them

    aborted = await running.ok("shop", "abort", {"reason": "bad deploy"})
    assert (aborted["state"], aborted["weight"]) == ("aborted", 0)
    assert aborted["reason"] == "admin: bad deploy"
    saved = running.saved("shop")
    assert (saved["state"], saved["weight_bp"], saved["reason"]) == (
        "aborted",
        0,
        "admin: bad deploy",
    )
    received = len(canary.received)
    assert await running.version("/", forced) == "stable"
    assert {await running.version("/", user) for user in users} == {"stable"}
    assert {await running.version(f"/anyone/{n}") for n in range(50)} == {"stable"}
    assert len(canary.received) == received

    # without a reason: a default one; with no body at all, or an empty object
    await running.ok("shop", "retry")
    assert await running.version("/", forced) == "canary"
    no_body = await running.ok("shop", "abort")
    assert no_body["state"] == "aborted"
    assert no_body["reason"].startswith("admin: "), no_body
    assert len(no_body["reason"]) > len("admin: ")
    await running.ok("shop", "retry")
    empty = await running.ok("shop", "abort", {})
    assert (empty["state"], empty["reason"]) == ("aborted", no_body["reason"])
    await running.ok("shop", "retry")
    for bad in ({"reason": 42}, {"reason": "x" * 501}, [1, 2]):
        status, refused = await running.verb("shop", "abort", bad)
        assert status == 400, (bad, refused)
    status, refused = await running.call(
        "POST",
        "/routes/shop/abort",
        data=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert status == 400, refused
    assert (await running.route("shop"))["state"] == "progressing"


class Clock:
    """The controller's wall clock, moved by hand (the rollout's dwell is wall-clock time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_pause_stops_the_ramp_and_resume_restarts_its_dwell(running: Running) -> None:
    controller = running.proxy.holder.controller
    clock = Clock()
    controller.wall = clock

    def tick() -> None:
        controller.tick(running.proxy.holder.canary_stats)

    forced = {"X-Canary": "always"}
    assert await running.version("/", forced) == "canary"  # the step saw canary traffic

    paused = await running.ok("shop", "pause")
    assert (paused["state"], paused["weight"]) == ("paused", 10)
    clock.now += 3 * 3600  # three full intervals later
    assert await running.version("/", forced) == "canary"
    tick()
    still = await running.route("shop")
    assert (still["state"], still["weight"]) == ("paused", 10), still
    assert running.saved("shop")["state"] == "paused"

    resumed = await running.ok("shop", "resume")
    assert (resumed["state"], resumed["weight"]) == ("progressing", 10)
    assert running.saved("shop")["step_started"] == clock.now  # the dwell restarts
    clock.now += 1800  # half an interval: not yet
    assert await running.version("/", forced) == "canary"
    tick()
    assert (await running.route("shop"))["weight"] == 10
    clock.now += 1801  # a full healthy interval with canary traffic: the next step
    tick()
    advanced = await running.route("shop")
    assert (advanced["state"], advanced["weight"]) == ("progressing", 50), advanced
    assert [e["action"] for e in (await running.events())[-3:]] == ["pause", "resume", "advance"]


async def test_the_ramp_really_advances_on_its_own_and_pause_really_stops_it(
    start: Start,
) -> None:
    """The same, on the real clock and the real tick task: a short dwell, then a pause."""
    running = await start(interval="0.3s")
    forced = {"X-Canary": "always"}
    async with asyncio.timeout(5):
        while (await running.route("shop"))["weight"] == 10:
            await running.version("/", forced)
            await asyncio.sleep(0.05)
    paused = await running.ok("shop", "pause")
    assert (paused["state"], paused["weight"]) == ("paused", 50)
    deadline = time.monotonic() + 1.0  # over three intervals, four ticks
    while time.monotonic() < deadline:
        await running.version("/", forced)
        await asyncio.sleep(0.05)
    still = await running.route("shop")
    assert (still["state"], still["weight"]) == ("paused", 50), still


async def test_retry_only_from_aborted(running: Running, canary: FakeUpstream) -> None:
    for state in ("progressing", "paused"):
        if state == "paused":
            await running.ok("shop", "pause")
        status, refused = await running.verb("shop", "retry")
        assert status == 409, refused
        assert refused["error"] == f"cannot retry route shop: it is {state}"
    await running.ok("shop", "abort", {"reason": "bad"})
    retried = await running.ok("shop", "retry")
    assert (retried["state"], retried["weight"], retried["step"]) == (
        "progressing",
        10,
        {"index": 0, "count": 3},
    )
    assert retried["reason"].startswith("retry: "), retried
    assert running.saved("shop")["state"] == "progressing"
    assert await running.version("/", {"X-Canary": "always"}) == "canary"


async def test_put_weight(running: Running) -> None:
    document = await running.ok("shop", "weight", {"weight": 12.5})
    assert (document["state"], document["weight"]) == ("paused", 12.5)  # the ramp pauses
    assert "paused" in document["reason"], document
    saved = running.saved("shop")
    assert (saved["state"], saved["weight_bp"]) == ("paused", 1250)
    assert (await running.route("shop"))["weight"] == 12.5

    plain = await running.ok("plain", "weight", {"weight": 0.01})
    assert (plain["state"], plain["weight"]) == ("steady", 0.01)
    assert running.saved("plain")["weight_bp"] == 1
    plain = await running.ok("plain", "weight", {"weight": 100})
    assert (plain["state"], plain["weight"]) == ("steady", 100)
    assert {await running.version(f"/plain/{n}") for n in range(10)} == {"canary"}

    events_before = await running.events()
    bad_bodies: list[object] = [
        {"weight": 101},
        {"weight": -1},
        {"weight": 12.345},
        {"weight": "x"},
        {"weight": "12.5"},
        {"weight": True},
        {"weight": None},
        {},
        [12.5],
    ]
    for body in bad_bodies:
        status, refused = await running.verb("shop", "weight", body)
        assert status == 400, (body, refused)
        assert refused["error"], refused
    status, refused = await running.call("PUT", "/routes/shop/weight")  # no body at all
    assert status == 400, refused
    status, refused = await running.call(
        "PUT", "/routes/shop/weight", data=b"12.5", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert status == 400, refused
    assert (await running.route("shop"))["weight"] == 12.5
    assert running.saved("shop")["weight_bp"] == 1250
    assert await running.events() == events_before

    await running.ok("shop", "abort")
    status, refused = await running.verb("shop", "weight", {"weight": 20})
    assert status == 409, refused
    assert "aborted" in refused["error"], refused
    assert running.saved("shop")["weight_bp"] == 0


VERB_CALLS: Final = (
    ("POST", "promote"),
    ("POST", "promote?to=100"),
    ("POST", "abort"),
    ("POST", "pause"),
    ("POST", "resume"),
    ("POST", "retry"),
    ("PUT", "weight"),
)


async def test_an_unknown_route_is_404_for_every_verb(running: Running) -> None:
    for method, verb in VERB_CALLS:
        body = {"weight": 10} if verb == "weight" else None
        status, refused = await running.call(method, f"/routes/nope/{verb}", json_body=body)
        assert status == 404, (verb, refused)
        assert "nope" in refused["error"], refused
    async with running.session.get(f"{running.admin}/routes/nope") as response:
        assert response.status == 404


async def test_every_verb_needs_the_token(running: Running) -> None:
    saved = running.saved("shop")
    events_before = await running.events()
    for method, verb in VERB_CALLS:
        body = {"weight": 10} if verb == "weight" else None
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for route in ("shop", "nope"):
                status, refused = await running.call(
                    method, f"/routes/{route}/{verb}", json_body=body, headers=headers
                )
                assert status == 401, (verb, headers, refused)
                assert TOKEN not in json.dumps(refused)
    assert running.saved("shop") == saved
    assert await running.events() == events_before


async def test_events_list_the_transitions_in_order_with_actor_and_reason(
    running: Running,
) -> None:
    await running.ok("shop", "pause")
    await running.ok("shop", "resume")
    await running.ok("shop", "promote")
    await running.ok("shop", "weight", {"weight": 12.5})
    await running.ok("shop", "abort", {"reason": "bad deploy"})
    await running.ok("shop", "retry")
    await running.ok("shop", "promote?to=100")

    listed = [e for e in await running.events() if e["route"] == "shop"]
    summary = [
        (e["actor"], e["action"], e["before"], e["after"], e["weight_after_bp"]) for e in listed
    ]
    assert summary == [
        ("config", "start", "steady", "progressing", 1000),
        ("admin", "pause", "progressing", "paused", 1000),
        ("admin", "resume", "paused", "progressing", 1000),
        ("admin", "promote", "progressing", "progressing", 5000),
        ("admin", "set_weight", "progressing", "paused", 1250),
        ("admin", "abort", "paused", "aborted", 0),
        ("admin", "retry", "aborted", "progressing", 1000),
        ("admin", "promote", "progressing", "promoted", 10000),
    ]
    assert listed[5]["reason"] == "admin: bad deploy"
    assert all(e["reason"] for e in listed)
    times = [e["at"] for e in listed]
    assert times == sorted(times)
    assert [e for e in running.audit() if e["route"] == "shop"] == listed
    async with running.session.get(f"{running.admin}/events?limit=2") as response:
        assert (await response.json())["events"] == (await running.events())[-2:]


# -- the CLI admin client ----------------------------------------------------------------------


async def cli(*args: str) -> tuple[int, str, str]:
    """`canary-proxy ARGS`, with no admin token from the environment: only `--token` counts."""
    env = {k: v for k, v in os.environ.items() if k != "CANARY_PROXY_ADMIN_TOKEN"}
    return await run_cli(*args, env=env)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


async def test_cli_status_prints_a_table(running: Running) -> None:
    code, out, err = await cli("status", "--admin", running.admin)
    assert code == 0, err
    rows = [line.split() for line in out.strip().splitlines()]
    assert rows[0][:3] == ["ROUTE", "STATE", "WEIGHT"], out
    table = {row[0]: row[1:3] for row in rows[1:]}
    assert table == {"plain": ["steady", "5%"], "shop": ["progressing", "10%"]}, out

    code, out, err = await cli("status", "shop", "--admin", running.admin)
    assert code == 0, err
    rows = [line.split() for line in out.strip().splitlines()]
    assert [row[:3] for row in rows] == [
        ["ROUTE", "STATE", "WEIGHT"],
        ["shop", "progressing", "10%"],
    ]


async def test_cli_verbs(running: Running) -> None:
    admin = ("--admin", running.admin, "--token", TOKEN)

    code, out, err = await cli("abort", "shop", "--reason", "bad deploy", *admin)
    assert code == 0, err
    assert out.strip().startswith("shop: aborted"), out
    assert "weight 0" in out, out
    saved = running.saved("shop")
    assert (saved["state"], saved["reason"]) == ("aborted", "admin: bad deploy")

    code, out, err = await cli("retry", "shop", *admin)
    assert code == 0, err
    assert out.strip().startswith("shop: progressing"), out

    code, out, err = await cli("retry", "shop", *admin)  # not aborted any more
    assert code == 1
    assert out == ""
    line = one_error_line(err)
    assert "409" in line, line
    assert "cannot retry route shop: it is progressing" in line, line

    code, out, err = await cli("pause", "shop", *admin)
    assert (code, out.strip()) == (0, "shop: paused, weight 10%"), err
    code, out, err = await cli("resume", "shop", *admin)
    assert code == 0, err
    assert out.startswith("shop: progressing"), out
    code, out, err = await cli("set-weight", "shop", "12.5", *admin)
    assert code == 0, err
    assert out.strip() == "shop: paused, weight 12.5%", out
    assert running.saved("shop")["weight_bp"] == 1250
    code, out, err = await cli("promote", "shop", "--to", "100", *admin)
    assert code == 0, err
    assert out.strip() == "shop: promoted, weight 100%", out

    code, out, err = await cli("promote", "nope", *admin)
    assert code == 1
    line = one_error_line(err)
    assert "404" in line, line
    assert "nope" in line, line

    saved = running.saved("shop")
    code, out, err = await cli("abort", "shop", "--admin", running.admin, "--token", "wrong")
    assert code == 1
    assert "401" in one_error_line(err), err
    code, out, err = await cli("abort", "shop", "--admin", running.admin)  # no token at all
    assert code == 1
    assert "401" in one_error_line(err), err
    assert running.saved("shop") == saved

    unreachable = f"http://127.0.0.1:{unused_port()}"
    for args in (("status",), ("abort", "shop", "--token", TOKEN)):
        code, out, err = await cli(*args, "--admin", unreachable)
        assert code == 1, (args, out, err)
        line = one_error_line(err)
        assert "cannot reach the admin API" in line, line
