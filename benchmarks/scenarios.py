"""Pure: the load scenarios and the text of every config the benchmark writes.

Every process listens on 127.0.0.1 only; every config keeps its pid, logs and temp files in
its own folder under the run's temporary directory, so no system file is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

ScenarioName = Literal["small", "sticky", "guarded", "large", "newconn", "idle", "guard"]
# throughput: wrk rounds against every target; idle: RSS per idle keep-alive client connection;
# reaction: canary-proxy's guard against a canary that starts failing (the peers have no guard).
ScenarioKind = Literal["throughput", "idle", "reaction"]

CANARY_WEIGHT: Final = 10  # percent of requests to the canary, in every proxy
STICKY_HEADER: Final = "X-User-ID"
SMALL_BODY: Final = "hello from the upstream\n"
LARGE_BODY_BYTES: Final = 64 * 1024
LARGE_PATH: Final = "/large"
KEEPALIVE_REQUESTS: Final = 100_000_000  # never close a benchmark connection for its age
UPSTREAM_KEEPALIVE: Final = 64  # idle pooled connections nginx keeps to the upstream
CLOSE_HEADER: Final = "Connection: close"  # newconn: every request on a connection of its own

IDLE_CONNECTIONS: Final = 1000  # idle keep-alive clients whose memory the idle scenario weighs
IDLE_GOAL_KB: Final = 10.0  # issue 5: at most this much RSS per idle client connection

GUARD_RATES: Final = (200, 2000)  # offered req/s of the guard's reaction scenario
GUARD_REPEATS: Final = 3  # per rate; the table shows their median and max
GUARD_WINDOW_SECONDS: Final = 5  # the guard's window; the canary is healthy this long first
GUARD_MIN_REQUESTS: Final = 20
GUARD_MAX_ERROR_RATE: Final = 0.05
GUARD_MAX_ERROR_RATE_INCREASE: Final = 0.02
CANARY_CONTROL_PREFIX: Final = "/__bench/"  # the fake canary's switch: /__bench/fail, /heal


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: ScenarioName
    path: str
    sticky: bool  # wrk sends a random X-User-ID per request; the proxies hash it
    body_bytes: int
    description: str
    guard: bool = False  # canary-proxy runs its live guard (the peers have no equivalent)
    close: bool = False  # wrk sends `Connection: close`: a new connection per request
    kind: ScenarioKind = "throughput"


SCENARIOS: Final = (
    Scenario(
        name="small",
        path="/",
        sticky=False,
        body_bytes=len(SMALL_BODY),
        description=f"{len(SMALL_BODY)} B responses over keep-alive, random split",
    ),
    Scenario(
        name="sticky",
        path="/",
        sticky=True,
        body_bytes=len(SMALL_BODY),
        description=f"as small, with a random {STICKY_HEADER} per request hashed by the proxy",
    ),
    Scenario(
        name="guarded",
        path="/",
        sticky=True,
        body_bytes=len(SMALL_BODY),
        description="as sticky, with canary-proxy's live guard on (window 10s, p99 limit)",
        guard=True,
    ),
    Scenario(
        name="large",
        path=LARGE_PATH,
        sticky=False,
        body_bytes=LARGE_BODY_BYTES,
        description="64 KB responses over keep-alive, random split",
    ),
    Scenario(
        name="newconn",
        path="/",
        sticky=False,
        body_bytes=len(SMALL_BODY),
        description=f"as small, with a new connection per request ({CLOSE_HEADER})",
        close=True,
    ),
    Scenario(
        name="idle",
        path="/",
        sticky=False,
        body_bytes=len(SMALL_BODY),
        description=(
            f"RSS per idle keep-alive client: {IDLE_CONNECTIONS:,} connections,"
            " one request each, then idle"
        ),
        kind="idle",
    ),
    Scenario(
        name="guard",
        path="/",
        sticky=False,
        body_bytes=len(SMALL_BODY),
        description=(
            "the guard's reaction: the canary starts answering 500 at T0 under an open-loop"
            f" load of {' and '.join(f'{rate:,}' for rate in GUARD_RATES)} req/s"
        ),
        kind="reaction",
    ),
)


def _nginx_preamble(home: Path, workers: int = 1) -> str:
    return f"""\
worker_processes {workers};
daemon off;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
"""


def _nginx_http_common(home: Path) -> str:
    return f"""\
    access_log off;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 75s;
    client_body_temp_path {home}/client_body;
    proxy_temp_path {home}/proxy;
    fastcgi_temp_path {home}/fastcgi;
    uwsgi_temp_path {home}/uwsgi;
    scgi_temp_path {home}/scgi;
