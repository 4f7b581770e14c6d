"""Parse a plain mapping (from YAML or JSON) into the config model.

Parse, derive, validate, then freeze: every problem is collected with its dotted field path
(`routes[0].split.weight`), and nothing downstream re-checks validity. No YAML here; the shell
loads the file and hands us the mapping.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Final, TypeAlias, TypeVar
from urllib.parse import SplitResult, urlsplit

from proxy.core.config.model import (
    DEFAULT_ADMIN_TOKEN_ENV,
    MAX_WORKERS,
    Address,
    Admin,
    Cluster,
    Config,
    ConfigError,
    ConfigProblem,
    Guard,
    KeySource,
    Limits,
    Match,
    Rollout,
    Route,
    Split,
    Timeouts,
    Upstream,
    Version,
    Workers,
)
from proxy.core.config.spec import (
    ADDRESS,
    ADMIN_SECTION,
    CLUSTER_NAME,
    CLUSTER_SECTION,
    CONFIG_SECTION,
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN,
    DEFAULT_STATE_DIR,
    DURATION,
    DURATION_HINT,
    ENV_NAME,
    GUARD_DEFAULTS,
    GUARD_SECTION,
    HOSTNAME,
    KEY_SOURCE_SECTION,
    LIMITS_SECTION,
    MATCH_HOST,
    MATCH_SECTION,
    MAX_PORT,
    PLAIN_PATH,
    REDIS_SCHEMES,
    REPLICA,
    ROLLOUT_SECTION,
    ROUTE_NAME,
    ROUTE_SECTION,
    SPLIT_SECTION,
    TIMEOUTS_SECTION,
    TOKEN,
    UNIT_SECONDS,
    UPSTREAM_HINT,
    VERSION_SECTION,
    SectionSpec,
)
from proxy.core.vocabulary import GuardAction

# --- Parsing -------------------------------------------------------------------------------------
#
# Every parser takes the context (where we are) and the raw value, and returns the parsed value or
# None after reporting why not. An explicit YAML null reads the same as leaving the field out,
# as it does in Kubernetes manifests. A broken field parses to its default so that the rest of
# the document is still checked; the collected problems then reject the whole config.

T = TypeVar("T")
_Parse: TypeAlias = Callable[["_Context", object], T | None]

_GUARD_ACTIONS: Final[dict[str, GuardAction]] = {"rollback": "rollback", "observe": "observe"}
_NO_VERSION: Final = Version(upstreams=())  # stands in for a broken one; the config is rejected


def parse_config(data: object, *, base_dir: str) -> Config:
    """The config in `data` (a mapping from YAML or JSON), or ConfigError with every problem.

    `base_dir` should be absolute: relative `state_dir` and `token_file` are resolved against it.
    """
    if not isinstance(data, Mapping):
        raise ConfigError((ConfigProblem(path="", message="config must be a mapping"),))
    problems: list[ConfigProblem] = []
    config = _config(
        _read_fields(_Context(path="", problems=problems), data, CONFIG_SECTION), base_dir
    )
    if problems:
        raise ConfigError(tuple(problems))
    return config


@dataclass(frozen=True, slots=True, kw_only=True)
class _Context:
    """Where the parser is in the document, and the one list every problem goes into."""

    path: str
    problems: list[ConfigProblem]

    def at(self, name: str) -> _Context:
        return _Context(path=f"{self.path}.{name}" if self.path else name, problems=self.problems)

    def item(self, index: int) -> _Context:
        return _Context(path=f"{self.path}[{index}]", problems=self.problems)

    def report(self, message: str) -> None:
        self.problems.append(ConfigProblem(path=self.path, message=message))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Section:
    """A mapping being read: its table, its known fields, and the context they sit in."""

    spec: SectionSpec
    ctx: _Context
    fields: Mapping[str, object]

    def has(self, name: str) -> bool:
        return self.fields.get(name) is not None

    def get(self, name: str, parse: _Parse[T]) -> T | None:
        """The parsed field, or None if it is absent (a problem if the table requires it)."""
        raw = self.fields.get(name)
        if raw is not None:
            return parse(self.ctx.at(name), raw)
        if self.spec.field(name).required:
            self.ctx.at(name).report("is required")
        return None

    def get_integer(self, name: str) -> int | None:
        return self.get(name, partial(_integer, minimum=self.spec.field(name).minimum))


def _section(ctx: _Context, raw: object, spec: SectionSpec) -> _Section | None:
    if not isinstance(raw, Mapping):
        ctx.report("must be a mapping")
        return None
    return _read_fields(ctx, raw, spec)


def _read_fields(ctx: _Context, raw: Mapping[object, object], spec: SectionSpec) -> _Section:
    allowed = spec.names
    for key in raw:
        if key not in allowed:
            ctx.at(str(key)).report(_unknown_field(str(key), allowed))
    return _Section(
        spec=spec,
        ctx=ctx,
        fields={k: v for k, v in raw.items() if isinstance(k, str) and k in allowed},
    )


def _unknown_field(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
    return f"unknown field (did you mean {close[0]}?)" if close else "unknown field"


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


# --- Sections ------------------------------------------------------------------------------------


def _config(section: _Section, base_dir: str) -> Config:
    return Config(
        listen=_or(section.get("listen", _address), DEFAULT_LISTEN),
        admin=_or(
            section.get("admin", partial(_admin, base_dir=base_dir)),
            Admin(listen=DEFAULT_ADMIN_LISTEN),
        ),
        state_dir=_or(
            section.get("state_dir", partial(_file_path, base_dir=base_dir)),
            _resolve(DEFAULT_STATE_DIR, base_dir),
        ),
        timeouts=_or(section.get("timeouts", _timeouts), Timeouts()),
        limits=_or(section.get("limits", _limits), Limits()),
        routes=_or(section.get("routes", _routes), ()),
        workers=_or(section.get("workers", _workers), 1),
        cluster=section.get("cluster", _cluster),
    )


def _cluster(ctx: _Context, raw: object) -> Cluster | None:
    section = _section(ctx, raw, CLUSTER_SECTION)
    if section is None:
        return None
    redis = section.get("redis", _redis_url)
    name = section.get("name", partial(_matching, regex=CLUSTER_NAME, hint="[A-Za-z0-9_.-]+"))
    password_env = section.get("redis_password_env", _env_name)
    replica = section.get("replica", partial(_matching, regex=REPLICA, hint="[A-Za-z0-9_.:-]+"))
    if redis is None or name is None:
        return None
    return Cluster(
        redis=redis, name=name, redis_password_env=password_env, replica=_or(replica, "auto")
    )


def _redis_url(ctx: _Context, raw: object) -> str | None:
    text = _string(ctx, raw)
    if text is None:
        return None
    try:
        parts = urlsplit(text)
        port = parts.port  # raises on a port that is not a number in 0..65535
    except ValueError:
        parts, port = urlsplit(""), None
    if not text.startswith(REDIS_SCHEMES) or not parts.scheme:
        ctx.report("must be a URL like redis://host:6379/0, rediss://... or unix:///path")
        return None
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            ctx.report("a unix:// URL needs an absolute socket path (unix:///run/redis.sock)")
            return None
        return text
    if not parts.hostname or port == 0:
        ctx.report("must name a host (and a port from 1 to 65535, if any)")
        return None
    if parts.path not in ("", "/") and not parts.path[1:].isdigit():
        ctx.report("the path must be a database number (redis://host:6379/0)")
        return None
    return text


def _matching(ctx: _Context, raw: object, *, regex: re.Pattern[str], hint: str) -> str | None:
    text = _string(ctx, raw)
    if text is not None and regex.fullmatch(text) is None:
        ctx.report(f"must match {hint}")
        return None
    return text


def _admin(ctx: _Context, raw: object, *, base_dir: str) -> Admin | None:
    section = _section(ctx, raw, ADMIN_SECTION)
    if section is None:
        return None
    listen = _or(section.get("listen", _address), DEFAULT_ADMIN_LISTEN)
    token_env = section.get("token_env", _env_name)
    token_file = section.get("token_file", partial(_file_path, base_dir=base_dir))
    if section.has("token_env") and section.has("token_file"):
        ctx.report("set token_env or token_file, not both")
    if token_file is not None:
        return Admin(listen=listen, token_env=None, token_file=token_file)
    return Admin(listen=listen, token_env=_or(token_env, DEFAULT_ADMIN_TOKEN_ENV))


def _timeouts(ctx: _Context, raw: object) -> Timeouts | None:
    section = _section(ctx, raw, TIMEOUTS_SECTION)
    if section is None:
        return None
    given = {
        name: seconds
        for name in TIMEOUTS_SECTION.names
        if (seconds := section.get(name, _duration)) is not None
    }
    return Timeouts(**given)


def _limits(ctx: _Context, raw: object) -> Limits | None:
    section = _section(ctx, raw, LIMITS_SECTION)
    if section is None:
        return None
    given = {
        name: size
        for name in LIMITS_SECTION.names
        if (size := section.get_integer(name)) is not None
    }
    return Limits(**given)


def _routes(ctx: _Context, raw: object) -> tuple[Route, ...] | None:
    items = _list(ctx, raw)
    if items is None:
        return None
    parsed = [_route(ctx.item(i), item) for i, item in enumerate(items)]
    _check_unique_names(ctx, parsed)
    return tuple(route for route in parsed if route is not None)


def _check_unique_names(ctx: _Context, routes: list[Route | None]) -> None:
    first_index: dict[str, int] = {}
    for index, route in enumerate(routes):
        if route is None or not route.name:  # already reported
            continue
        first = first_index.setdefault(route.name, index)
        if first != index:
            ctx.item(index).at("name").report(
                f"duplicate route name (already used by {ctx.item(first).path})"
            )


def _route(ctx: _Context, raw: object) -> Route | None:
    section = _section(ctx, raw, ROUTE_SECTION)
    if section is None:
        return None
    name = _or(section.get("name", _route_name), "")
    match = _or(section.get("match", _match), Match())
    stable = _or(section.get("stable", _version), _NO_VERSION)
    canary = section.get("canary", _version)
    split = _or(section.get("split", _split), _SplitSpec())
    rollout = section.get("rollout", _rollout)
    guard = section.get("guard", _guard)
    if not section.has("canary"):
        _reject_canary_settings(section, split)
    return Route(
        name=name,
        match=match,
        stable=stable,
        canary=canary,
        split=_freeze_split(section.ctx.at("split"), split, name=name, rollout=rollout),
        rollout=rollout,
        guard=guard,
    )


def _reject_canary_settings(route: _Section, split: _SplitSpec) -> None:
    """Without a canary there is nothing to send traffic to, ramp or guard."""
    if split.weight_bp not in (None, 0):
        route.ctx.at("split").at("weight").report("must be 0 without a canary")
    for name in ("rollout", "guard"):
        if route.has(name):
            route.ctx.at(name).report("requires a canary")


def _match(ctx: _Context, raw: object) -> Match | None:
    section = _section(ctx, raw, MATCH_SECTION)
    if section is None:
        return None
    return Match(
        host=section.get("host", _match_host),
        path_prefix=_or(section.get("path_prefix", _path_prefix), "/"),
    )


def _version(ctx: _Context, raw: object) -> Version | None:
    section = _section(ctx, raw, VERSION_SECTION)
    if section is None:
        return None
    return Version(
        upstreams=_or(section.get("upstreams", _upstreams), ()),
        revision=section.get("revision", _string),
    )


def _upstreams(ctx: _Context, raw: object) -> tuple[Upstream, ...] | None:
    items = _list(ctx, raw)
    if items is None:
        return None
    parsed = [_upstream(ctx.item(i), item) for i, item in enumerate(items)]
    return tuple(upstream for upstream in parsed if upstream is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class _SplitSpec:
    """`split` as written: the weight and salt stay unset until the route derives them."""

    weight_bp: int | None = None
    salt: str | None = None
    sticky: KeySource = field(default_factory=KeySource)
    force: KeySource = field(default_factory=KeySource)


def _split(ctx: _Context, raw: object) -> _SplitSpec | None:
    section = _section(ctx, raw, SPLIT_SECTION)
    if section is None:
        return None
    return _SplitSpec(
        weight_bp=section.get("weight", _percentage_bp),
        salt=section.get("salt", _string),
        sticky=_or(section.get("sticky", _key_source), KeySource()),
        force=_or(section.get("force", _key_source), KeySource()),
    )


def _freeze_split(ctx: _Context, spec: _SplitSpec, *, name: str, rollout: Rollout | None) -> Split:
    """The salt defaults to the route name; with a rollout the weight starts at its first step."""
    weight_bp = _or(spec.weight_bp, 0)
    if rollout is not None:
        first = rollout.steps_bp[0]
        # Two sources for the start weight would disagree after a restart; one must win, and
        # a silently ignored weight surprises, so a differing explicit weight is an error.
        if spec.weight_bp is not None and spec.weight_bp != first:
            ctx.at("weight").report(
                f"must be omitted or equal rollout.steps[0] ({first / 100:g}):"
                " a rollout starts at its first step"
            )
        weight_bp = first
    return Split(
        weight_bp=weight_bp, salt=_or(spec.salt, name), sticky=spec.sticky, force=spec.force
    )


def _key_source(ctx: _Context, raw: object) -> KeySource | None:
    section = _section(ctx, raw, KEY_SOURCE_SECTION)
    if section is None:
        return None
    return KeySource(
        header=section.get("header", _header_name),
        cookie=section.get("cookie", _cookie_name),
    )


def _rollout(ctx: _Context, raw: object) -> Rollout | None:
    section = _section(ctx, raw, ROLLOUT_SECTION)
    if section is None:
        return None
    steps = section.get("steps", _steps)
    interval = section.get("interval", _duration)
    if steps is None or interval is None:
        return None
    return Rollout(steps_bp=steps, interval=interval)


def _steps(ctx: _Context, raw: object) -> tuple[int, ...] | None:
    items = _list(ctx, raw)
    if items is None:
        return None
    parsed = [_step(ctx.item(i), item) for i, item in enumerate(items)]
    steps = tuple(step for step in parsed if step is not None)
    if len(steps) != len(parsed):
        return None
    descending = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    for i in descending:
        ctx.item(i).report("must be greater than the previous step")
    return None if descending else steps


def _step(ctx: _Context, raw: object) -> int | None:
    step = _percentage_bp(ctx, raw)
    if step == 0:
        ctx.report("must be greater than 0")
        return None
    return step


def _guard(ctx: _Context, raw: object) -> Guard | None:
    section = _section(ctx, raw, GUARD_SECTION)
    if section is None:
        return None
    return Guard(
        window=_or(section.get("window", _duration), GUARD_DEFAULTS.window),
        min_requests=_or(section.get_integer("min_requests"), GUARD_DEFAULTS.min_requests),
        max_error_rate=_or(section.get("max_error_rate", _ratio), GUARD_DEFAULTS.max_error_rate),
        max_error_rate_increase=section.get("max_error_rate_increase", _ratio),
        max_p99_latency=section.get("max_p99_latency", _duration),
        action=_or(section.get("action", _guard_action), GUARD_DEFAULTS.action),
    )


# --- Values --------------------------------------------------------------------------------------


def _string(ctx: _Context, raw: object) -> str | None:
    if not isinstance(raw, str):
        ctx.report("must be a string")
        return None
    if not raw.strip():
        ctx.report("must not be empty")
        return None
    return raw


def _list(ctx: _Context, raw: object) -> list[object] | None:
    if not isinstance(raw, list):
        ctx.report("must be a list")
        return None
    if not raw:
        ctx.report("must not be empty")
        return None
    return raw


def _number(raw: object) -> float | None:
    """A finite int or float; YAML's `true` is an int to Python but never a number here."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    try:
        number = float(raw)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


