"""Hot reload and graceful shutdown against a real `canary-proxy run` process: zero dropped
requests during reloads, in-flight requests finish on the config they started on, and SIGTERM
drains (docs/operations.md, Reloads and Shutdown; docs/admin-api.md)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from fakes import (
    CHUNK,
    HOST,
    FakeUpstream,
    RawResponse,
    RawUpstream,
    Script,
    eventually,
    raw_connection,
    read_response,
    stall,
)
from proxy_process import (
    TOKEN_ENV,
    ProxyProcess,
    open_session,
    running_proxy,
    scrape,
    value_of,
    write_config,
)

TOKEN: Final = "reload-test-token"
AUTH: Final = {"Authorization": f"Bearer {TOKEN}"}
SHUTDOWN_SECONDS: Final = 5.0


# -- a real proxy process and its admin API ----------------------------------------------------


def proxy_config(
    tmp_path: Path, stable: str, canary: str | None = None, weight: float = 0
) -> dict[str, object]:
    """One route `shop`; listeners on port 0 (a reload keeps them: they compare equal)."""
    route: dict[str, object] = {"name": "shop", "stable": {"upstreams": [stable]}}
    if canary is not None:
        route["canary"] = {"upstreams": [canary], "revision": "v2"}
        route["split"] = {"weight": weight}
    return {
        "listen": f"{HOST}:0",
        "admin": {"listen": f"{HOST}:0", "token_env": TOKEN_ENV},
        "state_dir": str(tmp_path / "state"),
        "timeouts": {
            "connect": "1s",
            "response_header": "10s",
            "idle": "10s",
            "client_header": "5s",
            "shutdown": f"{SHUTDOWN_SECONDS}s",
        },
        "routes": [route],
    }


def config_file(tmp_path: Path, stable: str) -> Path:
    """`proxy_config` with `stable` alone, written for `running_proxy`."""
    return write_config(tmp_path, proxy_config(tmp_path, stable))


async def put_config(
    session: aiohttp.ClientSession,
    proxy: ProxyProcess,
    text: str,
    content_type: str = "application/json",
) -> tuple[int, dict[str, object]]:
    headers = {**AUTH, "Content-Type": content_type}
    async with session.put(proxy.admin_url + "/config", data=text, headers=headers) as response:
        return response.status, await response.json()


async def post_reload(
    session: aiohttp.ClientSession, proxy: ProxyProcess
) -> tuple[int, dict[str, object]]:
    async with session.post(proxy.admin_url + "/reload", headers=AUTH) as response:
        return response.status, await response.json()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with session.get(url) as response:
        return response.status, response.headers.get("X-Version", ""), await response.read()


# -- T-reload-load -----------------------------------------------------------------------------

CLIENTS: Final = 32
VALID_RELOADS: Final = 150
WEIGHT_CYCLE: Final = (0, 100, 50)  # reload number n sets WEIGHT_CYCLE[n % 3]
PROBES: Final = 8  # requests sent right after a reload to 0 or 100: all on one version
RELOAD_BUDGET: Final = 45.0  # seconds for the whole reload loop (about 8 s here)
# Invalid configs, each right after a reload to weight 100 (n % 3 == 1), so the probe after
# it shows that the old config still serves; through PUT /config or a rewritten file + POST.
INVALID_AFTER: Final = {
    13: ("bad-yaml", "put"),
    40: ("weight-150", "put"),
    64: ("unknown-field", "put"),
    88: ("bad-yaml", "file"),
    112: ("weight-150", "file"),
    139: ("unknown-field", "file"),
}
INVALID_PATHS: Final = {
    "bad-yaml": "",
    "weight-150": "routes[0].split.weight",
    "unknown-field": "routes[0].bogus",
}


@dataclass(slots=True)
class Load:
    """What the background clients did, and a way to wait until they made progress."""

    answered: int = 0
    failures: list[str] = field(default_factory=list)
    connections_opened: list[int] = field(default_factory=lambda: [0] * CLIENTS)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def count(self) -> None:
        self.answered += 1
        await self.notify()

    async def fail(self, failure: str) -> None:
        self.failures.append(failure)
        await self.notify()

    async def notify(self) -> None:
        async with self.progress:
            self.progress.notify_all()

    async def until_answered(self, target: int) -> None:
        """Wait (at most 5 s) until the clients have `target` answers in all; fail at once if
        a client failed (a failing client stops)."""
        async with asyncio.timeout(5), self.progress:
            await self.progress.wait_for(lambda: self.answered >= target or bool(self.failures))
        assert self.failures == [], self.failures


async def keep_sending(index: int, proxy: ProxyProcess, load: Load, stop: asyncio.Event) -> None:
    """One keep-alive client (one connection) sending GETs back to back until `stop`."""
    trace = aiohttp.TraceConfig()

    async def opened(*_: object) -> None:
        load.connections_opened[index] += 1

    trace.on_connection_create_end.append(opened)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1),
        cookie_jar=aiohttp.DummyCookieJar(),
        trace_configs=[trace],
    ) as session:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                status, version, body = await get(session, f"{proxy.url}/load/{index}/{n}")
            except (aiohttp.ClientError, TimeoutError) as error:
                await load.fail(f"client {index} request {n}: {error!r}")
                return
            if status != 200 or body != f"{version} /load/{index}/{n}".encode():
                await load.fail(f"client {index} request {n}: {status} {body[:80]!r}")
                return
            await load.count()


def invalid_config(kind: str, valid: dict[str, object]) -> tuple[str, str]:
    """(text, content type) of a broken config of `kind`."""
    if kind == "bad-yaml":
        return "routes: [\n  - name: shop\n", "application/yaml"
    broken = json.loads(json.dumps(valid))
    route = broken["routes"][0]
    if kind == "weight-150":
        route["split"]["weight"] = 150
    else:
        route["bogus"] = True
    return json.dumps(broken), "application/json"


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
async def test_a_hundred_reloads_under_load_drop_no_request_and_count_every_one_exactly_once(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path, workers: int
) -> None:
    """With worker processes too: each reload reaches every worker before the admin API
    answers (the probes right after one see it), and no worker restarts for it."""
    load = Load()
    stop = asyncio.Event()
    probes = 0  # sent by `probe`; the clients' count is in `load`
    outcomes: dict[str, int] = {"success": 0, "failure": 0}

    def config(weight: float) -> dict[str, object]:
        return {**proxy_config(tmp_path, stable.url, canary.url, weight), "workers": workers}

    async def reload(text: str, content_type: str, via: str) -> tuple[int, dict[str, object]]:
        if via == "put":
            return await put_config(admin, proxy, text, content_type)
        assert via == "file"
        proxy.config_path.write_text(text)
        return await post_reload(admin, proxy)

    async def probe(expected: str, after: str) -> None:
        """A batch whose heads are all parsed after the swap: all on one version."""
        nonlocal probes
        probes += PROBES
        answers = await asyncio.gather(
            *(get(prober, f"{proxy.url}/probe/{n}") for n in range(PROBES))
        )
        assert {(status, version) for status, version, _ in answers} == {(200, expected)}, (
            f"after {after}"
        )

    async with (
        running_proxy(write_config(tmp_path, config(50)), token=TOKEN) as proxy,
        open_session(limit=1) as admin,
        open_session(limit=PROBES) as prober,
    ):
        clients = [asyncio.create_task(keep_sending(i, proxy, load, stop)) for i in range(CLIENTS)]
        try:
            async with asyncio.timeout(RELOAD_BUDGET):
                for number in range(VALID_RELOADS):
                    # Never two reloads without traffic between them.
                    await load.until_answered(load.answered + 2 * CLIENTS)
                    weight = WEIGHT_CYCLE[number % len(WEIGHT_CYCLE)]
                    via = "file" if number % 4 == 3 else "put"
                    text = json.dumps(config(weight))
                    status, answer = await reload(text, "application/json", via)
                    assert (status, answer.get("reloaded")) == (200, True), answer
                    outcomes["success"] += 1
                    if weight in (0, 100):
                        await probe("canary" if weight == 100 else "stable", f"weight {weight}")

                    if number not in INVALID_AFTER:
                        continue
                    kind, via = INVALID_AFTER[number]
                    await load.until_answered(load.answered + 2 * CLIENTS)
                    status, answer = await reload(*invalid_config(kind, config(0)), via)
                    outcomes["failure"] += 1
                    assert status == 400, answer
                    errors = answer["errors"]
                    assert isinstance(errors, list)
                    assert errors, answer
                    assert all(e["message"] for e in errors), errors
                    assert INVALID_PATHS[kind] in [e["path"] for e in errors], errors
                    metrics = await scrape(admin, proxy.admin_url)
                    assert value_of(metrics, "canary_proxy_config_last_reload_successful") == 0
                    await probe("canary", f"an invalid config ({kind}, {via}) after weight 100")
                await load.until_answered(load.answered + 2 * CLIENTS)
        finally:
            stop.set()
            async with asyncio.timeout(10):
                await asyncio.gather(*clients)
        sent = load.answered + probes

        async def all_counted() -> bool:  # workers report every 50 ms
            samples = await scrape(admin, proxy.admin_url)
            return sum(v for _, v in samples["canary_proxy_requests_total"]) >= sent

        await eventually(all_counted)
        samples = await scrape(admin, proxy.admin_url)
        if workers > 1:
            async with admin.get(proxy.admin_url + "/status", headers=AUTH) as response:
                assert [w["restarts"] for w in (await response.json())["workers"]] == [0, 0]

    assert load.failures == [], load.failures[:10]
    assert load.connections_opened == [1] * CLIENTS  # keep-alive survived every reload
    assert outcomes == {"success": VALID_RELOADS, "failure": len(INVALID_AFTER)}
    reloads = {
        r: value_of(samples, "canary_proxy_config_reloads_total", result=r) for r in outcomes
    }
    assert reloads == outcomes
    assert value_of(samples, "canary_proxy_config_last_reload_successful") == 1
    requests = samples["canary_proxy_requests_total"]
    assert {labels["code"] for labels, _ in requests} == {"200"}
    assert sum(value for _, value in requests) == sent
    assert len(stable.received) + len(canary.received) == sent
    by_version = {labels["version"]: value for labels, value in requests}
    assert by_version == {"stable": len(stable.received), "canary": len(canary.received)}


# -- T-reload-inflight -------------------------------------------------------------------------


def start_then_end(release: asyncio.Event, after: list[bytes]) -> Script:
    """Answer `start\\n` at once and `end\\n` once `release` is set (one Content-Length
    response, keep-alive); then note what the proxy does with the connection next: b"" is EOF."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Version: old\r\n\r\nstart\n")
        await writer.drain()
        await release.wait()
        writer.write(b"end\n")
        await writer.drain()
        after.append(await reader.read(CHUNK))

    return script