"""


def upstream_nginx_conf(*, home: Path, port: int, large_file: Path) -> str:
    """The one upstream: a small fixed body on every path, a 64 KB file on /large."""
    return f"""\
{_nginx_preamble(home)}
http {{
{_nginx_http_common(home)}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {LARGE_PATH} {{
            default_type application/octet-stream;
            alias {large_file};
        }}
        location / {{
            default_type text/plain;
            return 200 "{SMALL_BODY.rstrip()}\\n";
        }}
    }}
}}
"""


def nginx_proxy_conf(
    *, home: Path, port: int, upstream_port: int, sticky: bool, workers: int = 1
) -> str:
    """nginx as the peer proxy: `split_clients` over two upstream blocks, pooled keep-alive,
    `workers` worker processes."""
    # $request_id is random per request, like our split without a key; with a key, hash it.
    key = "$http_x_user_id" if sticky else "$request_id"
    upstreams = "".join(_nginx_upstream_block(name, upstream_port) for name in ("stable", "canary"))
    return f"""\
{_nginx_preamble(home, workers)}
http {{
{_nginx_http_common(home)}
{upstreams}
    split_clients "{key}" $version {{
        {CANARY_WEIGHT}% canary;
        * stable;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://$version;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Stream a large body through the memory buffers, never via a temp file on disk.
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def _nginx_upstream_block(name: str, upstream_port: int) -> str:
    return f"""\
    upstream {name} {{
        server 127.0.0.1:{upstream_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
"""


def haproxy_cfg(*, port: int, upstream_port: int, sticky: bool, threads: int = 1) -> str:
    """HAProxy as the peer proxy: `threads` threads, two servers weighted like our split."""
    balance = f"hdr({STICKY_HEADER})" if sticky else "roundrobin"
    stable_weight = 100 - CANARY_WEIGHT
    return f"""\
global
    nbthread {threads}
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 75s

frontend bench
    bind 127.0.0.1:{port}
    default_backend versions

backend versions
    balance {balance}
    http-reuse always
    server stable 127.0.0.1:{upstream_port} weight {stable_weight}
    server canary 127.0.0.1:{upstream_port} weight {CANARY_WEIGHT}
"""


def canary_proxy_yaml(
    *,
    home: Path,
    port: int,
    upstream_port: int,
    sticky: bool,
    guard: bool = False,
    workers: int = 1,
) -> str:
    """canary-proxy under test: one route whose stable and canary are both the upstream;
    `workers` > 1 adds `workers: N` (a supervisor and N worker processes)."""
    upstream = f'["http://127.0.0.1:{upstream_port}"]'
    sticky_line = f"\n      sticky: {{header: {STICKY_HEADER}}}" if sticky else ""
    if guard:
        sticky_line += (
            "\n    guard: {window: 10s, min_requests: 20, max_error_rate: 0.05,"
            " max_error_rate_increase: 0.02, max_p99_latency: 1s}"
        )
    return f"""\
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:0"}}
state_dir: {home}/state
timeouts: {{shutdown: 1s}}{_workers_line(workers)}
routes:
  - name: bench
    stable: {{upstreams: {upstream}, revision: v1}}
    canary: {{upstreams: {upstream}, revision: v2}}
    split:
      weight: {CANARY_WEIGHT}{sticky_line}
"""


def guard_reaction_yaml(
    *, home: Path, port: int, stable_port: int, canary_port: int, workers: int = 1
) -> str:
    """canary-proxy for the guard scenario: the canary is the switchable fake, with a guard."""
    return f"""\
listen: "127.0.0.1:{port}"
admin: {{listen: "127.0.0.1:0"}}
state_dir: {home}/state
timeouts: {{shutdown: 1s}}{_workers_line(workers)}
routes:
  - name: bench
    stable: {{upstreams: ["http://127.0.0.1:{stable_port}"], revision: v1}}
    canary: {{upstreams: ["http://127.0.0.1:{canary_port}"], revision: v2}}
    split:
      weight: {CANARY_WEIGHT}
    guard:
      window: {GUARD_WINDOW_SECONDS}s
      min_requests: {GUARD_MIN_REQUESTS}
      max_error_rate: {GUARD_MAX_ERROR_RATE}
      max_error_rate_increase: {GUARD_MAX_ERROR_RATE_INCREASE}
      action: rollback
"""


def _workers_line(workers: int) -> str:
    """Nothing for one process (the config as it always was), else `workers: N`."""
    return "" if workers == 1 else f"\nworkers: {workers}"
