"""The channel between a supervisor and one of its workers: the messages, and their framing.

Each worker has one Unix socket pair with its supervisor. A frame is a 4-byte big-endian
length, then that many bytes: one message, pickled. Pickle is the encoding because both ends
are the same program run by the same user, over a socket pair nobody else holds, and a config
is a deep tree of frozen dataclasses; what comes out is checked to be one of the messages
below, so a peer is never dispatched on anything else.

- supervisor -> worker: `Configure` first and after every reload; `States` after every
  decision (guard trip, ramp step, admin verb). `states` is `{route: (weight_bp, aborted,
  epoch)}`; a reload's swap and the states it comes with are applied in one step, so no
  request sees one without the other.
- worker -> supervisor: `Ready` once listening; a `Report` every REPORT_SECONDS, and at once
  (coalesced) when the worker records a canary error, and a last one when it exits on SIGTERM;
  `Draining` when it stops taking connections.
- `Sync(n)` -> `Synced(n)`: the channel is ordered and a worker applies messages in order, so
  its answer means it applies everything sent before. The admin API answers a reload or a verb
  only once every ready worker has synced (`WorkerPool.settled`): when `canary-proxy reload` or
  `set-weight` returns, the change is live on every worker.
"""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import dataclass
from typing import Final

from proxy.control.controller import RouteStates
from proxy.core.config import Address, Config
from proxy.dataplane.outcomes import StatsDelta

_FRAME_HEADER: Final = 4

Tallied = tuple[str, int, bool, int, int, tuple[tuple[int, int], ...]]
# route, epoch, canary?, requests, errors, latency buckets
Counters = tuple[str, str, int, StatsDelta]
# route, version, its slot in the worker's shared block (-1: none), what changed


# -- supervisor -> worker ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Configure:
    """The config to serve and the route states that go with it. `listen` is where a worker
    listens: the first message's is used, later ones leave the listening socket as it is."""

    config: Config
    states: RouteStates
    listen: Address | None


@dataclass(frozen=True, slots=True, kw_only=True)
class States:
    """The supervisor's decisions: every route's weight, abort and window epoch."""

    states: RouteStates


@dataclass(frozen=True, slots=True, kw_only=True)
class Sync:
    """Answer `Synced(number)` once everything sent before this is applied."""

    number: int


# -- worker -> supervisor ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """The worker `pid` listens."""

    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Draining:
    """The worker takes no new connections; it serves what it has in flight, then exits."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """What a worker counted since its previous report."""

    stats: list[Counters]
    rejected: dict[int, int]
    tallies: list[Tallied]
    connections: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Synced:
    """Everything sent before `Sync(number)` is applied."""

    number: int


ToWorker = Configure | States | Sync
ToSupervisor = Ready | Draining | Report | Synced
Message = ToWorker | ToSupervisor


class ChannelError(Exception):
    """A whole frame arrived that is not a message of this channel (the stream is still in
    step: the next frame can be read)."""


class UnknownMessage(ChannelError):
    """A frame that decodes, but to something that is not one of the channel's messages."""


def send(writer: asyncio.StreamWriter, message: Message) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(len(body).to_bytes(_FRAME_HEADER, "big") + body)


async def receive(reader: asyncio.StreamReader) -> Message:
    """The next message. asyncio.IncompleteReadError when the other side has gone (before or
    in the middle of a frame); ChannelError for a frame that is not a message."""
    size = int.from_bytes(await reader.readexactly(_FRAME_HEADER), "big")
    return decode(await reader.readexactly(size))


def decode(body: bytes) -> Message:
    try:
        # Unpickling is safe here: the only peer is our own program, over a private socket pair.
        message = pickle.loads(body)
    except Exception as error:
        raise ChannelError(
            f"a frame of {len(body)} bytes that cannot be decoded: {error!r}"
        ) from error
    if not isinstance(message, Message):
        raise UnknownMessage(f"a frame holding a {type(message).__qualname__}, not a message")
    return message