def _integer(ctx: _Context, raw: object, *, minimum: int) -> int | None:
    if isinstance(raw, bool) or not isinstance(raw, int):
        ctx.report("must be an integer")
        return None
    if raw < minimum:
        ctx.report("must not be negative" if minimum == 0 else f"must be at least {minimum}")
        return None
    return raw


def _duration(ctx: _Context, raw: object) -> float | None:
    """Seconds from `250ms`, `10s`, `2m`, `1h` or a plain number of seconds; always > 0 here."""
    seconds = _duration_text(raw) if isinstance(raw, str) else _number(raw)
    if seconds is None:
        ctx.report(DURATION_HINT)
        return None
    if seconds <= 0:
        ctx.report("must be greater than 0")
        return None
    return seconds


def _duration_text(text: str) -> float | None:
    match = DURATION.fullmatch(text)
    if match is None:
        return None
    return float(match["amount"]) * UNIT_SECONDS[match["unit"]]


def _percentage_bp(ctx: _Context, raw: object) -> int | None:
    """A percentage 0..100 with at most two decimals, in basis points (12.5 -> 1250)."""
    number = _number(raw)
    if number is None:
        ctx.report("must be a number")
        return None
    if not 0 <= number <= 100:
        ctx.report("must be between 0 and 100")
        return None
    # The shortest repr of a float is the decimal the operator wrote: 12.345 stays 12.345,
    # where float arithmetic (12.345 * 100 = 1234.4999...) would blur it.
    scaled = Decimal(repr(number)) * 100
    if scaled != scaled.to_integral_value():
        ctx.report("must have at most two decimals")
        return None
    return int(scaled)


