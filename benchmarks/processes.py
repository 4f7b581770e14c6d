"""Shell: start pinned processes in their own process group, wait for them, always stop them.

Each process is registered on an `ExitStack` as it starts, so leaving the `with` block — at the
end, on an error or on Ctrl-C — stops every process group that was started, newest first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

STOP_GRACE_SECONDS: Final = 5.0
READY_POLL_SECONDS: Final = 0.05
LOG_TAIL_LINES: Final = 15


class ProcessFailed(RuntimeError):
    """A benchmark process exited or never became ready; the message carries its log tail."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def is_alive(self) -> bool:
        return self.popen.poll() is None


def free_port() -> int:
    """A loopback port that was free a moment ago (bound with port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    """`argv` run under `taskset`, so it and every child it forks stay on one core."""
    return ["taskset", "-c", str(cpu), *argv]


def pin_self(cpu: int) -> set[int]:
    """Pin this process (when it is the client side) to `cpu`; returns the affinity to restore."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    return before


def launch(
    stack: ExitStack, *, name: str, argv: Sequence[str], cpu: int, log_path: Path
) -> Running:
    """Start `argv` pinned to `cpu` in a new session; the stack stops it on exit."""
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            pinned(cpu, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches only us, we stop it
        )
    running = Running(name=name, popen=popen, log_path=log_path)
    stack.callback(stop, running)
    return running


def stop(running: Running) -> None:
    """SIGTERM the whole process group, then SIGKILL whatever outlives the grace period."""
    _signal_group(running.popen.pid, signal.SIGTERM)
    try:
        running.popen.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        _signal_group(running.popen.pid, signal.SIGKILL)
        running.popen.wait(timeout=STOP_GRACE_SECONDS)
    # The leader may be gone while a forked worker lingers (nginx): make sure of the group.
    _signal_group(running.popen.pid, signal.SIGKILL)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # the whole group is already gone
        os.killpg(pgid, signum)


def wait_for_port(running: Running, port: int, *, timeout: float) -> None:
    """Return once 127.0.0.1:`port` accepts a connection; raise if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running.is_alive():
            raise ProcessFailed(f"{running.name} exited early:\n{log_tail(running)}")
        if _accepts(port):
            return
        time.sleep(READY_POLL_SECONDS)
    raise ProcessFailed(f"{running.name} not listening after {timeout:.0f}s:\n{log_tail(running)}")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def ensure_alive(running: Running) -> None:
    if not running.is_alive():
        code = running.popen.returncode
        raise ProcessFailed(f"{running.name} died (exit {code}):\n{log_tail(running)}")


def log_tail(running: Running) -> str:
    try:
        lines = running.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join(f"  {line}" for line in lines[-LOG_TAIL_LINES:]) or "  (empty log)"
