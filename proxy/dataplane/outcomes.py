"""The recorder: per route and version outcome counts with domain verbs.

The hot path only bumps plain ints on a `VersionStats` that the route's runtime holds directly
(pre-bound: no label lookup, no lock, no allocation per request); `control.exposition` turns
them into metric families at scrape time. Stats are keyed by route name and version and outlive
config generations, so a reload never resets or double-counts a counter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Final, Protocol

from proxy.core.vocabulary import (
    GUARD_ACTIONS,
    ROLLBACK_REASONS,
    UPSTREAM_ERROR_KINDS,
    RollbackReason,
)

# Edge-proxy latencies: sub-millisecond cache hits up to minute-long streams (seconds).
# A list, read by `_bucket`: compiled, a fixed-size tuple of floats is a C struct that would be
# boxed into a new 16-float tuple at every use (about 0.3 us a request).
_BOUNDS: Final[list[float]] = [
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
]
DURATION_BUCKETS: Final[tuple[float, ...]] = tuple(_BOUNDS)


def _bucket(duration: float) -> int:
    """`bisect_left(DURATION_BUCKETS, duration)`, in native code: the first bound >= duration
    (Prometheus `le`), or len(DURATION_BUCKETS) for +Inf."""
    bounds = _BOUNDS
    low = 0
    high = len(bounds)
    while low < high:
        middle = (low + high) >> 1
        if bounds[middle] < duration:
            low = middle + 1
        else:
            high = middle
    return low


# One version's counters are 64-bit words in one flat block of memory: private to the process,
# or (in a worker) shared with its supervisor, which can then read the counts of a worker that
# was killed (proxy/counters.py). Status codes index the block directly: llhttp parses at
# most three digits, and the proxy's own codes (499, 5xx) are three digits too.
# (Literal offsets: compiled, they are constants on the hot path; a unit test checks them.)
CODE_SLOTS: Final = 1000
_BUCKETS_AT: Final = 1000  # DURATION_BUCKETS, then +Inf
_ERRORS_AT: Final = 1017  # UPSTREAM_ERROR_KINDS
_SUM_AT: Final = 1021  # the duration sum, a float64
SERIES_WORDS: Final = 1024  # room to spare, and two pages exactly
SERIES_BYTES: Final = SERIES_WORDS * 8
REJECTED_BYTES: Final = CODE_SLOTS * 8
_CODES_BLOCK: Final = 50  # `since` compares the codes in blocks of this many (divides 1000)
_ERROR_INDEX: Final = {"connect": 1017, "timeout": 1018, "reset": 1019, "protocol": 1020}


class VersionStats:
    """Cumulative outcomes of one version of one route.

    `slot` is where the counters sit in a worker's shared block (-1: private memory)."""

    __slots__ = ("_sum", "counts", "slot")

    def __init__(self, memory: memoryview | None = None, slot: int = -1) -> None:
        if memory is None:
            memory = memoryview(bytearray(SERIES_BYTES))
        self.counts = memory.cast("q")
        self._sum = memory[_SUM_AT * 8 : _SUM_AT * 8 + 8].cast("d")
        self.slot = slot

    def observe(self, status: int, duration: float) -> None:
        counts = self.counts
        counts[status] += 1
        counts[_BUCKETS_AT + _bucket(duration)] += 1
        self._sum[0] += duration

    def upstream_error(self, kind: str) -> None:
        self.counts[_ERROR_INDEX[kind]] += 1

    # -- views ----------------------------------------------------------------------------

    @property
    def codes(self) -> dict[int, int]:
        """Responses by status code, the codes seen only."""
        return {code: n for code, n in enumerate(self.counts[:CODE_SLOTS].tolist()) if n}

    @property
    def buckets(self) -> list[int]:
        """Responses by duration bucket (not cumulative); the last one is +Inf."""
        return self.counts[_BUCKETS_AT:_ERRORS_AT].tolist()

    @property
    def duration_sum(self) -> float:
        return float(self._sum[0])

    @property
    def upstream_errors(self) -> dict[str, int]:
        return dict(
            zip(UPSTREAM_ERROR_KINDS, self.counts[_ERRORS_AT:_SUM_AT].tolist(), strict=True)
        )

    @property
    def requests(self) -> int:
        return sum(self.counts[:CODE_SLOTS].tolist())

    # -- across processes: a worker reports what changed, its supervisor adds it up ----------

    def copy(self) -> VersionStats:
        return VersionStats(memoryview(bytearray(self.counts)))

    def since(self, before: VersionStats) -> StatsDelta | None:
        """What was counted after `before` (a copy taken earlier), or None if nothing was.

        A worker asks this of every series 20 times a second: an unchanged series costs one
        comparison of bytes, a changed one a scan of the codes blocks that differ."""
        now_raw = self.counts.tobytes()
        then_raw = before.counts.tobytes()
        if now_raw == then_raw:
            return None
        now, then = self.counts, before.counts
        codes: dict[int, int] = {}
        for start in range(0, CODE_SLOTS, _CODES_BLOCK):
            end = start + _CODES_BLOCK
            if now_raw[start * 8 : end * 8] != then_raw[start * 8 : end * 8]:
                for code in range(start, end):
                    if now[code] != then[code]:
                        codes[code] = now[code] - then[code]
        errors = {
            kind: now[at] - then[at] for kind, at in _ERROR_INDEX.items() if now[at] != then[at]
        }
        buckets = [now[at] - then[at] for at in range(_BUCKETS_AT, _ERRORS_AT)]
        return codes, buckets, self.duration_sum - before.duration_sum, errors

    def add(self, delta: StatsDelta) -> None:
        codes, buckets, duration_sum, errors = delta
        counts = self.counts
        for code, n in codes.items():
            counts[code] += n
        for index, n in enumerate(buckets):
            counts[_BUCKETS_AT + index] += n
        self._sum[0] += duration_sum
        for kind, n in errors.items():
            counts[_ERROR_INDEX[kind]] += n