def _ratio(ctx: _Context, raw: object) -> float | None:
    number = _number(raw)
    if number is None:
        ctx.report("must be a number")
        return None
    if not 0 <= number <= 1:
        ctx.report("must be between 0 and 1")
        return None
    return number


def _workers(ctx: _Context, raw: object) -> Workers | None:
    if raw == "auto":
        return "auto"
    if isinstance(raw, int) and not isinstance(raw, bool) and 1 <= raw <= MAX_WORKERS:
        return raw
    ctx.report(f"must be a whole number from 1 to {MAX_WORKERS}, or auto")
    return None


def _guard_action(ctx: _Context, raw: object) -> GuardAction | None:
    action = _GUARD_ACTIONS.get(raw) if isinstance(raw, str) else None
    if action is None:
        ctx.report("must be rollback or observe")
    return action


def _route_name(ctx: _Context, raw: object) -> str | None:
    name = _string(ctx, raw)
    if name is not None and ROUTE_NAME.fullmatch(name) is None:
        ctx.report("must match [a-z0-9-]+")
        return None
    return name


def _env_name(ctx: _Context, raw: object) -> str | None:
    name = _string(ctx, raw)
    if name is not None and ENV_NAME.fullmatch(name) is None:
        ctx.report("must be an environment variable name")
        return None
    return name


