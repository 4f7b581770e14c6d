"""Shell: start pinned processes in their own process group, wait for them, always stop them.

Each process is registered on an `ExitStack` as it starts, so leaving the `with` block — at the
end, on an error or on Ctrl-C — stops every process group that was started, newest first.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final

import toolchain

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
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


def guarded_main(
    run: Callable[[], int], *, prog: str, failures: tuple[type[Exception], ...]
) -> int:
    """A benchmark command's body: SIGINT and SIGTERM unwind through its ExitStacks, which
    stop every process it started; a missing tool exits 2, one of `failures` 1, Ctrl-C 130."""
    # SIGINT is set explicitly because a shell starts background jobs with it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    handled: tuple[type[Exception], ...] = (ProcessFailed, subprocess.SubprocessError, *failures)
    try:
        return run()
    except toolchain.MissingTools as missing:
        print(f"{prog}: {missing}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; every process it started is stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except handled as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILED


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def free_port() -> int:
    """A loopback port that was free a moment ago (bound with port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pinned(cpus: int | Sequence[int], argv: Sequence[str]) -> list[str]:
    """`argv` run under `taskset`, so it and every child it forks stay on those cores."""
    return ["taskset", "-c", cpu_list(cpus), *argv]


def cpu_list(cpus: int | Sequence[int]) -> str:
    """taskset's spelling of a set of cores: `1`, `0,1`."""
    return str(cpus) if isinstance(cpus, int) else ",".join(str(cpu) for cpu in sorted(cpus))


def pin_self(cpu: int) -> set[int]:
    """Pin this process (when it is the client side) to `cpu`; returns the affinity to restore."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    return before


def launch(
    stack: ExitStack, *, name: str, argv: Sequence[str], cpu: int | Sequence[int], log_path: Path
) -> Running:
    """Start `argv` pinned to `cpu` (one core or several) in a new session; the stack stops
    it, and every process of its group, on exit."""
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
    """SIGTERM the whole process group, then SIGKILL whatever outlives the grace period.

    The family is the leader's group (nginx's workers) and the leader's descendants in
    sessions of their own (canary-proxy's worker processes, which the supervisor stops on
    SIGTERM). Returns once none of it is left, so the next target never shares the cores with
    a straggler.
    """
    pgid = running.popen.pid
    family = group_pids(pgid)  # now: once the leader is gone, its children are init's
    _signal_group(pgid, signal.SIGTERM)
    try:
        running.popen.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)
        running.popen.wait(timeout=STOP_GRACE_SECONDS)
    # The leader may be gone while a child lingers (a worker still draining): SIGKILL the
    # family, and wait until the kernel has reaped the last of it.
    _signal_group(pgid, signal.SIGKILL)
    for pid in family:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while (left := sorted(set(group_pids(pgid)) | _alive(family))) and (
        time.monotonic() < deadline
    ):
        time.sleep(READY_POLL_SECONDS)
    if left:  # only a process stuck in the kernel (state D) survives SIGKILL that long
        print(f"bench: warning: {running.name}: pids {left} outlived SIGKILL", file=sys.stderr)


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


def wait_for_line(running: Running, pattern: re.Pattern[str], *, timeout: float) -> str:
    """Return the first line of the process's log matching `pattern`, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find_line(running, pattern)
        if found is not None:
            return found
        if not running.is_alive():
            raise ProcessFailed(f"{running.name} exited early:\n{log_tail(running)}")
        time.sleep(READY_POLL_SECONDS)
    raise ProcessFailed(
        f"{running.name} never logged {pattern.pattern!r} within {timeout:.0f}s:\n"
        f"{log_tail(running)}"
    )


def find_line(running: Running, pattern: re.Pattern[str]) -> str | None:
    try:
        text = running.log_path.read_text(errors="replace")
    except OSError:
        return None
    return next((line for line in text.splitlines() if pattern.search(line)), None)


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


# --- a target's processes: their memory and CPU time -------------------------------------

_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def group_pids(pgid: int) -> list[int]:
    """A target's processes, by pid: those of group `pgid` (its leader's: nginx's workers)
    and the leader's descendants in sessions of their own (canary-proxy's workers); zombies
    (exited, not yet reaped) left out."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            stats[int(entry.name)] = fields
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    family = {pid for pid, fields in stats.items() if int(fields[2]) == pgid}
    below = [pgid]
    while below:
        for child in children.get(below.pop(), []):
            if child not in family:
                family.add(child)
                below.append(child)
    return sorted(pid for pid in family if stats[pid][0] != "Z")


def _alive(pids: list[int]) -> set[int]:
    return {pid for pid in pids if (fields := _stat_fields(pid)) is not None and fields[0] != "Z"}


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after "pid (comm) ": state ppid pgrp ... (field 3 of proc(5) first)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # gone meanwhile
    return stat[stat.rfind(")") + 2 :].split()


def group_cpu_seconds(pgid: int) -> dict[int, float]:
    """CPU time (user + system) each process of the group has used so far, in seconds."""
    used = {}
    for pid in group_pids(pgid):
        fields = _stat_fields(pid)
        if fields is not None:  # utime and stime are proc(5) fields 14 and 15
            used[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return used
