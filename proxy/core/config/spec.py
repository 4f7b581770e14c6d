"""The config file's field tables: what each mapping may hold, with defaults and descriptions,
and the syntax of its values. The parser accepts exactly these fields, and the JSON Schema
(`proxy.core.schema`) is built from the same tables, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from proxy.core.config.model import (
    DEFAULT_ADMIN_TOKEN_ENV,
    Address,
    Guard,
    Limits,
    Match,
    Timeouts,
)

# --- Field tables --------------------------------------------------------------------------------
#
# What each mapping in the file may hold. The parser accepts exactly these names (anything else is
# an unknown field) and reports a missing required one; `proxy.schema` builds the JSON Schema for
# editors from the same tables, so the two cannot drift apart.

ValueKind = Literal[
    "address",  # host:port or [ipv6]:port
    "path",  # a file or folder, relative to the config file's folder
    "text",  # any non-blank string
    "env_name",
    "duration",  # 250ms, 10s, 2m, 1h or a number of seconds; > 0
    "integer",  # at least the field's `minimum`
    "route_name",
    "host",  # a request host to match
    "path_prefix",
    "upstream",  # http://host[:port]
    "percentage",  # 0..100, at most two decimals
    "step",  # a percentage above 0
    "ratio",  # 0..1
    "header_name",
    "cookie_name",
    "guard_action",
    "workers",  # a whole number of at least 1, or auto
    "redis_url",  # redis://[:password@]host[:port][/db], rediss://..., unix:///path
    "cluster_name",  # [A-Za-z0-9_.-]+: part of every Redis key
    "replica",  # [A-Za-z0-9_.:-]+, or auto
]


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldSpec:
    """One field of a mapping: its name, what it holds, and how the docs describe it."""

    name: str
    kind: ValueKind | SectionSpec
    description: str
    required: bool = False
    many: bool = False  # a non-empty list of `kind`
    minimum: int = 0  # integers only
    default: str | float | None = None  # None: no default, or one the description explains


@dataclass(frozen=True, slots=True, kw_only=True)
class SectionSpec:
    """A mapping in the file: a name for the schema, and its fields in the order they are read."""

    name: str
    fields: tuple[FieldSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.fields)

    def field(self, name: str) -> FieldSpec:
        """The field called `name`; KeyError if the table has none (a parser bug)."""
        return {spec.name: spec for spec in self.fields}[name]


DEFAULT_LISTEN: Final = Address(host="0.0.0.0", port=8080)
DEFAULT_ADMIN_LISTEN: Final = Address(host="127.0.0.1", port=9901)
DEFAULT_STATE_DIR: Final = "./state"

TIMEOUTS: Final = Timeouts()
LIMITS: Final = Limits()
GUARD_DEFAULTS: Final = Guard()

ADMIN_SECTION: Final = SectionSpec(
    name="admin",
    fields=(
        FieldSpec(
            name="listen",
            kind="address",
            default=str(DEFAULT_ADMIN_LISTEN),
            description="Where the admin API listens: host:port or [ipv6]:port; off loopback it"
            " needs a token.",
        ),
        FieldSpec(
            name="token_env",
            kind="env_name",
            default=DEFAULT_ADMIN_TOKEN_ENV,
            description="Environment variable holding the bearer token for POST/PUT requests."
            " Set token_env or token_file, not both.",
        ),
        FieldSpec(
            name="token_file",
            kind="path",
            description="File holding the bearer token for POST/PUT requests, relative to the"
            " config file's folder. Set token_env or token_file, not both.",
        ),
    ),
)
TIMEOUTS_SECTION: Final = SectionSpec(
    name="timeouts",
    fields=(
        FieldSpec(
            name="connect",
            kind="duration",
            default=TIMEOUTS.connect,
            description="Opening a connection to an upstream.",
        ),
        FieldSpec(
            name="response_header",
            kind="duration",
            default=TIMEOUTS.response_header,
            description="From the request sent to the upstream's response headers.",
        ),
        FieldSpec(
            name="idle",
            kind="duration",
            default=TIMEOUTS.idle,
            description="An idle keep-alive connection (client or upstream).",
        ),
        FieldSpec(
            name="client_header",
            kind="duration",
            default=TIMEOUTS.client_header,
            description="A client sending its request headers.",
        ),
        FieldSpec(
            name="shutdown",
            kind="duration",
            default=TIMEOUTS.shutdown,
            description="Draining in-flight requests on SIGTERM.",
        ),
    ),
)
LIMITS_SECTION: Final = SectionSpec(
    name="limits",
    fields=(
        FieldSpec(
            name="max_header_bytes",
            kind="integer",
            minimum=256,
            default=LIMITS.max_header_bytes,
            description="Larger request headers get 431 (at least 256).",
        ),
        FieldSpec(
            name="max_url_bytes",
            kind="integer",
            minimum=256,
            default=LIMITS.max_url_bytes,
            description="A longer request target gets 414 (at least 256).",
        ),
        FieldSpec(
            name="max_body_bytes",
            kind="integer",
            minimum=0,
            default=LIMITS.max_body_bytes,
            description="Larger bodies get 413; 0 = unlimited (streamed).",
        ),
        FieldSpec(
            name="max_connections",
            kind="integer",
            minimum=1,
            default=LIMITS.max_connections,
            description="Open client connections (nginx worker_connections, HAProxy maxconn); "
            "past it a new connection is answered 503 and closed.",
        ),
        FieldSpec(
            name="max_response_header_bytes",
            kind="integer",
            minimum=256,
            default=LIMITS.max_response_header_bytes,
            description="A larger upstream response head (or one of more than 100 fields) "
            "gets 502 and counts as a protocol error (at least 256).",
        ),
    ),
)
MATCH_SECTION: Final = SectionSpec(
    name="match",
    fields=(
        FieldSpec(
            name="host",
            kind="host",
            description="Request host, case-insensitive, port ignored; absent = any host.",
        ),
        FieldSpec(
            name="path_prefix",
            kind="path_prefix",
            default=Match().path_prefix,
            description="Request path prefix.",
        ),
    ),
)
VERSION_SECTION: Final = SectionSpec(
    name="version",
    fields=(
        FieldSpec(
            name="upstreams",
            kind="upstream",
            many=True,
            required=True,
            description="Instances as http://host[:port], used round-robin.",
        ),
        FieldSpec(
            name="revision",
            kind="text",
            description="Optional label; a new canary revision clears an earlier rollback.",
        ),
    ),
)
KEY_SOURCE_SECTION: Final = SectionSpec(
    name="key_source",
    fields=(
        FieldSpec(name="header", kind="header_name", description="Header name (checked first)."),
        FieldSpec(name="cookie", kind="cookie_name", description="Cookie name."),
    ),
)
SPLIT_SECTION: Final = SectionSpec(
    name="split",
    fields=(
        FieldSpec(
            name="weight",
            kind="percentage",
            default=0,
            description="Percent of traffic to the canary; with a rollout it must equal the"
            " first step (or be left out).",
        ),
        FieldSpec(
            name="salt",
            kind="text",
            description="Bucketing salt; default = route name.",
        ),
        FieldSpec(
            name="sticky",
            kind=KEY_SOURCE_SECTION,
            description="Where the sticky bucketing key comes from: header, then cookie.",
        ),
        FieldSpec(
            name="force",
            kind=KEY_SOURCE_SECTION,
            description='Where a forced choice comes from: value "always" -> canary,'
            ' "never" -> stable.',
        ),
    ),
)
ROLLOUT_SECTION: Final = SectionSpec(
    name="rollout",
    fields=(
        FieldSpec(
            name="steps",
            kind="step",
            many=True,
            required=True,
            description="Ascending percentages; the weight starts at the first.",
        ),
        FieldSpec(
            name="interval",
            kind="duration",
            required=True,
            description="Healthy dwell time per step.",
        ),
    ),
)
GUARD_SECTION: Final = SectionSpec(
    name="guard",
    fields=(
        FieldSpec(
            name="window",
            kind="duration",
            default=GUARD_DEFAULTS.window,
            description="Sliding window.",
        ),
        FieldSpec(
            name="min_requests",
            kind="integer",
            minimum=1,
            default=GUARD_DEFAULTS.min_requests,
            description="Canary requests in the window before any verdict.",
        ),
        FieldSpec(
            name="max_error_rate",
            kind="ratio",
            default=GUARD_DEFAULTS.max_error_rate,
            description="Canary errors / canary requests.",
        ),
        FieldSpec(
            name="max_error_rate_increase",
            kind="ratio",
            description="Optional: canary error rate minus stable error rate.",
        ),
        FieldSpec(
            name="max_p99_latency",
            kind="duration",
            description="Optional: canary p99 latency.",
        ),
        FieldSpec(
            name="action",
            kind="guard_action",
            default=GUARD_DEFAULTS.action,
            description="rollback, or observe (record the verdict, change nothing).",
        ),
    ),
)
ROUTE_SECTION: Final = SectionSpec(
    name="route",
    fields=(
        FieldSpec(
            name="name",
            kind="route_name",
            required=True,
            description="Unique; [a-z0-9-]+.",
        ),
        FieldSpec(
            name="match",
            kind=MATCH_SECTION,
            description="Which requests the route takes; absent = every request.",
        ),
        FieldSpec(
            name="stable", kind=VERSION_SECTION, required=True, description="Stable version."
        ),
        FieldSpec(name="canary", kind=VERSION_SECTION, description="Optional: canary version."),
        FieldSpec(
            name="split",
            kind=SPLIT_SECTION,
            description="How requests split between stable and canary.",
        ),
        FieldSpec(
            name="rollout",
            kind=ROLLOUT_SECTION,
            description="Optional: automatic ramp; requires a canary.",
        ),
        FieldSpec(
            name="guard",
            kind=GUARD_SECTION,
            description="Optional: in-line automatic rollback; requires a canary.",
        ),
    ),
)
CLUSTER_SECTION: Final = SectionSpec(
    name="cluster",
    fields=(
        FieldSpec(
            name="redis",
            kind="redis_url",
            required=True,
            description="The fleet's Redis: redis://host[:port][/db], rediss:// (TLS) or"
            " unix:///path/redis.sock. A Redis Cluster or Sentinel is not supported.",
        ),
        FieldSpec(
            name="redis_password_env",
            kind="env_name",
            description="Optional: environment variable holding the Redis AUTH password.",
        ),
        FieldSpec(
            name="name",
            kind="cluster_name",
            required=True,
            description="Replicas with the same name share every route's rollout (the prefix of"
            " their Redis keys).",
        ),
        FieldSpec(
            name="replica",
            kind="replica",
            default="auto",
            description="This replica's id in the fleet; auto = host name and listen port.",
        ),
    ),
)
CONFIG_SECTION: Final = SectionSpec(
    name="config",
    fields=(
        FieldSpec(
            name="listen",
            kind="address",
            default=str(DEFAULT_LISTEN),
            description="Where the proxy serves traffic: host:port or [ipv6]:port.",
        ),
        FieldSpec(
            name="workers",
            kind="workers",
            default=1,
            description="Data plane processes sharing the listen port (SO_REUSEPORT) under one "
            "supervisor that runs the guard, the admin API and the metrics; auto = one per CPU. "
            "Changing it needs a restart.",
        ),
        FieldSpec(
            name="admin",
            kind=ADMIN_SECTION,
            description="The admin API, on its own listener.",
        ),
        FieldSpec(
            name="state_dir",
            kind="path",
            default=DEFAULT_STATE_DIR,
            description="Rollout state and audit log; survives restarts. Relative to the config"
            " file's folder.",
        ),
        FieldSpec(name="timeouts", kind=TIMEOUTS_SECTION, description="Timeouts."),
        FieldSpec(
            name="limits", kind=LIMITS_SECTION, description="Request size and connection limits."
        ),
        FieldSpec(
            name="routes",
            kind=ROUTE_SECTION,
            many=True,
            required=True,
            description="Routes; the first match wins.",
        ),
        FieldSpec(
            name="cluster",
            kind=CLUSTER_SECTION,
            description="Optional: several replicas run one rollout per route through Redis."
            " Changing it needs a restart.",
        ),
    ),
)

# --- Value syntax (shared by the parser and the schema) -----------------------------------------

DURATION: Final = re.compile(r"(?P<amount>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)")
UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_HINT: Final = "must be a duration such as 250ms, 10s, 2m or 1h"
ADDRESS: Final = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})"
)
HOSTNAME: Final = re.compile(r"[a-z0-9_.-]+")
MATCH_HOST: Final = re.compile(
    r"\[(?P<v6>[0-9a-f:.]+)\](?::\d{1,5})?|(?P<name>[a-z0-9_.-]+)(?::\d{1,5})?"
)
ROUTE_NAME: Final = re.compile(r"[a-z0-9-]+")
ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CLUSTER_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")
REPLICA: Final = re.compile(r"[A-Za-z0-9_.:-]+")
REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")
# RFC 9110 §5.6.2 `token`; header field names (§5.1) and cookie names (RFC 6265 §4.1.1) are tokens.
TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
PLAIN_PATH: Final = re.compile(r"/[^\s?#]*")
UPSTREAM_HINT: Final = "must be a URL like http://host:port"
MAX_PORT: Final = 65_535
