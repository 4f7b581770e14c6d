"""The admin API (docs/admin-api.md): an aiohttp app on its own listener.

Reads (GET) need no token and never change anything; mutations (POST, PUT) need
`Authorization: Bearer <token>` when a token is configured, compared in constant time. Errors
are JSON with a short message; the token is never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import monotonic
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.control.controller import RECENT_EVENTS, DecisionRefused, PersistError
from proxy.control.holder import RuntimeHolder
from proxy.control.reloads import Reloader
from proxy.core.config import Admin, ConfigError
from proxy.core.rollout import RolloutError
from proxy.core.vocabulary import CANARY, STABLE
from proxy.core.window import WindowCounts
from proxy.dataplane.runtime import RouteRuntime

MUTATING_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
YAML_TYPES: Final = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})
JSON_TYPE: Final = "application/json"
MAX_CONFIG_BYTES: Final = 4 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminSetupError(Exception):
    """The admin listener cannot start safely (e.g. off loopback without a token)."""


@dataclass(slots=True)
class AdminState:
    """What the admin app reads and drives; `draining` flips readiness on shutdown."""

    holder: RuntimeHolder
    reloader: Reloader
    registry: CollectorRegistry
    token: str | None
    draining: bool = False
    # With worker processes: each worker's pid, readiness, connections and restarts.
    workers: Callable[[], list[dict[str, object]]] | None = None
    # With worker processes: returns once every worker applies what was changed so far, so
    # that an answer to a reload or a verb means the change is live everywhere.
    settle: Callable[[], Awaitable[None]] | None = None
    # In a fleet: its name, whether Redis answers, and the replicas (GET /status `cluster`).
    cluster: Callable[[], dict[str, object]] | None = None


STATE_KEY: Final = web.AppKey("admin_state", AdminState)


def load_token(admin: Admin) -> str | None:
    """The bearer token from `token_file` or the `token_env` variable; None when unset."""
    if admin.token_file is not None:
        try:
            with open(admin.token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as error:
            raise AdminSetupError(
                f"admin.token_file: cannot read {admin.token_file}: {error.strerror}"
            ) from None
        if not token:
            raise AdminSetupError(f"admin.token_file: {admin.token_file} is empty")
        return token
    if admin.token_env is not None:
        return os.environ.get(admin.token_env) or None
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(admin: Admin, token: str | None) -> None:
    if token is None and not is_loopback(admin.listen.host):
        source = admin.token_file or f"${admin.token_env or 'CANARY_PROXY_ADMIN_TOKEN'}"
        raise AdminSetupError(
            f"admin.listen: {admin.listen} is not loopback and no admin token is set "
            f"({source}); refusing to expose an unauthenticated admin API"
        )


def create_app(state: AdminState) -> web.Application:
    app = web.Application(
        middlewares=[_json_errors, _require_token], client_max_size=MAX_CONFIG_BYTES
    )
    app[STATE_KEY] = state
    app.router.add_get("/status", _status)
    app.router.add_get("/routes/{name}", _route)
    app.router.add_post("/reload", _reload)
    app.router.add_put("/config", _put_config)
    for verb in ("promote", "abort", "pause", "resume", "retry"):
        app.router.add_post(f"/routes/{{name}}/{verb}", _verb)
    app.router.add_put("/routes/{name}/weight", _set_weight)
    app.router.add_get("/events", _events)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


def _error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        response = _error(error.status, error.reason)
        for name in ("Allow", "WWW-Authenticate"):
            if name in error.headers:
                response.headers[name] = error.headers[name]
        return response


@web.middleware
async def _require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[STATE_KEY].token
    if request.method in MUTATING_METHODS and _from_a_browser_page(request):
        # A web page the operator visits could otherwise POST to a token-less loopback admin
        # listener (cross-site request forgery); the CLI and curl send no Origin.
        return _error(403, "cross-origin requests cannot change the proxy")
    if token is not None and request.method in MUTATING_METHODS:
        offered = request.headers.get("Authorization", "")
        scheme, _, value = offered.partition(" ")
        offered_token = value.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            offered_token, token.encode("utf-8", "surrogateescape")
        ):
            response = _error(401, "missing or wrong bearer token")
            response.headers["WWW-Authenticate"] = 'Bearer realm="canary-proxy admin"'
            return response
    return await handler(request)


def _from_a_browser_page(request: web.Request) -> bool:
    site = request.headers.get("Sec-Fetch-Site")
    return "Origin" in request.headers or site in ("cross-site", "same-site")


def route_document(route: RouteRuntime) -> dict[str, object]:
    live = route.state
    state = live.rollout
    canary = route.route.canary
    rollout = route.route.rollout
    windows = live.windows(monotonic())
    assessment = live.assessment
    return {
        "name": route.name,
        "weight": (0 if live.aborted else live.weight_bp) / 100,
        "state": state.state,
        "reason": state.reason,
        "revision": canary.revision if canary else None,
        "step": (
            {"index": state.step, "count": len(rollout.steps_bp)}
            if rollout is not None and state.step is not None
            else None
        ),
        "window": (
            {STABLE: _window(windows[0]), CANARY: _window(windows[1])}
            if windows is not None
            else {STABLE: None, CANARY: None}
        ),
        # In a fleet: every replica's counts in the guard's window, as last read from Redis.
        "fleet_window": (
            {STABLE: _window(live.fleet_window[0]), CANARY: _window(live.fleet_window[1])}
            if live.fleet_window is not None
            else None
        ),
        "verdict": (
            {"verdict": assessment.verdict, "reason": assessment.reason}
            if assessment is not None
            else None
        ),
        "totals": {
            STABLE: _totals(route.stable_stats.codes),
            CANARY: _totals(route.canary_stats.codes),
        },
    }


def _window(counts: WindowCounts) -> dict[str, object]:
    return {
        "requests": counts.requests,
        "errors": counts.errors,
        "error_rate": round(counts.error_rate, 6),
        "p99_seconds": counts.p99 if counts.p99 is None or counts.p99 != float("inf") else None,
    }


def _totals(codes: dict[int, int]) -> dict[str, int]:
    return {
        "requests": sum(codes.values()),
        "errors": sum(n for code, n in codes.items() if 500 <= code < 600),
    }


async def _status(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    holder = state.holder
    routes = [route_document(route) for route in holder.current.routes.values()]
    document: dict[str, object] = {"routes": routes, "generation": holder.current.generation}
    if state.workers is not None:
        document["workers"] = state.workers()
    if state.cluster is not None:
        document["cluster"] = state.cluster()
    return web.json_response(document)


async def _route(request: web.Request) -> web.Response:
    holder = request.app[STATE_KEY].holder
    name = request.match_info["name"]
    route = holder.current.routes.get(name)
    if route is None:
        return _error(404, f"no route named {name!r}")
    return web.json_response(route_document(route))


async def _reload(request: web.Request) -> web.Response:
    reloader = request.app[STATE_KEY].reloader
    try:
        result = reloader.reload_file()
    except ConfigError as error:
        return _config_errors(error)
    await _settled(request)
    return web.json_response({"reloaded": True, **result.as_dict()})


async def _put_config(request: web.Request) -> web.Response:
    content_type = request.content_type
    if content_type not in YAML_TYPES and content_type != JSON_TYPE:
        return _error(415, "send the config as application/yaml or application/json")
    try:
        text = await request.text()
    except UnicodeDecodeError:
        return _error(400, "the config must be UTF-8 text")
    reloader = request.app[STATE_KEY].reloader
    try:
        result = reloader.replace_config(text, content_type)
    except ConfigError as error:
        return _config_errors(error)
    except OSError as error:
        return _error(500, f"could not write the config file: {error.strerror}")
    await _settled(request)
    return web.json_response({"reloaded": True, **result.as_dict()})


async def _verb(request: web.Request) -> web.Response:
    verb = request.path.rsplit("/", 1)[1]
    arguments: dict[str, object] = {}
    if verb == "promote":
        to = request.query.get("to")
        if to is not None and to not in ("100", "100.0"):
            return _error(400, "promote takes ?to=100 (finish the ramp) or nothing (next step)")
        arguments["to_end"] = to is not None
    if verb == "abort":
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        reason = body.get("reason", "aborted by an operator")
        if not isinstance(reason, str) or len(reason) > 500:
            return _error(400, "reason must be a string of at most 500 characters")
        arguments["reason"] = reason
    return await _act(request, verb, arguments)


async def _set_weight(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    weight = body.get("weight")
    weight_bp = _basis_points(weight)
    if weight_bp is None:
        return _error(400, "weight must be a number from 0 to 100 with at most two decimals")
    return await _act(request, "set_weight", {"weight_bp": weight_bp})


def _basis_points(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    scaled = value * 100
    if not 0 <= value <= 100 or abs(scaled - round(scaled)) > 1e-6:
        return None
    return round(scaled)


async def _json_body(request: web.Request) -> dict[str, object] | web.Response:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body must be a JSON object")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    return body


async def _settled(request: web.Request) -> None:
    settle = request.app[STATE_KEY].settle
    if settle is not None:
        await settle()


async def _act(request: web.Request, verb: str, arguments: dict[str, object]) -> web.Response:
    holder = request.app[STATE_KEY].holder
    name = request.match_info["name"]
    route = holder.current.routes.get(name)
    if route is None:
        return _error(404, f"no route named {name!r}")
    try:
        await holder.controller.act_written(name, verb, holder.canary_stats(name), **arguments)
    except RolloutError as error:
        return _error(409, str(error))
    except (PersistError, DecisionRefused) as error:
        return _error(503, f"{error}; nothing changed")
    except ValueError as error:
        return _error(400, str(error))
    await _settled(request)
    return web.json_response(route_document(route))


async def _events(request: web.Request) -> web.Response:
    holder = request.app[STATE_KEY].holder
    try:
        limit = min(int(request.query.get("limit", "100")), RECENT_EVENTS)
    except ValueError:
        return _error(400, "limit must be an integer")
    events = list(holder.controller.events)[-limit:] if limit > 0 else []
    return web.json_response({"events": events})


def _config_errors(error: ConfigError) -> web.Response:
    problems = [{"path": p.path, "message": p.message} for p in error.problems]
    return web.json_response({"errors": problems}, status=400)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE_KEY].registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    if state.workers is not None and not any(w["ready"] for w in state.workers()):
        return web.json_response({"status": "no worker is serving"}, status=503)
    return web.json_response({"status": "ready"})
