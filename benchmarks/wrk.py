"""wrk as the load generator: the command line, one bounded run, and its `--latency` report.

`parse_report` is pure and reads wrk 4.x output such as::

      Latency Distribution
         50%  612.00us
         99%    1.91ms
      123456 requests in 5.00s, 17.90MB read
      Socket errors: connect 0, read 0, write 0, timeout 3
      Non-2xx or 3xx responses: 7
    Requests/sec:  24690.12
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from processes import pinned

WRK_TIMEOUT: Final = "2s"  # a response slower than this is a wrk timeout (a socket error)
RUN_SLACK_SECONDS: Final = 15.0  # how long past its duration a wrk run may take before we kill it

_UNIT_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE: Final = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_REQUESTS: Final = re.compile(r"^\s*(\d+) requests in ", re.M)
_RATE: Final = re.compile(r"^Requests/sec:\s+([\d.]+)\s*$", re.M)
_SOCKET_ERRORS: Final = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_NON_2XX: Final = re.compile(r"Non-2xx or 3xx responses: (\d+)")


class WrkFailed(RuntimeError):
    """wrk exited with an error, ran past its bound, or printed something we cannot read."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketErrors:
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0

    @property
    def total(self) -> int:
        return self.connect + self.read + self.write + self.timeout


@dataclass(frozen=True, slots=True, kw_only=True)
class WrkReport:
    requests_per_second: float
    requests: int
    p50_ms: float
    p99_ms: float
    socket_errors: SocketErrors
    non_2xx: int  # wrk counts responses outside 2xx and 3xx
    tcp_opens: int | None = None  # host-wide TCP connects during the run (newconn only)
    # CPU the target's process group used during the run, 100 = one core (its leader first,
    # then the others by pid: canary-proxy's supervisor, then its workers)
    cpu_percent: float | None = None
    cpu_percent_by_process: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    """What every wrk run of a benchmark shares; only the URL and the duration vary."""

    wrk: str
    cpu: int  # wrk runs on this one core (-t1)
    connections: int
    script: Path | None  # a Lua script, e.g. one that sets a header per request
    headers: tuple[str, ...] = ()  # extra request headers, e.g. "Connection: close"


def command(load: Load, *, url: str, seconds: int) -> list[str]:
    argv = [load.wrk, "-t1", f"-c{load.connections}", f"-d{seconds}s", "--latency"]
    argv += ["--timeout", WRK_TIMEOUT]
    for header in load.headers:
        argv += ["-H", header]
    if load.script is not None:
        argv += ["-s", str(load.script)]
    return pinned(load.cpu, [*argv, url])


def run(load: Load, *, url: str, seconds: int) -> WrkReport:
    """One wrk run, bounded in time; it shares our process group, so Ctrl-C stops it too."""
    try:
        done = subprocess.run(
            command(load, url=url, seconds=seconds),
            capture_output=True,
            text=True,
            timeout=seconds + RUN_SLACK_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        raise WrkFailed(f"wrk against {url} ran past {expired.timeout:.0f}s") from expired
    if done.returncode != 0:
        raise WrkFailed(f"wrk against {url} exited {done.returncode}: {done.stderr.strip()}")
    return parse_report(done.stdout)


def parse_report(text: str) -> WrkReport:
    percentiles = {int(p): _to_ms(value, unit) for p, value, unit in _PERCENTILE.findall(text)}
    requests, rate = _REQUESTS.search(text), _RATE.search(text)
    if requests is None or rate is None or set(percentiles) != {50, 99}:
        raise WrkFailed(f"unreadable wrk output:\n{text}")
    return WrkReport(
        requests_per_second=float(rate.group(1)),
        requests=int(requests.group(1)),
        p50_ms=percentiles[50],
        p99_ms=percentiles[99],
        socket_errors=_socket_errors(text),
        non_2xx=_non_2xx(text),
    )


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def _socket_errors(text: str) -> SocketErrors:
    found = _SOCKET_ERRORS.search(text)
    if found is None:  # wrk prints the line only when some error happened
        return SocketErrors()
    connect, read, write, timeout = (int(group) for group in found.groups())
    return SocketErrors(connect=connect, read=read, write=write, timeout=timeout)


def _non_2xx(text: str) -> int:
    found = _NON_2XX.search(text)
    return 0 if found is None else int(found.group(1))
