"""Shell: start the upstream and each target (direct, canary-proxy, nginx, HAProxy), check them.

The upstream runs on the load core next to wrk; every proxy under test runs on the cores of
its `Placement`: with one worker, alone on the proxy core; with N, on N cores (canary-proxy
`workers: N`, nginx `worker_processes N`, HAProxy `nbthread N`). Each process gets its own
folder (config, pid, logs) under the run's work dir.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from processes import (
    ProcessFailed,
    Running,
    find_line,
    free_port,
    launch,
    wait_for_line,
    wait_for_port,
)
from scenarios import (
    CLOSE_HEADER,
    LARGE_BODY_BYTES,
    STICKY_HEADER,
    Scenario,
    canary_proxy_yaml,
    guard_reaction_yaml,
    haproxy_cfg,
    nginx_proxy_conf,
    upstream_nginx_conf,
)

TargetKey = Literal["direct", "proxy", "nginx", "haproxy"]
TARGET_KEYS: Final[tuple[TargetKey, ...]] = ("direct", "proxy", "nginx", "haproxy")
DISPLAY_NAMES: Final[Mapping[TargetKey, str]] = {
    "direct": "direct",
    "proxy": "canary-proxy",
    "nginx": "nginx",
    "haproxy": "haproxy",
}
FAKE_CANARY: Final = Path(__file__).resolve().parent / "fake_canary.py"
TIMES: Final = "\u00d7"  # MULTIPLICATION SIGN, before a row's worker count: `nginx <it>2`
START_TIMEOUT_SECONDS: Final = 10.0
SMOKE_TIMEOUT_SECONDS: Final = 5.0
ADMIN_TIMEOUT_SECONDS: Final = 5.0
# canary-proxy's start-up lines: it serves (with workers: every worker listens), its admin port.
_PROXY_READY: Final = re.compile(r"\bcanary-proxy listening on \S+:\d+")
_PROXY_ADMIN: Final = re.compile(r"\badmin API listening on \S+:(\d+)")
# canary-proxy log lines worth reporting after a run (its format: "<time> LEVEL message").
_PROBLEM_LINE: Final = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")
MAX_PROBLEM_LINES: Final = 20


class SmokeFailed(RuntimeError):
    """A target did not answer one plain GET with 200 and the expected body length."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """What every target of the run shares."""

    tools: Mapping[str, str]
    workdir: Path
    canary_proxy: Path  # the console script of the checkout under test
    load_cpu: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """A proxy under test: its worker count (processes or threads) and the cores it gets."""

    workers: int
    cpus: tuple[int, ...]
    labelled: bool = False  # rows say `xN`: any run but the default `--workers 1`

    def label(self, name: str) -> str:
        return f"{name} {TIMES}{self.workers}" if self.labelled else name


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    name: str
    port: int
    process: Running
    workers: int | None = None  # a proxy under test: its worker count; direct: None
    label: str = ""  # the row's name: `canary-proxy x2` in a run of several counts
    admin_port: int | None = None  # canary-proxy's admin API

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def start_upstream(stack: ExitStack, host: Host) -> Target:
    """nginx, one worker, on the load core: a small body everywhere, 64 KB on /large."""
    home = _home(host, "upstream")
    large = home / "large.bin"
    large.write_bytes(b"x" * LARGE_BODY_BYTES)
    port = free_port()
    conf = _write(home / "nginx.conf", upstream_nginx_conf(home=home, port=port, large_file=large))
    argv = _nginx_argv(host, home, conf)
    return _start(stack, name="upstream", argv=argv, cpu=host.load_cpu, home=home, port=port)


def start_target(
    stack: ExitStack,
    host: Host,
    key: TargetKey,
    scenario: Scenario,
    upstream: Target,
    *,
    placement: Placement,
) -> Target:
    """`placement` applies to the proxies; direct is the upstream, wherever it runs."""
    if key == "direct":
        return Target(name="direct", port=upstream.port, process=upstream.process)
    starter = _STARTERS[key]
    return starter(stack, host, scenario, upstream.port, placement)


def start_canary_proxy(
    stack: ExitStack,
    host: Host,
    scenario: Scenario,
    upstream_port: int,
    placement: Placement,
    *,
    wrapper: Sequence[str] = (),
    timeout: float = START_TIMEOUT_SECONDS,
) -> Target:
    """canary-proxy with the scenario's config; `wrapper` goes before its command line
    (instructions.py: valgrind), `timeout` bounds its start."""
    home = _home(host, f"{scenario.name}-canary-proxy{_suffix(placement)}")
    port = free_port()
    yaml = canary_proxy_yaml(
        home=home,
        port=port,
        upstream_port=upstream_port,
        sticky=scenario.sticky,
        guard=scenario.guard,
        workers=placement.workers,
    )
    config = _write(home / "proxy.yaml", yaml)
    return start_proxy_process(
        stack,
        host,
        home=home,
        config=config,
        port=port,
        placement=placement,
        wrapper=wrapper,
        timeout=timeout,
    )


def start_proxy_process(
    stack: ExitStack,
    host: Host,
    *,
    home: Path,
    config: Path,
    port: int,
    placement: Placement,
    wrapper: Sequence[str] = (),
    timeout: float = START_TIMEOUT_SECONDS,
) -> Target:
    """canary-proxy, ready only once it logs that it listens: with workers, the port answers
    as soon as the first worker listens, the line comes once all of them do."""
    argv = [*wrapper, str(host.canary_proxy), "run", "--config", str(config)]
    process = launch(
        stack, name="canary-proxy", argv=argv, cpu=placement.cpus, log_path=home / "output.log"
    )
    wait_for_port(process, port, timeout=timeout)
    wait_for_line(process, _PROXY_READY, timeout=timeout)
    if placement.workers > 1:
        workers = re.compile(rf"\b{placement.workers} workers listening \(SO_REUSEPORT\)")
        if find_line(process, workers) is None:
            raise ProcessFailed(
                f"canary-proxy did not log {workers.pattern!r}: not running"
                f" {placement.workers} workers?"
            )
    admin = find_line(process, _PROXY_ADMIN)
    found = None if admin is None else _PROXY_ADMIN.search(admin)
    return Target(
        name="canary-proxy",
        port=port,
        process=process,
        workers=placement.workers,
        label=placement.label("canary-proxy"),
        admin_port=None if found is None else int(found.group(1)),
    )


def _start_nginx(
    stack: ExitStack, host: Host, scenario: Scenario, upstream_port: int, placement: Placement
) -> Target:
    home = _home(host, f"{scenario.name}-nginx{_suffix(placement)}")
    port = free_port()
    text = nginx_proxy_conf(
        home=home,
        port=port,
        upstream_port=upstream_port,
        sticky=scenario.sticky,
        workers=placement.workers,
    )
    conf = _write(home / "nginx.conf", text)
    argv = _nginx_argv(host, home, conf)
    return _start_peer(stack, name="nginx", argv=argv, home=home, port=port, placement=placement)


def _start_haproxy(
    stack: ExitStack, host: Host, scenario: Scenario, upstream_port: int, placement: Placement
) -> Target:
    home = _home(host, f"{scenario.name}-haproxy{_suffix(placement)}")
    port = free_port()
    text = haproxy_cfg(
        port=port, upstream_port=upstream_port, sticky=scenario.sticky, threads=placement.workers
    )
    cfg = _write(home / "haproxy.cfg", text)
    argv = [host.tools["haproxy"], "-db", "-f", str(cfg)]  # -db: stay in the foreground
    return _start_peer(stack, name="haproxy", argv=argv, home=home, port=port, placement=placement)


def _start_peer(
    stack: ExitStack, *, name: str, argv: list[str], home: Path, port: int, placement: Placement
) -> Target:
    target = _start(stack, name=name, argv=argv, cpu=placement.cpus, home=home, port=port)
    return Target(
        name=name,
        port=port,
        process=target.process,
        workers=placement.workers,
        label=placement.label(name),
    )


def _suffix(placement: Placement) -> str:
    """Folder names: today's for one worker, `-w2` for two."""
    return "" if placement.workers == 1 else f"-w{placement.workers}"


