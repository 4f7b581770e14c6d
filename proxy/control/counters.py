"""A worker's counters in memory its supervisor can still read after the worker has died.

A worker reports the change in its counters every 50 ms (proxy/control/worker.py), so a worker
killed with SIGKILL would take what it counted after its last report with it. Instead, its
recorder keeps every counter in a block of memory it shares with its supervisor: the supervisor
creates one anonymous shared file (a memfd) per worker process it starts and passes its
descriptor; the worker maps it, and `VersionStats` bump 64-bit words in it
(proxy/dataplane/outcomes.py). When a worker has gone, the supervisor reads the block once and
adds what the worker counted beyond the reports that reached it whole, so nothing is lost and
nothing is counted twice.

Layout (native 64-bit words: both sides run on one machine):

- header, one page: MAGIC, capacity (series slots), allocated (slots in use);
- rejected requests: one word per status code;
- names: `capacity` entries of NAME_BYTES, each a route and a version, length-prefixed UTF-8,
  and whether the series was dropped by a reload (its slot is then never recovered: what it
  counted after its last report, and what requests in flight added to it, count for nothing,
  as for a dropped series in one process);
- series: `capacity` slots of SERIES_BYTES (proxy/metrics.py lays a slot out).

The memfd is sparse: a slot costs memory once it is used. Only the worker writes the block,
and the supervisor reads it only after the worker has exited, so no lock is needed. A series
that finds the block full, or a name too long for its entry, gets private memory instead: it is
still reported every 50 ms, but not recovered after a SIGKILL (logged once).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from proxy.dataplane.outcomes import (
    REJECTED_BYTES,
    SERIES_BYTES,
    StatsDelta,
    VersionStats,
    counts_since,
)

log = logging.getLogger("canary_proxy")

MAGIC: Final = b"cpcount1"
_HEADER: Final = struct.Struct("=8sqq")  # magic, capacity, allocated
_ALLOCATED_AT: Final = 16
_PAGE: Final = 4096
_REJECTED_AT: Final = _PAGE
_NAMES_AT: Final = _REJECTED_AT + (REJECTED_BYTES + _PAGE - 1) // _PAGE * _PAGE
NAME_BYTES: Final = 256
# Route and version name lengths in bytes, and 1 once the series was dropped (retired).
NAME_HEADER: Final = struct.Struct("=HHB")
_RETIRED_AT: Final = 4
# Routes x 2 versions, over every reload of one worker's life (a dropped series keeps its slot).
DEFAULT_CAPACITY: Final = 1024


def _series_at(capacity: int) -> int:
    names_end = _NAMES_AT + capacity * NAME_BYTES
    return (names_end + _PAGE - 1) // _PAGE * _PAGE


def block_size(capacity: int) -> int:
    return _series_at(capacity) + capacity * SERIES_BYTES


def create_block(capacity: int = DEFAULT_CAPACITY) -> int:
    """A new zeroed block with its header (the supervisor, before starting a worker): its fd."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("canary-proxy-counters", os.MFD_CLOEXEC)
    else:  # not Linux: an unlinked temporary file serves too
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
    try:
        os.ftruncate(fd, block_size(capacity))
        os.pwrite(fd, _HEADER.pack(MAGIC, capacity, 0), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SharedCounters:
    """The worker's side: a `CounterMemory` (proxy/metrics.py) that hands out slots of the
    shared block."""

    def __init__(self, fd: int) -> None:
        try:
            size = os.fstat(fd).st_size
            if size < _PAGE:
                raise ValueError("not a fresh counter block")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)  # the mapping keeps the memory; the supervisor holds its own descriptor
        magic, capacity, allocated = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or size != block_size(capacity) or allocated != 0:
            raise ValueError("not a fresh counter block")
        self.capacity: int = capacity
        self._allocated = 0
        self._memory = memoryview(self._map)
        self._series_at = _series_at(capacity)
        self._warned = False

    def rejected(self) -> memoryview:
        return self._memory[_REJECTED_AT : _REJECTED_AT + REJECTED_BYTES]

    def series(self, route: str, version: str) -> tuple[int, memoryview]:
        name = _encode_name(route, version)
        slot = self._allocated
        if name is None or slot == self.capacity:
            if not self._warned:
                self._warned = True
                log.warning(
                    "worker %d: series %s/%s kept in private memory (%s); if this worker is "
                    "killed, what it counted after its last report is lost",
                    os.getpid(),
                    route,
                    version,
                    "name too long" if name is None else f"all {self.capacity} slots used",
                )
            return -1, memoryview(bytearray(SERIES_BYTES))
        entry = _NAMES_AT + slot * NAME_BYTES
        self._memory[entry : entry + len(name)] = name
        self._allocated = slot + 1
        # The count last: a slot is in use once it is named.
        struct.pack_into("=q", self._map, _ALLOCATED_AT, self._allocated)
        start = self._series_at + slot * SERIES_BYTES
        return slot, self._memory[start : start + SERIES_BYTES]

    def retire(self, slot: int) -> None:
        self._map[_NAMES_AT + slot * NAME_BYTES + _RETIRED_AT] = 1


def _encode_name(route: str, version: str) -> bytes | None:
    route_bytes, version_bytes = route.encode(), version.encode()
    name = NAME_HEADER.pack(len(route_bytes), len(version_bytes), 0) + route_bytes + version_bytes
    return name if len(name) <= NAME_BYTES else None


# -- the supervisor's side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counted:
    """Everything a worker's block held when the worker had gone (its live series)."""

    rejected: dict[int, int]
    series: list[tuple[int, str, str, VersionStats]]  # slot, route, version, counters


def read_block(fd: int) -> Counted:
    """Read a block whose worker has exited (a copy: the block can be closed after)."""
    header = os.pread(fd, _HEADER.size, 0)
    if len(header) < _HEADER.size:
        raise ValueError("not a counter block")
    magic, capacity, allocated = _HEADER.unpack(header)
    if magic != MAGIC or not 0 <= allocated <= capacity:
        raise ValueError("not a counter block")
    rejected_words = memoryview(os.pread(fd, REJECTED_BYTES, _REJECTED_AT)).cast("q")
    rejected = {code: n for code, n in enumerate(rejected_words.tolist()) if n}
    names = os.pread(fd, allocated * NAME_BYTES, _NAMES_AT)
    data = os.pread(fd, allocated * SERIES_BYTES, _series_at(capacity))
    series = []
    for slot in range(allocated):
        entry = slot * NAME_BYTES
        route_length, version_length, retired = NAME_HEADER.unpack_from(names, entry)
        if retired:
            continue
        at = entry + NAME_HEADER.size
        route = names[at : at + route_length].decode()
        version = names[at + route_length : at + route_length + version_length].decode()
        memory = memoryview(bytearray(data[slot * SERIES_BYTES : (slot + 1) * SERIES_BYTES]))
        series.append((slot, route, version, VersionStats(memory, slot)))
    return Counted(rejected, series)


def unreported(
    counted: Counted, reported: Mapping[int, VersionStats], reported_rejected: Mapping[int, int]
) -> tuple[list[tuple[str, str, int, StatsDelta]], dict[int, int]]:
    """What a gone worker counted beyond what its reports brought (`reported`: their sums per
    slot): per series, with its slot, and rejected requests by code."""
    stats = []
    for slot, route, version, final in counted.series:
        delta = final.since(reported.get(slot) or VersionStats())
        if delta is not None:
            stats.append((route, version, slot, delta))
    return stats, counts_since(counted.rejected, reported_rejected)
