"""The admin API (docs/admin-api.md) on a running proxy: reads, reloads (POST /reload, PUT
/config, SIGHUP), reload accounting, and control-plane security: bearer token on every
mutation, GETs that never mutate, no unauthenticated listener off loopback, no token leaks."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import pytest
import yaml
from fakes import TEST_TIMEOUTS, FakeUpstream, eventually, stall
from proxy_process import CANARY_PROXY, TOKEN_ENV, running_proxy, scrape

from proxy.app import Proxy
from proxy.control.loader import load_config_file

ROOT: Final = Path(__file__).resolve().parents[2]
TOKEN: Final = "tok-7f3a9c51e2d84b06-secret"
TIMEOUTS: Final = {**TEST_TIMEOUTS, "shutdown": "2s"}
YAML: Final = "application/yaml"
JSON: Final = "application/json"

Document = dict[str, Any]


# -- a proxy with its admin API, in-process ----------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Setup:
    """Where a proxy's config file lives and what its configs point at."""

    path: Path  # the config file the proxy starts from and reloads
    stable_url: str
    canary_url: str
    admin_listen: str = "127.0.0.1:0"
    token_source: dict[str, str] = field(default_factory=lambda: {"token_env": TOKEN_ENV})

    def document(self, weight: float = 0, **changes: object) -> Document:
        """A complete config for this proxy: route `shop` at `weight`, top-level `changes`."""
        return {
            "listen": "127.0.0.1:0",
            "admin": {"listen": self.admin_listen, **self.token_source},
            "state_dir": str(self.path.parent / "state"),
            "timeouts": TIMEOUTS,
            "routes": [
                {
                    "name": "shop",
                    "stable": {"upstreams": [self.stable_url], "revision": "v1"},
                    "canary": {"upstreams": [self.canary_url], "revision": "v2"},
                    "split": {"weight": weight},
                }
            ],
            **changes,
        }

    def write(self, document: Document) -> None:
        self.path.write_text(yaml.safe_dump(document, sort_keys=False))


@dataclass(slots=True, kw_only=True)
class Running(Setup):
    """A started `Proxy` (data plane and admin listener, ports from the OS)."""

    proxy: Proxy
    admin: str  # admin base URL
    data: str  # data plane base URL
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.proxy.stop()


class Start(Protocol):
    async def __call__(
        self,
        *,
        weight: float = 0,
        token: str | None = None,
        admin_listen: str = "127.0.0.1:0",
        token_file: str | None = None,
    ) -> Running: ...


@pytest.fixture
async def start(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Start]:
    started: list[Running] = []

    async def make(
        *,
        weight: float = 0,
        token: str | None = None,
        admin_listen: str = "127.0.0.1:0",
        token_file: str | None = None,
    ) -> Running:
        if token is None:
            monkeypatch.delenv(TOKEN_ENV, raising=False)
        else:
            monkeypatch.setenv(TOKEN_ENV, token)
        setup = Setup(
            path=tmp_path / "proxy.yaml",
            stable_url=stable.url,
            canary_url=canary.url,
            admin_listen=admin_listen,
            token_source={"token_file": token_file} if token_file else {"token_env": TOKEN_ENV},
        )
        setup.write(setup.document(weight))
        proxy = Proxy(load_config_file(str(setup.path)), config_path=str(setup.path))
        try:
            await proxy.start()
        except BaseException:
            await proxy.stop()  # whatever did start (the data plane) must not leak
            raise
        running = Running(
            path=setup.path,
            stable_url=setup.stable_url,
            canary_url=setup.canary_url,
            admin_listen=setup.admin_listen,
            token_source=setup.token_source,
            proxy=proxy,
            admin=f"http://127.0.0.1:{admin_port(proxy)}",
            data=f"http://127.0.0.1:{data_port(proxy)}",
        )
        started.append(running)
        return running

    yield make
    for running in started:
        await running.stop()


@pytest.fixture
async def running(start: Start) -> Running:
    return await start()


@pytest.fixture
async def guarded(start: Start) -> Running:
    """A proxy whose admin API has a token configured (from the environment)."""
    return await start(token=TOKEN)