def start_fake_canary(stack: ExitStack, host: Host) -> Target:
    """The switchable canary of the guard scenario (fake_canary.py), on the load core."""
    home = _home(host, "fake-canary")
    port = free_port()
    argv = [sys.executable, str(FAKE_CANARY), str(port)]
    return _start(stack, name="fake-canary", argv=argv, cpu=host.load_cpu, home=home, port=port)


def start_guarded_proxy(
    stack: ExitStack,
    host: Host,
    placement: Placement,
    *,
    name: str,
    stable_port: int,
    canary_port: int,
) -> tuple[Target, Path]:
    """canary-proxy with a guard over the fake canary; also the path of its audit log."""
    home = _home(host, f"{name}-canary-proxy{_suffix(placement)}")
    port = free_port()
    yaml = guard_reaction_yaml(
        home=home,
        port=port,
        stable_port=stable_port,
        canary_port=canary_port,
        workers=placement.workers,
    )
    config = _write(home / "proxy.yaml", yaml)
    target = start_proxy_process(
        stack, host, home=home, config=config, port=port, placement=placement
    )
    return target, home / "state" / "audit.jsonl"


_Starter = Callable[[ExitStack, Host, Scenario, int, Placement], Target]
_STARTERS: Final[Mapping[TargetKey, _Starter]] = {
    "proxy": start_canary_proxy,
    "nginx": _start_nginx,
    "haproxy": _start_haproxy,
}