def _header_name(ctx: _Context, raw: object) -> str | None:
    name = _string(ctx, raw)
    if name is not None and TOKEN.fullmatch(name) is None:
        ctx.report("must be a valid header name")
        return None
    return None if name is None else name.lower()


def _cookie_name(ctx: _Context, raw: object) -> str | None:
    name = _string(ctx, raw)
    if name is not None and TOKEN.fullmatch(name) is None:
        ctx.report("must be a valid cookie name")
        return None
    return name


def _file_path(ctx: _Context, raw: object, *, base_dir: str) -> str | None:
    text = _string(ctx, raw)
    return None if text is None else _resolve(text, base_dir)


def _resolve(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, path))  # join keeps an absolute path as is


def _path_prefix(ctx: _Context, raw: object) -> str | None:
    text = _string(ctx, raw)
    if text is None:
        return None
    if not text.startswith("/"):
        ctx.report("must start with /")
        return None
    if PLAIN_PATH.fullmatch(text) is None:
        ctx.report("must not contain spaces, ? or #")
        return None
    return text


def _match_host(ctx: _Context, raw: object) -> str | None:
    """The host as `routing.normalize_host` keeps it: lower case, no port or trailing dot."""
    text = _string(ctx, raw)
    if text is None:
        return None
    text = text.lower()
    if text.count(":") > 1 and _is_ipv6(text):  # a bare IPv6 literal, as operators write it
        return f"[{text}]"
    match = MATCH_HOST.fullmatch(text)
    if match is None or (match["v6"] is not None and not _is_ipv6(match["v6"])):
        ctx.report("must be a host name, optionally with :port")
        return None
    return f"[{match['v6']}]" if match["v6"] is not None else match["name"].rstrip(".")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _address(ctx: _Context, raw: object) -> Address | None:
    text = _string(ctx, raw)
    if text is None:
        return None
    match = ADDRESS.fullmatch(text)
    if match is None or (match["v6"] is not None and not _is_ipv6(match["v6"])):
        ctx.report("must be host:port or [ipv6]:port")
        return None
    port = int(match["port"])
    if port > MAX_PORT:
        ctx.report("port must be between 0 and 65535")  # 0 asks the OS for a free port
        return None
    return Address(host=(match["v6"] or match["host"]).lower(), port=port)


