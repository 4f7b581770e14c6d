"""Worker processes: N data planes on one port, and one supervisor that decides for them all.

`canary-proxy run --workers N` (or `workers:` in the config) starts a supervisor and N workers
(proxy/control/worker.py), each talking to it over its own channel (proxy/control/channel.py);
docs/architecture.md ("Worker processes") draws it, docs/operations.md says how to run it.

- **Supervisor** (the process started): the control plane. It owns the config and reloads,
  the admin API and `/metrics`, `state_dir`, and the only rollout `Controller` that decides:
  the guard's windows, the ramp, the admin verbs. It serves no traffic. It restarts a worker
  that dies (with a back-off when one keeps dying) and passes SIGTERM on to every worker.
- **Workers**: the data plane. Each one listens on the same address with SO_REUSEPORT and
  routes with the weights its supervisor sent; its controller is a follower.
- **Watchdog.** A ready worker silent for SILENCE_SECONDS (stopped, or its loop blocked) is
  killed and started again; a worker that cannot start during the first start fails it at once.

**One guard.** A worker records each response into a `Tally` per guarded route and version;
a report carries what the tallies counted since the last one. The supervisor adds them to the
route's one `SlidingWindow`, so the verdict uses the traffic of every worker, and a report
with canary errors is assessed on arrival. A trip reaches every worker with the next
`States` message, in a millisecond or so. Tallies carry the route's window epoch: evidence
from before a retry or a new revision is dropped, as in a single process.

**One set of counters.** Reports carry the change in each route's counters since the last
report; the supervisor adds them to its recorder, which `/metrics` exposes, so totals are
never double counted and survive a worker's restart. The worker keeps those counters in a
block of memory shared with its supervisor (proxy/control/counters.py): when a worker has
gone, even by SIGKILL, the supervisor reads its block and adds what it counted after the last
report that arrived whole, so no count is lost either. What a killed worker loses is the
requests it had in flight (connections it had accepted but not yet taken are reset by the
kernel), and the guard's evidence from its last report interval: the windows judge a rate,
and the counts it missed are in `/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Final

from proxy.control.channel import (
    Configure,
    Draining,
    Message,
    Ready,
    Report,
    States,
    Sync,
    Synced,
    UnknownMessage,
    receive,
    send,
)
from proxy.control.controller import RouteStates
from proxy.control.counters import create_block, read_block, unreported
from proxy.control.holder import RuntimeHolder
from proxy.core.config import Address
from proxy.core.window import TallyCounts
from proxy.dataplane.outcomes import VersionStats

log = logging.getLogger("canary_proxy")

START_TIMEOUT_SECONDS: Final = 30.0
# A worker that dies is started again after a pause that doubles while it keeps dying.
FIRST_BACKOFF_SECONDS: Final = 0.1
MAX_BACKOFF_SECONDS: Final = 5.0
STABLE_UPTIME_SECONDS: Final = 10.0  # alive this long: the next death starts from the first pause
# A ready worker that has not reported for this long is stuck (stopped, or its loop blocked):
# it is killed and started again rather than left holding its share of new connections.
SILENCE_SECONDS: Final = 2.0
# How long an admin answer waits for the workers to confirm a change (then it is logged; a
# worker that stays silent is the watchdog's).
SETTLE_SECONDS: Final = 1.0


def worker_count(workers: int | str) -> int:
    if workers == "auto":
        # The CPUs this process may run on (a container's or taskset's), not the host's.
        return len(os.sched_getaffinity(0)) or 1
    assert isinstance(workers, int)
    return workers


class Backoff:
    """The pause before starting a worker that died: FIRST_BACKOFF_SECONDS, doubling while it
    keeps dying, up to MAX_BACKOFF_SECONDS; one that had lived STABLE_UPTIME_SECONDS starts
    from the first pause again."""

    def __init__(self) -> None:
        self._next = FIRST_BACKOFF_SECONDS

    def pause(self, uptime: float) -> float:
        if uptime >= STABLE_UPTIME_SECONDS:
            self._next = FIRST_BACKOFF_SECONDS
        pause = self._next
        self._next = min(pause * 2, MAX_BACKOFF_SECONDS)
        return pause


@dataclass(slots=True)
class WorkerHandle:
    """The supervisor's view of one worker slot."""

    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    pid: int | None = None
    connections: int = 0
    requests: int = 0  # responses this slot's processes reported, over all its restarts
    restarts: int = 0
    started_at: float = 0.0
    heard_at: float = 0.0  # the loop time of its last message
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # What the current process's reports brought, per slot of its shared block, and rejected
    # requests: what it counted beyond that is recovered from the block once it has gone.
    reported: dict[int, VersionStats] = field(default_factory=dict)
    reported_rejected: dict[int, int] = field(default_factory=dict)
    # `WorkerPool.settled` calls waiting for this worker, by sync number.
    syncs: dict[int, asyncio.Future[None]] = field(default_factory=dict)

    def synced(self, number: int) -> None:
        """It applies everything sent before sync `number` (or it has gone: its replacement
        starts from the supervisor's config and states as they are then)."""
        for waiting in [n for n in self.syncs if n <= number]:
            future = self.syncs.pop(waiting)
            if not future.done():
                future.set_result(None)

    def took(self, report: Report) -> None:
        for _, _, slot, delta in report.stats:
            if slot >= 0:
                self.reported.setdefault(slot, VersionStats()).add(delta)
            self.requests += sum(delta[0].values())
        for code, n in report.rejected.items():
            self.reported_rejected[code] = self.reported_rejected.get(code, 0) + n

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "pid": self.pid,
            "ready": self.ready.is_set(),
            "connections": self.connections,
            "requests": self.requests,
            "restarts": self.restarts,
        }