def _nginx_argv(host: Host, home: Path, conf: Path) -> list[str]:
    # -e: the early error log too goes to our folder, never to /var/log/nginx.
    return [host.tools["nginx"], "-p", str(home), "-c", str(conf), "-e", str(home / "error.log")]


def _start(
    stack: ExitStack,
    *,
    name: str,
    argv: list[str],
    cpu: int | tuple[int, ...],
    home: Path,
    port: int,
) -> Target:
    process = launch(stack, name=name, argv=argv, cpu=cpu, log_path=home / "output.log")
    wait_for_port(process, port, timeout=START_TIMEOUT_SECONDS)
    return Target(name=name, port=port, process=process)


def _home(host: Host, name: str) -> Path:
    home = host.workdir / name
    home.mkdir(mode=0o755)  # nginx workers drop root to `nobody` and must read what is here
    home.chmod(0o755)
    return home


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def smoke_check(target: Target, scenario: Scenario) -> None:
    """One GET before the load, so a broken target fails loudly instead of scoring 0 req/s."""
    if scenario.close:
        _smoke_check_close(target, scenario)
        return
    connection = http.client.HTTPConnection("127.0.0.1", target.port, timeout=SMOKE_TIMEOUT_SECONDS)
    headers = {STICKY_HEADER: "smoke-test"} if scenario.sticky else {}
    try:
        connection.request("GET", scenario.path, headers=headers)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as error:
        raise SmokeFailed(f"{target.name}: GET {scenario.path} failed: {error}") from error
    finally:
        connection.close()
    if response.status != 200 or len(body) != scenario.body_bytes:
        raise SmokeFailed(
            f"{target.name}: GET {scenario.path} gave {response.status} with {len(body)} bytes,"
            f" expected 200 with {scenario.body_bytes}"
        )


def _smoke_check_close(target: Target, scenario: Scenario) -> None:
    """A GET with `Connection: close` must be answered with `Connection: close` and the
    connection closed: that is what makes wrk open a new connection for its next request."""
    request = f"GET {scenario.path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n{CLOSE_HEADER}\r\n"
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", target.port), SMOKE_TIMEOUT_SECONDS) as sock:
            sock.sendall((request + "\r\n").encode("ascii"))
            while chunk := sock.recv(65536):  # until the target closes; a timeout if it never does
                received += chunk
    except OSError as error:
        raise SmokeFailed(
            f"{target.name}: GET {scenario.path} with {CLOSE_HEADER} was not answered and closed"
            f" within {SMOKE_TIMEOUT_SECONDS:.0f}s: {error}"
        ) from error
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    if not lines[0].startswith("http/1.1 200") or len(body) != scenario.body_bytes:
        raise SmokeFailed(f"{target.name}: GET with {CLOSE_HEADER} gave {received[:200]!r}")
    if "connection: close" not in lines[1:]:
        raise SmokeFailed(f"{target.name}: the answer to {CLOSE_HEADER} lacks {CLOSE_HEADER}")


def problem_lines(target: Target) -> list[str]:
    """Warnings, errors and tracebacks the target logged (only meaningful for canary-proxy)."""
    try:
        lines = target.process.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if _PROBLEM_LINE.search(line)][:MAX_PROBLEM_LINES]


def worker_status(target: Target) -> list[dict[str, object]] | None:
    """canary-proxy's own view of its workers (admin `GET /status`): pid, requests, restarts
    of each; None with one process, or if the admin API does not answer."""
    if target.admin_port is None or not target.workers or target.workers < 2:
        return None
    connection = http.client.HTTPConnection(
        "127.0.0.1", target.admin_port, timeout=ADMIN_TIMEOUT_SECONDS
    )
    try:
        connection.request("GET", "/status")
        response = connection.getresponse()
        document = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()
    workers = document.get("workers") if isinstance(document, dict) else None
    return workers if isinstance(workers, list) else None
