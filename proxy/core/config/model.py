"""The config model: frozen dataclasses, every field with its default (docs/configuration.md).

`parse` builds them from a plain mapping and `spec` describes the file's fields; nothing
downstream re-checks a config's validity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from proxy.core.vocabulary import GuardAction

BASIS_POINTS: Final = 10_000  # 100 % expressed in basis points (0.01 % granularity)
DEFAULT_ADMIN_TOKEN_ENV: Final = "CANARY_PROXY_ADMIN_TOKEN"
# A typo's guard (`workers: 2000`), not a tuning limit; `auto` takes the CPUs there are.
MAX_WORKERS: Final = 256

Workers = int | Literal["auto"]  # data plane processes; auto = one per CPU


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigProblem:
    """One config error: where it is and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """Raised with every problem found; a config either parses whole or not at all."""

    def __init__(self, problems: tuple[ConfigProblem, ...]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """One instance of a version: `http://host:port` (no path; only http)."""

    url: str
    host: str
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Version:
    upstreams: tuple[Upstream, ...]
    revision: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    host: str | None = None  # lower-cased, port stripped
    path_prefix: str = "/"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySource:
    """Where a per-request key comes from: a header (checked first), then a cookie."""

    header: str | None = None  # lower-cased header name
    cookie: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    weight_bp: int = 0  # canary share in basis points, 0..10000
    salt: str = ""
    sticky: KeySource = field(default_factory=KeySource)
    force: KeySource = field(default_factory=KeySource)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rollout:
    steps_bp: tuple[int, ...]  # ascending, in basis points
    interval: float  # seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class Guard:
    window: float = 10.0
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_error_rate_increase: float | None = None
    max_p99_latency: float | None = None  # seconds
    action: GuardAction = "rollback"


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    name: str
    match: Match
    stable: Version
    canary: Version | None
    split: Split
    rollout: Rollout | None = None
    guard: Guard | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    connect: float = 2.0
    response_header: float = 30.0
    idle: float = 60.0
    client_header: float = 10.0
    shutdown: float = 30.0  # drain bound on SIGTERM


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    max_header_bytes: int = 65_536
    max_url_bytes: int = 8_192
    max_body_bytes: int = 0  # 0 = unlimited (streamed)
    max_connections: int = 10_000  # open client connections; past it a new one gets 503
    max_response_header_bytes: int = 65_536  # a larger upstream response head is a 502


@dataclass(frozen=True, slots=True, kw_only=True)
class Admin:
    listen: Address
    token_env: str | None = DEFAULT_ADMIN_TOKEN_ENV
    token_file: str | None = None  # absolute path


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """Replicas with the same `name` run one rollout per route through Redis."""

    redis: str  # redis://, rediss:// or unix:// URL
    name: str
    redis_password_env: str | None = None
    replica: str = "auto"  # auto: the host name and the listen port


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: Address
    admin: Admin
    state_dir: str  # absolute path
    timeouts: Timeouts
    limits: Limits
    routes: tuple[Route, ...]
    workers: Workers = 1
    cluster: Cluster | None = None