def admin_port(proxy: Proxy) -> int:
    assert proxy._admin_runner is not None
    return int(proxy._admin_runner.addresses[0][1])


def data_port(proxy: Proxy) -> int:
    # Proxy has no public accessor for the bound data-plane port (reported to the lead).
    assert proxy.server is not None
    assert proxy.server._server is not None
    return int(proxy.server._server.sockets[0].getsockname()[1])


# -- small clients -----------------------------------------------------------------------------


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def weight(session: aiohttp.ClientSession, running: Running) -> float:
    status, body = await get_json(session, f"{running.admin}/routes/shop")
    assert status == 200, body
    return float(body["weight"])


async def served_by(session: aiohttp.ClientSession, running: Running) -> str:
    """Which version answers a request through the data plane (weights here are 0 or 100)."""
    async with session.get(f"{running.data}/anything") as response:
        assert response.status == 200
        return response.headers["X-Version"]


async def metrics(session: aiohttp.ClientSession, admin: str) -> dict[tuple[str, str], float]:
    """`{(sample name, sorted labels as k=v,...): value}` from GET /metrics."""
    return {
        (name, ",".join(f"{k}={v}" for k, v in sorted(labels.items()))): value
        for name, samples in (await scrape(session, admin)).items()
        for labels, value in samples
    }


async def reload_counts(session: aiohttp.ClientSession, admin: str) -> tuple[float, float, float]:
    """(successes, failures, last reload successful) as the metrics expose them."""
    values = await metrics(session, admin)
    return (
        values[("canary_proxy_config_reloads_total", "result=success")],
        values[("canary_proxy_config_reloads_total", "result=failure")],
        values[("canary_proxy_config_last_reload_successful", "")],
    )