def counts_since(now: Mapping[int, int], before: Mapping[int, int]) -> dict[int, int]:
    """The counts that changed since `before` (earlier cumulative counts), by how much."""
    return {key: n - before.get(key, 0) for key, n in now.items() if n != before.get(key, 0)}


# A worker's report of one version's stats (plain builtins: it crosses a process boundary):
# status code counts, duration bucket counts, duration sum, upstream errors by kind.
StatsDelta = tuple[dict[int, int], list[int], float, dict[str, int]]


class CounterMemory(Protocol):
    """Where a recorder keeps its counters (`PrivateMemory`, or a worker's shared block)."""

    def rejected(self) -> memoryview:
        """REJECTED_BYTES of zeroes."""

    def series(self, route: str, version: str) -> tuple[int, memoryview]:
        """SERIES_BYTES of zeroes for a new series, and their slot (-1 if not shared)."""

    def retire(self, slot: int) -> None:
        """The series in `slot` was dropped: what it counts from now on counts for nothing."""


class PrivateMemory:
    """This process's own memory."""

    def rejected(self) -> memoryview:
        return memoryview(bytearray(REJECTED_BYTES))

    def series(self, route: str, version: str) -> tuple[int, memoryview]:
        return -1, memoryview(bytearray(SERIES_BYTES))

    def retire(self, slot: int) -> None:
        pass