def body_then_answer(size: int, after: list[bytes]) -> Script:
    """Read a `size`-byte request body, answer it back; then note what comes next."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await reader.readexactly(size)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Version: old\r\n\r\n" % size)
        writer.write(body)
        await writer.drain()
        after.append(await reader.read(CHUNK))

    return script


async def read_head(reader: asyncio.StreamReader) -> RawResponse:
    async with asyncio.timeout(5):
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = [(n.strip(), v.strip()) for n, v in (ln.split(":", 1) for ln in lines[1:] if ln)]
    return RawResponse(status=int(lines[0].split(" ", 2)[1]), headers=headers)


async def test_a_response_streaming_across_a_reload_finishes_from_the_old_upstream(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()
    after: list[bytes] = []
    async with (
        RawUpstream(start_then_end(release, after)) as old,
        FakeUpstream("new") as new,
        running_proxy(config_file(tmp_path, old.url), token=TOKEN) as proxy,
        open_session() as session,
        raw_connection(proxy) as (reader, writer),
    ):
        try:
            writer.write(b"GET /slow HTTP/1.1\r\nHost: shop\r\n\r\n")
            head = await read_head(reader)
            assert (head.status, head.header("X-Version")) == (200, ["old"])
            async with asyncio.timeout(5):
                assert await reader.readexactly(6) == b"start\n"

            status, answer = await put_config(
                session, proxy, json.dumps(proxy_config(tmp_path, new.url))
            )
            assert (status, answer["routes"]) == (
                200,
                {"added": [], "removed": [], "changed": ["shop"]},
            )
            assert await get(session, proxy.url + "/after") == (200, "new", b"new /after")
        finally:
            release.set()
        async with asyncio.timeout(5):
            assert await reader.readexactly(4) == b"end\n"  # start\nend\n: intact, from old

        # The same client connection, its next request parsed after the swap: the new upstream.
        writer.write(b"GET /next HTTP/1.1\r\nHost: shop\r\n\r\n")
        following = await read_response(reader, within=5)
        assert (following.status, following.body) == (200, b"new /next")

        # The old upstream's connection was closed after its last request, with nothing more.
        async with asyncio.timeout(3):
            await old.closed_by_peer.wait()
    assert after == [b""]
    assert len(old.requests) == 1
    assert [r.path_qs for r in new.received] == ["/after", "/next"]


async def test_an_upload_in_progress_across_a_reload_completes_to_the_old_upstream(
    tmp_path: Path,
) -> None:
    after: list[bytes] = []
    async with (
        RawUpstream(body_then_answer(10, after)) as old,
        FakeUpstream("new") as new,
        running_proxy(config_file(tmp_path, old.url), token=TOKEN) as proxy,
        open_session() as session,
        raw_connection(proxy) as (reader, writer),
    ):
        writer.write(b"POST /upload HTTP/1.1\r\nHost: shop\r\nContent-Length: 10\r\n\r\nstart\n")
        await eventually(lambda: bool(old.requests), every=0.01)  # the head reached the old one

        status, answer = await put_config(
            session, proxy, json.dumps(proxy_config(tmp_path, new.url))
        )
        assert status == 200, answer
        assert await get(session, proxy.url + "/after") == (200, "new", b"new /after")

        writer.write(b"end\n")
        response = await read_response(reader, within=5)
        async with asyncio.timeout(3):
            await old.closed_by_peer.wait()
    assert (response.status, response.header("X-Version"), response.body) == (
        200,
        ["old"],
        b"start\nend\n",
    )
    assert after == [b""]
    assert [r.path_qs for r in new.received] == ["/after"]


# -- T-sigterm ---------------------------------------------------------------------------------


async def readiness(session: aiohttp.ClientSession, proxy: ProxyProcess) -> int | None:
    """/readyz status, or None when the admin listener refuses the connection."""
    try:
        async with session.get(proxy.admin_url + "/readyz") as response:
            await response.read()
            return response.status
    except aiohttp.ClientConnectorError:
        return None


async def test_sigterm_drains_in_flight_requests_with_connection_close_and_exits_0(
    stable: FakeUpstream, tmp_path: Path
) -> None:
    release = asyncio.Event()
    stable.answer_with(stall(until=release), path="/slow")
    async with (
        running_proxy(config_file(tmp_path, stable.url), token=TOKEN) as proxy,
        open_session(force_close=True) as admin,
        raw_connection(proxy) as (slow_reader, slow_writer),
        raw_connection(proxy) as (reader, writer),
    ):
        try:
            # A keep-alive connection that has had one answer and is half-way through the
            # head of its next request when the signal comes (sent before /slow: by the time
            # /slow reaches the upstream, the proxy has read these bytes too).
            writer.write(b"GET /first HTTP/1.1\r\nHost: shop\r\n\r\n")
            first = await read_response(reader, within=5)
            assert (first.status, first.header("Connection")) == (200, [])
            writer.write(b"GET /second HTTP/1.1\r\nHost: shop\r\n")
            # A slow request in flight keeps the drain going.
            slow_writer.write(b"GET /slow HTTP/1.1\r\nHost: shop\r\n\r\n")
            await stable.wait_until(
                lambda u: [r.path_qs for r in u.received] == ["/first", "/slow"]
            )
            assert await readiness(admin, proxy) == 200

            proxy.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            seen: list[int | None] = []

            async def not_ready() -> bool:
                seen.append(await readiness(admin, proxy))
                return seen[-1] != 200

            await eventually(not_ready)
            assert seen[-1] in (503, None)  # not ready while draining (or already gone)
            await eventually(proxy.refuses_connections)  # the listener is closed
            assert proxy.process.returncode is None  # still draining: /slow is in flight

            writer.write(b"\r\n")
            second = await read_response(reader, within=5)
            async with asyncio.timeout(3):
                closed = await reader.read()
        finally:
            release.set()
        slow = await read_response(slow_reader, within=5)
        exit_code = await asyncio.wait_for(proxy.process.wait(), SHUTDOWN_SECONDS + 2)
        exited_after = time.monotonic() - signalled

    assert (second.status, second.body, second.header("Connection")) == (
        200,
        b"stable /second",
        ["close"],
    )
    assert closed == b""  # and the proxy closed that connection after the answer
    assert (slow.status, slow.body, slow.header("Connection")) == (
        200,
        b"stable /slow",
        ["close"],
    )
    assert exit_code == 0, proxy.logged()
    assert exited_after < SHUTDOWN_SECONDS + 2
