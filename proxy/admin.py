"""The admin API (DESIGN.md §7): an aiohttp app on its own listener.

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
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.config import Admin, ConfigError
from proxy.control import Reloader
from proxy.runtime import CANARY, STABLE, RouteRuntime, RuntimeHolder

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
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            response = _error(401, "missing or wrong bearer token")
            response.headers["WWW-Authenticate"] = 'Bearer realm="canary-proxy admin"'
            return response
    return await handler(request)


def _from_a_browser_page(request: web.Request) -> bool:
    site = request.headers.get("Sec-Fetch-Site")
    return "Origin" in request.headers or site in ("cross-site", "same-site")


def route_document(route: RouteRuntime) -> dict[str, object]:
    state = route.state
    canary = route.route.canary
    weight_bp = 0 if state.aborted else state.weight_bp
    return {
        "name": route.name,
        "weight": weight_bp / 100,
        "state": state.state_name(route.route),
        "reason": None,
        "revision": canary.revision if canary else None,
        "step": None,
        # The sliding window arrives with the guard; until then these are lifetime totals.
        "window": {"stable": None, "canary": None},
        "totals": {
            STABLE: _totals(route.stable_stats.codes),
            CANARY: _totals(route.canary_stats.codes),
        },
    }


def _totals(codes: dict[int, int]) -> dict[str, int]:
    return {
        "requests": sum(codes.values()),
        "errors": sum(n for code, n in codes.items() if 500 <= code < 600),
    }


async def _status(request: web.Request) -> web.Response:
    holder = request.app[STATE_KEY].holder
    routes = [route_document(route) for route in holder.current.routes.values()]
    return web.json_response({"routes": routes, "generation": holder.current.generation})


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
    return web.json_response({"reloaded": True, **result.as_dict()})


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
    if request.app[STATE_KEY].draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})