async def post_reload(
    session: aiohttp.ClientSession, running: Running, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with session.post(f"{running.admin}/reload", headers=headers) as response:
        return response.status, await response.json()


async def put_config(
    session: aiohttp.ClientSession,
    running: Running,
    body: str,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with session.put(
        f"{running.admin}/config",
        data=body.encode(),
        headers={"Content-Type": content_type, **(headers or {})},
    ) as response:
        return response.status, await response.json()


def error_paths(body: Any) -> set[str]:
    errors = body["errors"]
    assert errors, body
    for error in errors:
        assert set(error) == {"path", "message"}, error
        assert error["message"], error
    return {error["path"] for error in errors}


def invalid(setup: Setup) -> Document:
    """A config that would move the weight to 100 if any part of it were applied."""
    document = setup.document(100, timeouts={**TIMEOUTS, "connect": "fast"})
    document["routes"][0]["stable"]["upstreams"] = ["ftp://127.0.0.1:21"]
    return document


def snapshot(path: Path) -> tuple[bytes, int, int]:
    info = path.stat()
    return path.read_bytes(), info.st_ino, info.st_mtime_ns


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# -- reads -------------------------------------------------------------------------------------


async def test_status_lists_every_route_with_the_fields_of_the_contract(
    start: Start, session: aiohttp.ClientSession
) -> None:
    running = await start(weight=12.5)
    status, body = await get_json(session, f"{running.admin}/status")
    assert status == 200
    [route] = body["routes"]
    assert {"name", "weight", "state", "reason", "revision", "step", "window"} <= set(route)
    assert route["name"] == "shop"
    assert route["weight"] == 12.5
    assert route["state"] == "steady"
    assert route["revision"] == "v2"
    assert set(route["window"]) == {"stable", "canary"}


async def test_one_route_is_read_by_name(running: Running, session: aiohttp.ClientSession) -> None:
    status, body = await get_json(session, f"{running.admin}/routes/shop")
    assert status == 200
    assert body["name"] == "shop"
    _, all_routes = await get_json(session, f"{running.admin}/status")
    assert body == all_routes["routes"][0]


async def test_an_unknown_route_is_404_with_a_json_error(
    running: Running, session: aiohttp.ClientSession
) -> None:
    status, body = await get_json(session, f"{running.admin}/routes/nope")
    assert status == 404
    assert "nope" in body["error"]


async def test_metrics_are_prometheus_text_with_the_proxied_requests_counted(
    running: Running, session: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        assert await served_by(session, running) == "stable"
    async with session.get(f"{running.admin}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert "version=" in response.headers["Content-Type"]
    values = await metrics(session, running.admin)
    assert values[("canary_proxy_requests_total", "code=200,route=shop,version=stable")] == 3
    assert values[("canary_proxy_canary_weight_ratio", "route=shop")] == 0


async def test_healthz_and_readyz_answer_200_while_serving(
    running: Running, session: aiohttp.ClientSession
) -> None:
    assert (await get_json(session, f"{running.admin}/healthz"))[0] == 200
    assert (await get_json(session, f"{running.admin}/readyz"))[0] == 200


async def test_readyz_turns_503_while_draining_and_healthz_stays_200(
    running: Running, stable: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    stable.answer_with(stall(until=release))
    in_flight = asyncio.create_task(session.get(f"{running.data}/slow"))
    await stable.wait_until(lambda upstream: len(upstream.received) == 1)
    stopping = asyncio.create_task(running.stop())

    async def not_ready() -> bool:
        async with session.get(f"{running.admin}/readyz") as response:
            return response.status == 503

    try:
        await eventually(not_ready, within=10.0)
        assert (await get_json(session, f"{running.admin}/healthz"))[0] == 200
    finally:
        release.set()  # never leave the upstream handler stalled, whatever failed
    async with await in_flight as response:
        assert response.status == 200
    await stopping


# -- reloads -----------------------------------------------------------------------------------


async def test_post_reload_applies_the_file_and_answers_what_changed(
    running: Running, session: aiohttp.ClientSession
) -> None:
    document = running.document(100)
    document["routes"].append({**document["routes"][0], "name": "blog"})
    document["routes"][1]["match"] = {"path_prefix": "/blog"}
    running.write(document)

    status, body = await post_reload(session, running)

    assert status == 200, body
    assert body["routes"] == {"added": ["blog"], "removed": [], "changed": ["shop"]}
    assert await weight(session, running) == 100
    assert await served_by(session, running) == "canary"


async def test_a_bad_file_is_refused_with_every_problem_and_the_old_config_keeps_serving(
    running: Running, session: aiohttp.ClientSession
) -> None:
    running.write(invalid(running))

    status, body = await post_reload(session, running)

    assert status == 400
    assert error_paths(body) == {"timeouts.connect", "routes[0].stable.upstreams[0]"}
    assert await weight(session, running) == 0
    assert await served_by(session, running) == "stable"


async def test_a_file_that_is_not_yaml_is_refused_with_a_json_error_list(
    running: Running, session: aiohttp.ClientSession
) -> None:
    running.path.write_text("routes: [unclosed\n")
    status, body = await post_reload(session, running)
    assert status == 400
    assert error_paths(body)
    assert await served_by(session, running) == "stable"


async def test_put_config_with_yaml_applies_it_and_replaces_the_file_atomically(
    running: Running, session: aiohttp.ClientSession
) -> None:
    running.path.chmod(0o640)
    body = "# deployed by the pipeline\n" + yaml.safe_dump(running.document(100))

    status, answer = await put_config(session, running, body, YAML)

    assert status == 200, answer
    assert answer["routes"]["changed"] == ["shop"]
    assert running.path.read_text() == body
    assert stat.S_IMODE(running.path.stat().st_mode) == 0o640
    assert leftovers(running.path.parent) == []
    assert await weight(session, running) == 100
    assert await served_by(session, running) == "canary"


async def test_put_config_with_json_applies_it_and_the_file_stays_loadable(
    running: Running, session: aiohttp.ClientSession
) -> None:
    body = json.dumps(running.document(100), indent=2)

    status, answer = await put_config(session, running, body, f"{JSON}; charset=utf-8")

    assert status == 200, answer
    written = running.path.read_text()
    # What was sent, at most with a final newline added so it is a proper text file.
    assert written in (body, body + "\n")
    assert await weight(session, running) == 100
    assert await served_by(session, running) == "canary"
    # The JSON on disk is the config a later reload (or restart) reads.
    assert (await post_reload(session, running))[0] == 200
    assert await weight(session, running) == 100


@pytest.mark.parametrize(
    ("content_type", "render"),
    [
        (YAML, yaml.safe_dump),
        (JSON, json.dumps),
        (YAML, lambda document: "routes: [unclosed\n"),
        (JSON, lambda document: '{"routes": '),
    ],
    ids=["yaml-invalid-config", "json-invalid-config", "yaml-syntax", "json-syntax"],
)
async def test_a_bad_put_config_is_refused_and_leaves_the_file_and_the_config_untouched(
    running: Running,
    session: aiohttp.ClientSession,
    content_type: str,
    render: Callable[[Document], str],
) -> None:
    before = snapshot(running.path)

    status, body = await put_config(session, running, render(invalid(running)), content_type)

    assert status == 400
    assert error_paths(body)
    assert snapshot(running.path) == before
    assert leftovers(running.path.parent) == []
    assert await weight(session, running) == 0
    assert await served_by(session, running) == "stable"


async def test_yaml_tags_that_would_build_python_objects_are_refused(
    running: Running, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    body = f"!!python/object/apply:os.system ['touch {marker}']\n"
    before = snapshot(running.path)

    status, answer = await put_config(session, running, body, YAML)

    assert status == 400
    assert error_paths(answer)
    assert not marker.exists()
    assert snapshot(running.path) == before


async def test_a_config_body_over_the_admin_size_cap_is_413_and_changes_nothing(
    running: Running, session: aiohttp.ClientSession
) -> None:
    before = snapshot(running.path)
    padding = "#" + "x" * 1023 + "\n"
    body = yaml.safe_dump(running.document(100)) + padding * (5 * 1024)  # 5 MiB

    async with session.put(
        f"{running.admin}/config",
        data=io.BytesIO(body.encode()),
        headers={"Content-Type": YAML},
    ) as response:
        status, answer = response.status, await response.json()

    assert status == 413
    assert "error" in answer
    assert snapshot(running.path) == before
    assert await weight(session, running) == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_put_config_in_another_content_type_is_415_and_changes_nothing(
    running: Running, session: aiohttp.ClientSession, content_type: str
) -> None:
    before = snapshot(running.path)
    body = yaml.safe_dump(running.document(100))

    status, answer = await put_config(session, running, body, content_type)

    assert status == 415
    assert "error" in answer
    assert snapshot(running.path) == before
    assert await weight(session, running) == 0


async def test_a_reload_that_changes_listen_is_refused_naming_listen(
    running: Running, session: aiohttp.ClientSession
) -> None:
    moved = running.document(100, listen="127.0.0.1:1")
    before = snapshot(running.path)

    status, body = await put_config(session, running, yaml.safe_dump(moved), YAML)
    assert status == 400
    assert "listen" in error_paths(body)
    assert snapshot(running.path) == before

    running.write(moved)
    status, body = await post_reload(session, running)
    assert status == 400
    assert "listen" in error_paths(body)
    assert await weight(session, running) == 0


async def test_reload_outcomes_are_counted_and_the_last_one_is_exposed(
    running: Running, session: aiohttp.ClientSession
) -> None:
    assert await reload_counts(session, running.admin) == (0, 0, 1)
    good = yaml.safe_dump(running.document(50))
    bad = yaml.safe_dump(invalid(running))

    running.write(running.document(100))
    assert (await post_reload(session, running))[0] == 200
    assert (await put_config(session, running, bad, YAML))[0] == 400
    assert await reload_counts(session, running.admin) == (1, 1, 0)
    assert (await put_config(session, running, good, YAML))[0] == 200
    running.path.write_text(bad)
    assert (await post_reload(session, running))[0] == 400
    assert (await put_config(session, running, good, YAML))[0] == 200
    assert await reload_counts(session, running.admin) == (3, 2, 1)

    assert (await post_reload(session, running))[0] == 200  # the good PUT rewrote the file
    running.write(running.document(10, listen="127.0.0.1:1"))
    assert (await post_reload(session, running))[0] == 400
    assert await reload_counts(session, running.admin) == (4, 3, 0)


# -- security ----------------------------------------------------------------------------------

BAD_CREDENTIALS: Final = {
    "none": None,
    "wrong-token": "Bearer not-the-token",
    "token-with-suffix": f"Bearer {TOKEN}x",
    "token-prefix": f"Bearer {TOKEN[:-1]}",
    "empty-bearer": "Bearer ",
    "basic-scheme": f"Basic {base64.b64encode(f'admin:{TOKEN}'.encode()).decode()}",
    "token-scheme": f"Token {TOKEN}",
    "bare-token": TOKEN,
}


@dataclass(frozen=True, slots=True)
class Mutation:
    method: str
    path: str
    content_type: str | None

    def body(self, document: Document) -> bytes | None:
        if self.content_type == YAML:
            return yaml.safe_dump(document).encode()
        if self.content_type == JSON:
            return json.dumps(document).encode()
        return None


MUTATIONS: Final = [
    Mutation("POST", "/reload", None),
    Mutation("PUT", "/config", YAML),
    Mutation("PUT", "/config", JSON),
]


async def attempt(
    session: aiohttp.ClientSession,
    running: Running,
    mutation: Mutation,
    authorization: str | None,
) -> tuple[int, str, bytes]:
    """Try `mutation` with a config that would move the weight to 100."""
    document = running.document(100)
    running.write(document)  # what POST /reload would pick up
    headers = {} if authorization is None else {"Authorization": authorization}
    if mutation.content_type is not None:
        headers["Content-Type"] = mutation.content_type
    async with session.request(
        mutation.method,
        f"{running.admin}{mutation.path}",
        data=mutation.body(document),
        headers=headers,
    ) as response:
        challenge = response.headers.get("WWW-Authenticate", "")
        return response.status, challenge, await response.read()


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
@pytest.mark.parametrize(
    "mutation", MUTATIONS, ids=[f"{m.method} {m.path} {m.content_type}" for m in MUTATIONS]
)
async def test_every_mutating_endpoint_refuses_a_missing_or_wrong_token_and_changes_nothing(
    guarded: Running,
    session: aiohttp.ClientSession,
    mutation: Mutation,
    credentials: str | None,
) -> None:
    status, challenge, body = await attempt(session, guarded, mutation, credentials)

    assert status == 401
    assert challenge.startswith("Bearer")
    assert "error" in json.loads(body)
    assert await weight(session, guarded) == 0
    assert await reload_counts(session, guarded.admin) == (0, 0, 1)


@pytest.mark.parametrize(
    "scheme", ["Bearer", "bearer"], ids=["Bearer", "scheme-is-case-insensitive"]
)
@pytest.mark.parametrize(
    "mutation", MUTATIONS, ids=[f"{m.method} {m.path} {m.content_type}" for m in MUTATIONS]
)
async def test_every_mutating_endpoint_works_with_the_bearer_token(
    guarded: Running, session: aiohttp.ClientSession, mutation: Mutation, scheme: str
) -> None:
    status, _, body = await attempt(session, guarded, mutation, f"{scheme} {TOKEN}")
    assert status == 200, body
    assert await weight(session, guarded) == 100


async def test_every_post_or_put_route_of_the_admin_app_needs_the_token(
    guarded: Running, session: aiohttp.ClientSession
) -> None:
    # Walks the app's own routing table, so endpoints added later are covered too.
    assert guarded.proxy._admin_runner is not None
    app = guarded.proxy._admin_runner.app
    mutating = {
        (route.method, route.resource.canonical.replace("{name}", "shop"))
        for route in app.router.routes()
        if route.method in {"POST", "PUT", "PATCH", "DELETE"} and route.resource is not None
    }
    assert {("POST", "/reload"), ("PUT", "/config")} <= mutating
    for method, path in sorted(mutating):
        async with session.request(method, f"{guarded.admin}{path}") as response:
            assert response.status == 401, (method, path)
    assert await reload_counts(session, guarded.admin) == (0, 0, 1)


@pytest.mark.parametrize("path", ["/status", "/routes/shop", "/metrics", "/healthz", "/readyz"])
async def test_reads_need_no_token(
    guarded: Running, session: aiohttp.ClientSession, path: str
) -> None:
    async with session.get(f"{guarded.admin}{path}") as response:
        assert response.status == 200


@pytest.mark.parametrize(("path", "allowed"), [("/reload", "POST"), ("/config", "PUT")])
async def test_a_get_on_a_mutating_path_is_405_and_changes_nothing(
    guarded: Running, session: aiohttp.ClientSession, path: str, allowed: str
) -> None:
    guarded.write(guarded.document(100))  # a reload would pick this up
    before = snapshot(guarded.path)

    for headers in ({}, bearer()):
        async with session.get(f"{guarded.admin}{path}", headers=headers) as response:
            assert response.status == 405
            assert allowed in response.headers["Allow"]
            assert "error" in await response.json()

    assert await weight(session, guarded) == 0
    assert snapshot(guarded.path) == before
    assert await reload_counts(session, guarded.admin) == (0, 0, 1)


async def test_the_token_never_appears_in_a_response_or_the_log(
    guarded: Running, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    async def call(method: str, path: str, **kwargs: Any) -> None:
        async with session.request(method, f"{guarded.admin}{path}", **kwargs) as response:
            seen.append(str(response.status))
            seen.extend(f"{k}: {v}" for k, v in response.headers.items())
            seen.append(await response.text())

    yaml_body = {"data": yaml.safe_dump(guarded.document(20))}
    bad_body = {"data": yaml.safe_dump(invalid(guarded))}
    for credentials in BAD_CREDENTIALS.values():
        auth = {} if credentials is None else {"Authorization": credentials}
        await call("POST", "/reload", headers=auth)
        await call("PUT", "/config", headers={**auth, "Content-Type": YAML}, **yaml_body)
    await call("PUT", "/config", headers={**bearer(), "Content-Type": YAML}, **bad_body)
    await call("PUT", "/config", headers={**bearer(), "Content-Type": "text/plain"}, **yaml_body)
    await call("PUT", "/config", headers={**bearer(), "Content-Type": YAML}, **yaml_body)
    await call("POST", "/reload", headers=bearer())
    for path in ("/status", "/routes/shop", "/routes/nope", "/metrics", "/healthz", "/readyz"):
        await call("GET", path, headers=bearer())
    await call("GET", "/reload", headers=bearer())

    assert {"200", "400", "401", "404", "405", "415"} <= set(seen)  # the calls did their thing
    assert not [text for text in seen if TOKEN in text]
    assert TOKEN not in caplog.text
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]


async def test_a_token_from_admin_token_file_guards_the_mutations(
    start: Start, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (tmp_path / "admin-token").write_text(f"{TOKEN}\n")
    running = await start(token_file="admin-token")  # relative: next to the config file
    assert (await post_reload(session, running))[0] == 401
    assert (await post_reload(session, running, bearer("wrong")))[0] == 401
    running.write(running.document(100))
    assert (await post_reload(session, running, bearer()))[0] == 200
    assert await weight(session, running) == 100


async def test_a_reload_that_changes_the_token_file_is_not_silently_ignored(
    start: Start, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (tmp_path / "old-token").write_text(f"{TOKEN}\n")
    (tmp_path / "new-token").write_text("rotated-token-5d1c\n")
    running = await start(token_file="old-token")
    document = running.document(0)
    document["admin"] = {"listen": running.admin_listen, "token_file": "new-token"}
    running.write(document)

    status, body = await post_reload(session, running, bearer())

    if status == 400:  # refused as restart-only: fine, if it says where
        assert any(path.startswith("admin") for path in error_paths(body)), body
        assert (await post_reload(session, running, bearer()))[0] == 400
    else:  # applied: then the rotated token is the one that works
        assert status == 200, body
        assert (await post_reload(session, running, bearer("rotated-token-5d1c")))[0] == 200
        assert (await post_reload(session, running, bearer()))[0] == 401


async def test_a_non_loopback_admin_listener_starts_when_a_token_is_set(
    start: Start, session: aiohttp.ClientSession
) -> None:
    running = await start(token=TOKEN, admin_listen="0.0.0.0:0")
    assert (await get_json(session, f"{running.admin}/healthz"))[0] == 200
    assert (await post_reload(session, running))[0] == 401
    assert (await post_reload(session, running, bearer()))[0] == 200


# -- the real process --------------------------------------------------------------------------


def process_env() -> dict[str, str]:
    """The test's environment without any admin token or default config path."""
    unset = {TOKEN_ENV, "CANARY_PROXY_ADMIN_TOKEN", "CANARY_PROXY_CONFIG"}
    return {k: v for k, v in os.environ.items() if k not in unset}


def write_config(path: Path, *, weight: float = 0, admin: dict[str, str] | None = None) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "admin": admin or {"listen": "127.0.0.1:0", "token_env": TOKEN_ENV},
                "timeouts": TIMEOUTS,
                "routes": [
                    {
                        "name": "shop",
                        "stable": {"upstreams": ["http://127.0.0.1:8001"]},
                        "canary": {"upstreams": ["http://127.0.0.1:8002"]},
                        "split": {"weight": weight},
                    }
                ],
            }
        )
    )


def run_briefly(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`canary-proxy run` expected to exit on its own (a refusal), within a bounded time."""
    return subprocess.run(
        [*CANARY_PROXY, "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        cwd=ROOT,
        env=env,
    )


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
@pytest.mark.parametrize("token", [None, ""], ids=["unset", "empty"])
def test_run_refuses_a_non_loopback_admin_listener_without_a_token(
    tmp_path: Path, listen: str, token: str | None
) -> None:
    path = tmp_path / "proxy.yaml"
    write_config(path, admin={"listen": listen, "token_env": TOKEN_ENV})
    env = process_env()
    if token is not None:
        env[TOKEN_ENV] = token
    assert_one_line_refusal(run_briefly(path, env), "admin.listen", "token")


@pytest.mark.parametrize("problem", ["missing", "directory", "empty"])
def test_run_refuses_an_unreadable_or_empty_token_file(tmp_path: Path, problem: str) -> None:
    token_file = tmp_path / "admin-token"
    if problem == "directory":
        token_file.mkdir()
    elif problem == "empty":
        token_file.write_text("\n")
    path = tmp_path / "proxy.yaml"
    write_config(path, admin={"listen": "127.0.0.1:0", "token_file": str(token_file)})
    assert_one_line_refusal(run_briefly(path, process_env()), "admin.token_file", str(token_file))


async def test_sighup_makes_a_running_process_reload_its_config_file(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    path = tmp_path / "proxy.yaml"
    write_config(path, weight=0)
    async with running_proxy(path, env=process_env(), within=20) as running:

        async def current_weight() -> float:
            _, body = await get_json(session, f"{running.admin_url}/routes/shop")
            return float(body["weight"])

        # Answering proves serve() is past installing its signal handlers.
        assert await current_weight() == 0
        write_config(path, weight=100)
        running.process.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return await current_weight() == 100

        await eventually(reloaded, within=10.0)
        assert await reload_counts(session, running.admin_url) == (1, 0, 1)

        path.write_text("routes: [unclosed\n")
        running.process.send_signal(signal.SIGHUP)

        async def refused() -> bool:
            return (await reload_counts(session, running.admin_url))[1] == 1

        await eventually(refused, within=10.0)
        assert await current_weight() == 100  # the bad file changed nothing
        assert await running.shut_down(within=15) == 0


async def test_a_running_process_never_logs_the_token(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    path = tmp_path / "proxy.yaml"
    write_config(path)
    async with running_proxy(path, env=process_env(), token=TOKEN, within=20) as running:
        for headers in ({"Authorization": f"Token {TOKEN}"}, bearer("wrong"), bearer()):
            async with session.post(f"{running.admin_url}/reload", headers=headers) as response:
                await response.read()
        path.write_text("routes: [unclosed\n")
        async with session.post(f"{running.admin_url}/reload", headers=bearer()) as response:
            assert response.status == 400
        assert await running.shut_down(within=15) == 0
    log = running.logged()
    assert "config reloaded" in log  # the log did record the calls
    assert TOKEN not in log
