"""A worker process (`python -m proxy worker`, started by its supervisor): one data plane.

It listens on its supervisor's address with SO_REUSEPORT, so the kernel spreads new
connections over the workers, and routes with the weights its supervisor sent. Its controller
is a follower: it decides nothing and persists nothing. It runs in its own session (a
terminal's Ctrl-C reaches only the supervisor) and is started with `-P` (never a `proxy` module
from the working directory); proxy/control/supervisor.py is the other side, and
proxy/control/channel.py what the two say to each other.

A worker records each response into a `Tally` per guarded route and version; a report carries
what the tallies counted since the last one, and the change in each route's counters, which it
keeps in a block of memory shared with its supervisor (proxy/control/counters.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Final

from proxy.control.channel import (
    ChannelError,
    Configure,
    Counters,
    Draining,
    Message,
    Ready,
    Report,
    States,
    Sync,
    Synced,
    Tallied,
    receive,
    send,
)
from proxy.control.controller import RouteStates
from proxy.control.counters import SharedCounters
from proxy.control.holder import RuntimeHolder
from proxy.core.config import Address, Config
from proxy.core.window import Tally
from proxy.dataplane.outcomes import CounterMemory, Recorder, VersionStats
from proxy.dataplane.server import Server

log = logging.getLogger("canary_proxy")

REPORT_SECONDS: Final = 0.05
# A canary error is reported at once, but not more often than this: a canary failing at
# thousands of requests per second (say, under a guard that only observes) must not turn into
# thousands of reports.
MIN_REPORT_GAP_SECONDS: Final = 0.005


class Worker:
    """One data plane process: serves, follows its supervisor, reports what it counted."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: Config,
        memory: CounterMemory | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.holder = RuntimeHolder(config, follower=True, recorder=Recorder(memory))
        self.holder.controller.on_canary_error = self._report_soon
        self.server = Server(self.holder.plane, self.loop)
        # Per series: the stats object last reported on, and a copy of it as it was then.
        self._sent: dict[tuple[str, str], tuple[VersionStats, VersionStats]] = {}
        self._sent_rejected: dict[int, int] = {}
        self._report_pending = False
        self._reported_at = 0.0
        self.stopping = asyncio.Event()

    async def serve(self, states: RouteStates, listen: Address) -> None:
        self.holder.controller.follow(states)
        await self.server.start(listen.host, listen.port, reuse_port=True)
        send(self.writer, Ready(pid=os.getpid()))
        for signum in (signal.SIGINT, signal.SIGHUP):
            # A terminal's Ctrl-C or hang-up reaches the whole process group: the supervisor
            # decides, and passes SIGTERM on.
            self.loop.add_signal_handler(signum, lambda: None)
        self.loop.add_signal_handler(signal.SIGTERM, self.drain)
        listening = self.loop.create_task(self._listen())
        reporting = self.loop.create_task(self._report_forever())
        await self.stopping.wait()
        # Still listening and reporting while in-flight requests drain: a guard decision
        # reaches this worker, and the supervisor sees what the drain counted.
        await self.server.shutdown(self.holder.current.config.timeouts.shutdown)
        for task in (listening, reporting):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._report()  # the last counts, after the drain
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        self.writer.close()

    def drain(self) -> None:
        """Stop taking connections, finish what is in flight, then exit. The supervisor hears
        of it first: this worker is no longer ready, and no change waits for it."""
        if not self.stopping.is_set():
            self.stopping.set()
            if not self.writer.is_closing():
                send(self.writer, Draining())

    async def _listen(self) -> None:
        while True:
            try:
                message = await receive(self.reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                log.error("worker %d: the supervisor has gone; draining and stopping", os.getpid())
                self.stopping.set()
                return
            except ChannelError as error:  # read whole: the next frame is still in step
                log.error(
                    "worker %d: cannot read a message from the supervisor: %s", os.getpid(), error
                )
                continue
            try:
                self.apply(message)
            except Exception:  # one bad message must not stop this worker following for good
                log.exception("worker %d: cannot apply a message from the supervisor", os.getpid())

    def apply(self, message: Message) -> None:
        match message:
            case Configure(config=config, states=states):
                try:
                    self.holder.swap(config)
                except Exception:
                    # The supervisor built this config already, so this is this process's
                    # trouble. Serving the old config would split the fleet: drain instead,
                    # and the supervisor starts this worker again, on the config it has now.
                    log.exception(
                        "worker %d: cannot apply the new config; draining, to be started again",
                        os.getpid(),
                    )
                    self.drain()
                    return
                self.holder.controller.follow(states)
            case States(states=states):
                self.holder.controller.follow(states)
            case Sync(number=number):
                send(self.writer, Synced(number=number))
            case _:  # one for the supervisor
                log.error(
                    "worker %d: unknown message from the supervisor: %s",
                    os.getpid(),
                    type(message).__name__,
                )

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            self._report()

    def _report_soon(self) -> None:
        if not self._report_pending:
            self._report_pending = True
            wait = self._reported_at + MIN_REPORT_GAP_SECONDS - self.loop.time()
            self.loop.call_later(max(0.0, wait), self._report)

    def _report(self) -> None:
        self._report_pending = False
        self._reported_at = self.loop.time()
        if self.writer.is_closing():
            return
        send(self.writer, self.collect())

    def collect(self) -> Report:
        """The counters' change since the previous report, and the drained tallies."""
        recorder = self.holder.outcomes
        stats: list[Counters] = []
        sent: dict[tuple[str, str], tuple[VersionStats, VersionStats]] = {}
        for route, version, current in recorder.series():
            was = self._sent.get((route, version))
            # A series the config dropped and brought back (even between two reports) is a
            # new object that starts from zero.
            before = was[1] if was is not None and was[0] is current else VersionStats()
            delta = current.since(before)
            if delta is not None:
                stats.append((route, version, current.slot, delta))
            sent[(route, version)] = (current, current.copy() if delta is not None else before)
        self._sent = sent
        rejected = recorder.rejected_since(self._sent_rejected)
        self._sent_rejected = dict(recorder.rejected)
        tallies: list[Tallied] = []
        for name, live in self.holder.controller.live.items():
            for canary, evidence in ((False, live.stable_evidence), (True, live.canary_evidence)):
                if isinstance(evidence, Tally) and (counts := evidence.drain()) is not None:
                    tallies.append(
                        (name, live.epoch, canary, counts.requests, counts.errors, counts.buckets)
                    )
        return Report(
            stats=stats,
            rejected=rejected,
            tallies=tallies,
            connections=len(self.server.connections),
        )


async def run_worker(fd: int, counters_fd: int) -> None:
    """The `worker` command: talk to the supervisor over the inherited socket `fd`, and keep
    the counters in the shared block `counters_fd`."""
    memory = SharedCounters(counters_fd)
    channel = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=channel)
    match await receive(reader):
        case Configure(config=config, states=states, listen=Address() as listen):
            pass
        case _:
            raise RuntimeError("the supervisor's first message must be the config")
    worker = Worker(reader, writer, config, memory)
    await worker.serve(states, listen)