class Recorder:
    """Everything the proxy counts, with verbs named after what happened."""

    def __init__(self, memory: CounterMemory | None = None) -> None:
        self._memory: CounterMemory = memory or PrivateMemory()
        self._stats: dict[tuple[str, str], VersionStats] = {}
        self._rejected = self._memory.rejected().cast("q")
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_successful = True
        self.rollbacks: dict[tuple[str, str], int] = {}
        self.breaches: dict[tuple[str, str], int] = {}
        # Live routes with a canary: their rollback and breach counters are exported from 0.
        self.canary_routes: frozenset[str] = frozenset()

    def stats_for(self, route: str, version: str) -> VersionStats:
        stats = self._stats.get((route, version))
        if stats is None:
            slot, memory = self._memory.series(route, version)
            stats = self._stats[(route, version)] = VersionStats(memory, slot)
        return stats

    def keep_routes(self, names: Iterable[str]) -> None:
        """Drop the series of routes a new config no longer has."""
        keep = set(names)
        for (route, _), stats in self._stats.items():
            if route not in keep and stats.slot >= 0:
                self._memory.retire(stats.slot)
        self._stats = {key: s for key, s in self._stats.items() if key[0] in keep}
        self.rollbacks = {key: n for key, n in self.rollbacks.items() if key[0] in keep}
        self.breaches = {key: n for key, n in self.breaches.items() if key[0] in keep}
        self.canary_routes = self.canary_routes & keep

    def set_canary_routes(self, names: Iterable[str]) -> None:
        """The live routes that have a canary (the controller's, at every config swap).

        Each gets every `reason` of `canary_proxy_rollbacks_total` and every `action` of
        `canary_proxy_guard_breaches_total` exported from 0, so that rate() and increase() see
        the first rollback or breach too (a series born at 1 looks like no increase).
        """
        self.canary_routes = frozenset(names)

    def record_rejected(self, status: int) -> None:
        self._rejected[status] += 1

    def rejected_since(self, before: Mapping[int, int]) -> dict[int, int]:
        return counts_since(self.rejected, before)

    def add_rejected(self, counts: dict[int, int]) -> None:
        rejected = self._rejected
        for code, n in counts.items():
            rejected[code] += n

    def reload_succeeded(self) -> None:
        self.reloads["success"] += 1
        self.last_reload_successful = True

    def reload_failed(self) -> None:
        self.reloads["failure"] += 1
        self.last_reload_successful = False

    def rolled_back(self, route: str, reason: RollbackReason) -> None:
        self.rollbacks[(route, reason)] = self.rollbacks.get((route, reason), 0) + 1

    def guard_breached(self, route: str, action: str) -> None:
        """A breach the guard acted on (`rollback`) or only recorded (`observe`)."""
        self.breaches[(route, action)] = self.breaches.get((route, action), 0) + 1

    # -- views (tests and the admin API read these) ----------------------------------------

    @property
    def requests(self) -> Counter[tuple[str, str, int]]:
        return Counter(
            {
                (route, version, code): n
                for (route, version), stats in self._stats.items()
                for code, n in stats.codes.items()
            }
        )

    @property
    def upstream_errors(self) -> Counter[tuple[str, str, str]]:
        return Counter(
            {
                (route, version, kind): n
                for (route, version), stats in self._stats.items()
                for kind, n in stats.upstream_errors.items()
                if n
            }
        )

    @property
    def rejected(self) -> Counter[int]:
        return Counter({code: n for code, n in enumerate(self._rejected.tolist()) if n})

    def rollback_series(self) -> list[tuple[tuple[str, str], int]]:
        """Every (route, reason) to export, sorted: those counted, and 0 for the rest of each
        canary route's reasons."""
        return _with_zeros(self.rollbacks, self.canary_routes, ROLLBACK_REASONS)

    def breach_series(self) -> list[tuple[tuple[str, str], int]]:
        """Every (route, action) to export, sorted, like `rollback_series`."""
        return _with_zeros(self.breaches, self.canary_routes, GUARD_ACTIONS)

    def series(self) -> Iterator[tuple[str, str, VersionStats]]:
        for (route, version), stats in sorted(self._stats.items()):
            yield route, version, stats


class RouteView:
    """What the collector needs to know about a live route, read at scrape time."""

    __slots__ = ("name", "state", "weight_bp")

    def __init__(self, name: str, weight_bp: int, state: str) -> None:
        self.name = name
        self.weight_bp = weight_bp
        self.state = state


def _with_zeros(
    counts: dict[tuple[str, str], int], routes: frozenset[str], values: tuple[str, ...]
) -> list[tuple[tuple[str, str], int]]:
    series = {(route, value): 0 for route in routes for value in values}
    series.update(counts)
    return sorted(series.items())