class WorkerPool:
    """Starts, feeds, hears from and restarts the workers (in the supervisor)."""

    def __init__(self, holder: RuntimeHolder, count: int) -> None:
        self.holder = holder
        self.count = count
        self.loop = asyncio.get_running_loop()
        self.workers = [WorkerHandle(index) for index in range(count)]
        self.listen: Address | None = None
        self.stopping = False
        self._placeholder: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._states_pending: asyncio.Handle | None = None
        self._syncs = 0
        # Set if a worker dies before the first start is complete: fail fast, don't retry.
        self._start_failed: asyncio.Future[str] | None = None

    async def start(self, listen: Address) -> tuple[str, int]:
        self.listen = self._reserve(listen)
        self._start_failed = self.loop.create_future()
        self._tasks = [self.loop.create_task(self._keep_running(w)) for w in self.workers]
        self._tasks.append(self.loop.create_task(self._watch()))
        all_ready = asyncio.ensure_future(
            asyncio.gather(*(worker.ready.wait() for worker in self.workers))
        )
        try:
            done, _ = await asyncio.wait(
                (all_ready, self._start_failed),
                timeout=START_TIMEOUT_SECONDS,
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            all_ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await all_ready
            raise
        failed = self._start_failed
        self._start_failed = None
        if all_ready not in done:
            all_ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await all_ready
            why = failed.result() if failed.done() else f"not within {START_TIMEOUT_SECONDS:g}s"
            await self.stop(0.0)
            raise RuntimeError(f"workers did not start listening on {self.listen}: {why}")
        failed.cancel()
        return self.listen.host, self.listen.port

    def _reserve(self, listen: Address) -> Address:
        """Port 0 means "any": bind one socket (never listening, so the kernel gives it no
        connections) to learn the port every worker then binds, and keep it bound so a
        restarted worker finds the same port free."""
        if listen.port != 0:
            return listen
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        placeholder = socket.socket(family, socket.SOCK_STREAM)
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        placeholder.bind((listen.host, 0))
        self._placeholder = placeholder
        return Address(host=listen.host, port=int(placeholder.getsockname()[1]))

    async def _keep_running(self, worker: WorkerHandle) -> None:
        backoff = Backoff()
        while not self.stopping:
            try:
                code: int | None = await self._run_once(worker)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a slot must never stop being kept
                log.error(
                    "worker %d: %s", worker.index, error, exc_info=not isinstance(error, OSError)
                )
                code = None
            if self.stopping:
                return
            starting = self._start_failed
            if starting is not None and not starting.done() and not worker.ready.is_set():
                starting.set_result(f"worker {worker.index} exited with {_exit_text(code)}")
                return
            worker.restarts += 1
            pause = backoff.pause(uptime=self.loop.time() - worker.started_at)
            log.error(
                "worker %d (pid %s) exited with %s; starting it again in %.1fs",
                worker.index,
                worker.pid,
                _exit_text(code),
                pause,
            )
            await asyncio.sleep(pause)

    async def _run_once(self, worker: WorkerHandle) -> int | None:
        worker.started_at = self.loop.time()  # a start that fails at once has lived 0 s
        counters = create_block()
        try:
            return await self._run_process(worker, counters)
        finally:
            os.close(counters)

    async def _run_process(self, worker: WorkerHandle, counters: int) -> int | None:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the working directory's `proxy`, whatever is there
                "-m",
                "proxy",
                "worker",
                "--fd",
                str(theirs.fileno()),
                "--counters-fd",
                str(counters),
                pass_fds=(theirs.fileno(), counters),
                stdin=asyncio.subprocess.DEVNULL,
                # Out of the terminal's process group: a Ctrl-C or hang-up goes to the
                # supervisor alone, which decides (and passes SIGTERM on), even while a worker
                # is still starting.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker.process, worker.writer, worker.pid = process, writer, process.pid
        worker.reported, worker.reported_rejected = {}, {}
        worker.ready.clear()
        assert self.listen is not None
        send(writer, self._configure())
        worker.heard_at = self.loop.time()
        while True:
            try:
                message = await receive(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the worker has gone
            except UnknownMessage as error:  # read whole: the next frame is still in step
                log.error("worker %d sent an unknown message: %s", worker.index, error)
                continue
            except Exception:  # a frame we cannot read: the channel is out of step
                log.exception("worker %d sent what cannot be read; restarting it", worker.index)
                _kill(process)
                break
            worker.heard_at = self.loop.time()
            try:
                self._heard(worker, message)
            except Exception:  # a bug in adding one report must not cost the worker
                log.exception("worker %d: cannot take its message", worker.index)
        worker.writer = None
        worker.connections = 0
        worker.ready.clear()
        worker.synced(self._syncs)  # gone: nothing to wait for
        writer.close()
        code = await process.wait()
        self.recover(worker, counters)
        return code

    def recover(self, worker: WorkerHandle, counters: int) -> None:
        """Add what a worker that has gone counted after its last report that arrived whole
        (nothing, if it exited on its own: its last report had it all)."""
        try:
            stats, rejected = unreported(
                read_block(counters), worker.reported, worker.reported_rejected
            )
        except (OSError, ValueError) as error:
            log.error("worker %d: cannot read its counters: %s", worker.index, error)
            return
        if stats or rejected:
            self.take(worker, Report(stats=stats, rejected=rejected, tallies=[], connections=0))
            log.info(
                "worker %d (pid %s): recovered %d responses and %d rejected requests it "
                "counted after its last report",
                worker.index,
                worker.pid,
                sum(sum(delta[0].values()) for _, _, _, delta in stats),
                sum(rejected.values()),
            )

    async def _watch(self) -> None:
        """Kill a ready worker that has stopped reporting (it then restarts like any other)."""
        while True:
            await asyncio.sleep(SILENCE_SECONDS / 4)
            now = self.loop.time()
            for worker in self.workers:
                if worker.ready.is_set() and now - worker.heard_at > SILENCE_SECONDS:
                    log.error(
                        "worker %d (pid %s) has not reported for %.1fs; killing it",
                        worker.index,
                        worker.pid,
                        now - worker.heard_at,
                    )
                    worker.ready.clear()
                    if worker.process is not None:
                        _kill(worker.process)

    def _heard(self, worker: WorkerHandle, message: Message) -> None:
        match message:
            case Report() as report:
                self.take(worker, report)
            case Ready():
                worker.ready.set()
            case Synced(number=number):
                worker.synced(number)
            case Draining():  # it serves what it has in flight, then exits
                worker.ready.clear()
                worker.synced(self._syncs)
            case _:  # one for a worker
                log.error(
                    "worker %d sent an unknown message: %s", worker.index, type(message).__name__
                )

    def take(self, worker: WorkerHandle, report: Report) -> None:
        """A worker's report: its counts join the supervisor's and are marked as brought (so
        recovery never adds them again, even if judging them fails), then the guard's part."""
        self.add_counts(report)
        worker.took(report)
        worker.connections = report.connections
        self.add_tallies(report)

    def add_counts(self, report: Report) -> None:
        """A worker's counts join the supervisor's recorder, which `/metrics` exposes."""
        holder = self.holder
        routes = holder.current.routes
        for route, version, _, delta in report.stats:
            if route in routes:  # a route a reload removed has no series any more
                holder.outcomes.stats_for(route, version).add(delta)
        holder.outcomes.add_rejected(report.rejected)

    def add_tallies(self, report: Report) -> None:
        """A worker's tallies join the guard's windows; canary errors are judged at once."""
        controller = self.holder.controller
        judge: set[str] = set()
        for route, epoch, canary, requests, errors, buckets in report.tallies:
            controller.add_tally(route, epoch, canary, _counts(requests, errors, buckets))
            if canary and errors:
                judge.add(route)
        for route in judge:
            controller.assess_route(route)

    # -- telling the workers -------------------------------------------------------------------

    def _states(self) -> RouteStates:
        return self.holder.controller.route_states()

    def states_changed(self) -> None:
        """The controller decided something: every worker hears of it (coalesced, so one
        burst of decisions is one message)."""
        if self._states_pending is None:
            self._states_pending = self.loop.call_soon(self._send_states)

    def _send_states(self) -> None:
        self._states_pending = None
        self._broadcast(States(states=self._states()))

    async def settled(self) -> None:
        """Return once every ready worker applies every config and decision sent so far (the
        admin API answers after this), or after SETTLE_SECONDS, logging who was late."""
        if self._states_pending is not None:  # decided in this turn of the loop: send it now
            self._states_pending.cancel()
            self._send_states()
        self._syncs += 1
        number = self._syncs
        waiting: dict[int, asyncio.Future[None]] = {}
        for worker in self.workers:
            writer = worker.writer
            if worker.ready.is_set() and writer is not None and not writer.is_closing():
                waiting[worker.index] = worker.syncs[number] = self.loop.create_future()
                send(writer, Sync(number=number))
        if not waiting:
            return
        await asyncio.wait(waiting.values(), timeout=SETTLE_SECONDS)
        late = [index for index, future in waiting.items() if not future.done()]
        for index in late:
            self.workers[index].syncs.pop(number, None)
        if late:
            log.warning(
                "worker%s %s did not confirm the change within %gs",
                "s" if len(late) > 1 else "",
                ", ".join(map(str, late)),
                SETTLE_SECONDS,
            )

    def config_changed(self) -> None:
        self._broadcast(self._configure())

    def _configure(self) -> Configure:
        return Configure(
            config=self.holder.current.config, states=self._states(), listen=self.listen
        )

    def _broadcast(self, message: Message) -> None:
        for worker in self.workers:
            if worker.writer is not None and not worker.writer.is_closing():
                send(worker.writer, message)

    # -- views and stopping --------------------------------------------------------------------

    def connections(self) -> int:
        return sum(worker.connections for worker in self.workers)

    def status(self) -> list[dict[str, object]]:
        return [worker.as_dict() for worker in self.workers]

    async def stop(self, drain_seconds: float) -> None:
        """SIGTERM every worker (each drains for up to `drain_seconds`), wait, then SIGKILL
        what is left."""
        self.stopping = True
        processes = [w.process for w in self.workers if w.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        waiting = [asyncio.ensure_future(process.wait()) for process in processes]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=drain_seconds + 5.0)
            for process in processes:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if late:
                await asyncio.wait(late)
        for worker in self.workers:  # one that was being started meanwhile
            if worker.process is not None and worker.process not in processes:
                _kill(worker.process)
                await worker.process.wait()
        # Each slot's task ends by itself once its process has: it reads the last report and
        # recovers what the worker counted after it. Cancelled only if that takes too long.
        slots = self._tasks[: len(self.workers)]
        if slots:
            await asyncio.wait(slots, timeout=SETTLE_SECONDS)
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # stopping must finish whatever a slot's task ran into
                log.exception("a worker task failed")
        if self._placeholder is not None:
            self._placeholder.close()


def _counts(requests: int, errors: int, buckets: tuple[tuple[int, int], ...]) -> TallyCounts:
    return TallyCounts(requests=requests, errors=errors, buckets=buckets)


def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
