"""Shell: start the upstream and each target (direct, canary-proxy, nginx, HAProxy), check them.

The upstream runs on the load core next to wrk; every proxy under test runs alone on the
proxy core. Each process gets its own folder (config, pid, logs) under the run's work dir.
"""

from __future__ import annotations

import http.client
import re
import socket
import sys
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from processes import Running, free_port, launch, wait_for_port
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
START_TIMEOUT_SECONDS: Final = 10.0
SMOKE_TIMEOUT_SECONDS: Final = 5.0
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
    proxy_cpu: int
    load_cpu: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    name: str
    port: int
    process: Running

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
    stack: ExitStack, host: Host, key: TargetKey, scenario: Scenario, upstream: Target
) -> Target:
    if key == "direct":
        return Target(name="direct", port=upstream.port, process=upstream.process)
    starter = _STARTERS[key]
    return starter(stack, host, scenario, upstream.port)


def _start_canary_proxy(
    stack: ExitStack, host: Host, scenario: Scenario, upstream_port: int
) -> Target:
    home = _home(host, f"{scenario.name}-canary-proxy")
    port = free_port()
    yaml = canary_proxy_yaml(
        home=home,
        port=port,
        upstream_port=upstream_port,
        sticky=scenario.sticky,
        guard=scenario.guard,
    )
    config = _write(home / "proxy.yaml", yaml)
    argv = [str(host.canary_proxy), "run", "--config", str(config)]
    return _start(stack, name="canary-proxy", argv=argv, cpu=host.proxy_cpu, home=home, port=port)


def _start_nginx(stack: ExitStack, host: Host, scenario: Scenario, upstream_port: int) -> Target:
    home = _home(host, f"{scenario.name}-nginx")
    port = free_port()
    text = nginx_proxy_conf(
        home=home, port=port, upstream_port=upstream_port, sticky=scenario.sticky
    )
    conf = _write(home / "nginx.conf", text)
    argv = _nginx_argv(host, home, conf)
    return _start(stack, name="nginx", argv=argv, cpu=host.proxy_cpu, home=home, port=port)


def _start_haproxy(stack: ExitStack, host: Host, scenario: Scenario, upstream_port: int) -> Target:
    home = _home(host, f"{scenario.name}-haproxy")
    port = free_port()
    text = haproxy_cfg(port=port, upstream_port=upstream_port, sticky=scenario.sticky)
    cfg = _write(home / "haproxy.cfg", text)
    argv = [host.tools["haproxy"], "-db", "-f", str(cfg)]  # -db: stay in the foreground
    return _start(stack, name="haproxy", argv=argv, cpu=host.proxy_cpu, home=home, port=port)


def start_fake_canary(stack: ExitStack, host: Host) -> Target:
    """The switchable canary of the guard scenario (fake_canary.py), on the load core."""
    home = _home(host, "fake-canary")
    port = free_port()
    argv = [sys.executable, str(FAKE_CANARY), str(port)]
    return _start(stack, name="fake-canary", argv=argv, cpu=host.load_cpu, home=home, port=port)


def start_guarded_proxy(
    stack: ExitStack, host: Host, *, name: str, stable_port: int, canary_port: int
) -> tuple[Target, Path]:
    """canary-proxy with a guard over the fake canary; also the path of its audit log."""
    home = _home(host, f"{name}-canary-proxy")
    port = free_port()
    yaml = guard_reaction_yaml(
        home=home, port=port, stable_port=stable_port, canary_port=canary_port
    )
    config = _write(home / "proxy.yaml", yaml)
    argv = [str(host.canary_proxy), "run", "--config", str(config)]
    target = _start(stack, name="canary-proxy", argv=argv, cpu=host.proxy_cpu, home=home, port=port)
    return target, home / "state" / "audit.jsonl"


_Starter = Callable[[ExitStack, Host, Scenario, int], Target]
_STARTERS: Final[Mapping[TargetKey, _Starter]] = {
    "proxy": _start_canary_proxy,
    "nginx": _start_nginx,
    "haproxy": _start_haproxy,
}


def _nginx_argv(host: Host, home: Path, conf: Path) -> list[str]:
    # -e: the early error log too goes to our folder, never to /var/log/nginx.
    return [host.tools["nginx"], "-p", str(home), "-c", str(conf), "-e", str(home / "error.log")]


def _start(
    stack: ExitStack, *, name: str, argv: list[str], cpu: int, home: Path, port: int
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