def _upstream(ctx: _Context, raw: object) -> Upstream | None:
    text = _string(ctx, raw)
    if text is None:
        return None
    try:
        parts = urlsplit(text)
        port = parts.port  # raises on a port that is not a number in 0..65535
    except ValueError:
        ctx.report(UPSTREAM_HINT)
        return None
    problem = _upstream_problem(parts, port)
    if problem is not None:
        ctx.report(problem)
        return None
    host = str(parts.hostname)
    if ":" not in host and not _encodable_host(host):
        ctx.report("the host name is not a valid DNS name (a label is empty or over 63 bytes)")
        return None
    port = 80 if port is None else port
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Upstream(url=f"http://{netloc}", host=host, port=port)


def _encodable_host(host: str) -> bool:
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _upstream_problem(parts: SplitResult, port: int | None) -> str | None:
    if parts.scheme != "http":
        return "only http:// upstreams are supported"
    if parts.username is not None:
        return "must not contain user info"
    host = parts.hostname
    # urlsplit has validated a bracketed IPv6 host already; anything else must look like a name.
    if not host or (":" not in host and HOSTNAME.fullmatch(host) is None):
        return UPSTREAM_HINT
    if port == 0:
        return "port must be between 1 and 65535"
    if parts.path not in ("", "/"):
        return "must not have a path"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None
