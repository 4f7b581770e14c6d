"""Shell: the memory an idle keep-alive client connection costs a proxy (RSS per connection).

For one running target: a few throw-away connections first (one-time costs of a first
request are not a connection's), then the resident set of its whole process group, then
`count` connections opened one after another, each completing one GET and then kept open
and idle, then the resident set again. (after - before) / count is the cost of one idle
connection. One at a time, so a proxy needs just one pooled upstream connection throughout.
"""

from __future__ import annotations

import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from loadgen import parse_head
from processes import group_pids
from targets import Target

SETTLE_SECONDS: Final = 1.0  # after the last change, before reading RSS
WARMUP_CONNECTIONS: Final = 20
SOCKET_TIMEOUT_SECONDS: Final = 5.0
FD_HEADROOM: Final = 256  # descriptors beyond the idle connections (logs, pipes, probes)


class IdleFailed(RuntimeError):
    """A target refused or broke one of the idle connections, or RSS could not be read."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IdleResult:
    target: str  # the row's name: `nginx`, or `nginx x2` in a run of several worker counts
    processes: str  # which processes the RSS sums, e.g. "nginx: master process + worker"
    connections: int
    still_open: int  # of `connections`, still open when the RSS after was read
    rss_before_kb: int
    rss_after_kb: int
    rss_closed_kb: int  # after closing them all again
    per_connection_kb: float
    workers: int | None = None  # the proxy's worker count (processes or threads)


def raise_fd_limit(needed: int) -> int:
    """Raise our soft RLIMIT_NOFILE (inherited by every target we start) to cover `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise IdleFailed(
                f"RLIMIT_NOFILE hard limit {hard} < {want}: raise it (ulimit -Hn) and retry"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return int(soft)


def measure(target: Target, *, path: str, count: int) -> IdleResult:
    pgid = target.process.popen.pid  # the target leads its own process group
    for _ in range(WARMUP_CONNECTIONS):
        _open_idle(target.port, path).close()
    time.sleep(SETTLE_SECONDS)
    before = group_rss_kb(pgid)
    held: list[socket.socket] = []
    try:
        for number in range(count):
            try:
                held.append(_open_idle(target.port, path))
            except (OSError, ValueError) as error:
                raise IdleFailed(
                    f"{target.label}: idle connection {number + 1}/{count} failed: {error}"
                ) from error
        time.sleep(SETTLE_SECONDS)
        after = group_rss_kb(pgid)
        still_open = sum(_is_open(sock) for sock in held)
    finally:
        for sock in held:
            sock.close()
    time.sleep(SETTLE_SECONDS)
    closed = group_rss_kb(pgid)
    return IdleResult(
        target=target.label,
        processes=processes_label(pgid),
        connections=count,
        still_open=still_open,
        rss_before_kb=before,
        rss_after_kb=after,
        rss_closed_kb=closed,
        per_connection_kb=(after - before) / count,
        workers=target.workers,
    )


def _open_idle(port: int, path: str) -> socket.socket:
    """A connection that has completed one GET, left open for the caller to hold."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECONDS)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode("ascii"))
        _read_response(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_response(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("closed before a response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, length, chunked, close = parse_head(head + b"\r\n\r\n")
    if status != 200 or chunked or length is None or close:
        raise ValueError(f"expected 200 with Content-Length, kept alive; got {head[:80]!r}")
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("closed inside the response body")
        body += chunk


def _is_open(sock: socket.socket) -> bool:
    """Open if nothing is readable (no FIN from the peer, no reset) right now."""
    sock.setblocking(False)  # with a timeout set, recv would first wait that long
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)  # unsolicited bytes: open, if odd; b"": the peer closed


# --- the resident set of a process group --------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of one process, in KiB (what /proc calls kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a zombie or kernel thread has none


def group_rss_kb(pgid: int) -> int:
    pids = group_pids(pgid)
    if not pids:
        raise IdleFailed(f"no process left in group {pgid}")
    return sum(rss_kb(pid) for pid in pids)


def processes_label(pgid: int) -> str:
    """What the RSS sums, e.g. `nginx: master process + 2 x nginx: worker process`."""
    labels = [label for pid in group_pids(pgid) if (label := _process_label(pid))]
    counted = {label: labels.count(label) for label in labels}  # in order of first pid
    parts = [label if n == 1 else f"{n} x {label}" for label, n in counted.items()]
    return " + ".join(parts) if parts else "?"


def _process_label(pid: int) -> str | None:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        args = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    # nginx retitles its processes "nginx: master process ..." / "nginx: worker process".
    if args[0].startswith(f"{comm}:"):
        return args[0].split(" /", 1)[0].strip()
    # canary-proxy's workers: `python3 -m proxy worker --fd K`.
    if "-m" in args[:-2]:
        module = args.index("-m")
        return " ".join([comm, *args[module : module + 3]])
    return comm
