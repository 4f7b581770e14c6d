"""A worker's counters in a block shared with its supervisor (proxy/counters.py): what the
worker counts there, the supervisor reads back whole after the worker has gone, and it can
tell what the worker's reports had not brought yet."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from proxy.control.counters import (
    NAME_BYTES,
    NAME_HEADER,
    SharedCounters,
    block_size,
    create_block,
    read_block,
    unreported,
)
from proxy.core.vocabulary import UPSTREAM_ERROR_KINDS
from proxy.dataplane.outcomes import DURATION_BUCKETS, SERIES_BYTES, Recorder, VersionStats


@pytest.fixture
def block() -> Iterator[int]:
    """The supervisor's descriptor of a fresh block."""
    fd = create_block(capacity=4)
    yield fd
    os.close(fd)


def worker_recorder(fd: int) -> Recorder:
    """A worker's recorder over the block (the worker gets its own descriptor, as by exec)."""
    return Recorder(SharedCounters(os.dup(fd)))


def test_what_a_worker_counts_the_supervisor_reads_back_whole(block: int) -> None:
    recorder = worker_recorder(block)
    stable = recorder.stats_for("shop", "stable")
    canary = recorder.stats_for("shop", "canary")
    stable.observe(200, 0.004)
    stable.observe(200, 0.3)
    canary.observe(503, 0.7)
    canary.observe(999, 0.001)  # the highest code llhttp can parse
    canary.upstream_error("timeout")
    recorder.record_rejected(400)
    recorder.record_rejected(400)
    recorder.record_rejected(431)

    counted = read_block(block)

    assert counted.rejected == {400: 2, 431: 1}
    assert [(slot, route, version) for slot, route, version, _ in counted.series] == [
        (0, "shop", "stable"),
        (1, "shop", "canary"),
    ]
    read_stable, read_canary = (stats for *_, stats in counted.series)
    for read, live in ((read_stable, stable), (read_canary, canary)):
        assert read.codes == live.codes
        assert read.buckets == live.buckets
        assert read.duration_sum == live.duration_sum
        assert read.upstream_errors == live.upstream_errors
    assert read_stable.codes == {200: 2}
    assert read_canary.upstream_errors["timeout"] == 1
    assert (stable.slot, canary.slot) == (0, 1)


def test_a_read_is_a_copy_that_outlives_the_block(block: int) -> None:
    recorder = worker_recorder(block)
    recorder.stats_for("shop", "stable").observe(200, 0.01)
    counted = read_block(block)
    recorder.stats_for("shop", "stable").observe(200, 0.01)
    assert counted.series[0][3].requests == 1


def test_unreported_is_what_the_block_holds_beyond_the_reports(block: int) -> None:
    recorder = worker_recorder(block)
    stable = recorder.stats_for("shop", "stable")
    canary = recorder.stats_for("shop", "canary")
    for _ in range(3):
        stable.observe(200, 0.01)
    canary.observe(502, 0.02)
    canary.upstream_error("connect")
    recorder.record_rejected(400)
    # What the reports brought so far: the stable series as it was then, nothing of the canary.
    reported_stable = stable.copy()
    reported_rejected = dict(recorder.rejected)
    stable.observe(404, 2.0)  # after the last report: only the block has these
    recorder.record_rejected(400)
    recorder.record_rejected(503)

    stats, rejected = unreported(read_block(block), {0: reported_stable}, reported_rejected)

    assert rejected == {400: 1, 503: 1}
    assert [(route, version, slot) for route, version, slot, _ in stats] == [
        ("shop", "stable", 0),
        ("shop", "canary", 1),
    ]
    stable_missed, canary_missed = (delta for *_, delta in stats)
    assert stable_missed[0] == {404: 1}
    assert sum(stable_missed[1]) == 1
    assert stable_missed[1][DURATION_BUCKETS.index(2.5)] == 1
    assert stable_missed[2] == pytest.approx(2.0)
    assert canary_missed[0] == {502: 1}
    assert canary_missed[3] == {"connect": 1}


def test_nothing_is_unreported_when_the_reports_brought_it_all(block: int) -> None:
    recorder = worker_recorder(block)
    stable = recorder.stats_for("shop", "stable")
    stable.observe(200, 0.01)
    recorder.record_rejected(400)
    stats, rejected = unreported(read_block(block), {0: stable.copy()}, dict(recorder.rejected))
    assert stats == []
    assert rejected == {}


def test_a_series_a_reload_dropped_is_never_recovered_and_its_name_gets_a_new_slot(
    block: int,
) -> None:
    recorder = worker_recorder(block)
    dropped = recorder.stats_for("shop", "stable")
    dropped.observe(200, 0.01)
    recorder.stats_for("blog", "stable").observe(200, 0.01)
    recorder.keep_routes(["blog"])  # a reload without shop
    dropped.observe(500, 0.01)  # a request in flight on the old config finishes
    recorder.stats_for("shop", "stable").observe(404, 0.01)  # and a reload with it again
    series = read_block(block).series
    assert [(slot, route, stats.codes) for slot, route, _, stats in series] == [
        (1, "blog", {200: 1}),
        (2, "shop", {404: 1}),
    ]


def test_a_full_block_leaves_new_series_in_private_memory_and_says_so_once(
    block: int, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = worker_recorder(block)
    for name in ("a", "b"):
        recorder.stats_for(name, "stable")
        recorder.stats_for(name, "canary")  # four series: the block is full
    with caplog.at_level(logging.WARNING, logger="canary_proxy"):
        late = recorder.stats_for("c", "stable")
        later = recorder.stats_for("c", "canary")
    late.observe(200, 0.01)
    later.observe(200, 0.01)
    assert (late.slot, later.slot) == (-1, -1)
    assert late.requests == 1  # counted all the same, and reported like any series
    assert len(read_block(block).series) == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "c/stable kept in private memory (all 4 slots used)" in warnings[0]


def test_a_name_too_long_for_its_entry_gets_private_memory(block: int) -> None:
    recorder = worker_recorder(block)
    stats = recorder.stats_for("r" * NAME_BYTES, "stable")
    assert stats.slot == -1
    assert recorder.stats_for("shop", "stable").slot == 0  # the slot was not used up
    assert [route for _, route, _, _ in read_block(block).series] == ["shop"]


def test_names_are_utf8_of_any_length_that_fits_their_entry(block: int) -> None:
    recorder = worker_recorder(block)
    room = NAME_BYTES - NAME_HEADER.size - len("canary")
    longest = "é" * (room // 2) + "a" * (room % 2)  # two bytes each: the entry full
    assert recorder.stats_for(longest, "canary").slot == 0
    assert recorder.stats_for(longest + "a", "canary").slot == -1  # one byte too many
    assert [(r, v) for _, r, v, _ in read_block(block).series] == [(longest, "canary")]


def test_a_worker_refuses_what_is_not_a_fresh_block(block: int) -> None:
    worker_recorder(block).stats_for("shop", "stable")  # in use: a restarted worker's old block
    with pytest.raises(ValueError, match="not a fresh counter block"):
        SharedCounters(os.dup(block))
    with (
        open(os.devnull, "rb") as empty,
        pytest.raises(ValueError, match="not a fresh counter block"),
    ):
        SharedCounters(os.dup(empty.fileno()))


def test_the_supervisor_refuses_to_read_what_is_not_a_block() -> None:
    fd = os.memfd_create("not-a-block")
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(ValueError, match="not a counter block"):
            read_block(fd)
    finally:
        os.close(fd)


def test_a_block_is_sized_for_its_capacity_and_costs_memory_only_where_used() -> None:
    fd = create_block()
    try:
        size = os.fstat(fd).st_size
        assert size == block_size(1024)
        assert size >= 1024 * SERIES_BYTES
        assert os.fstat(fd).st_blocks * 512 < 64 * 1024  # sparse: the header page alone
    finally:
        os.close(fd)


def test_the_upstream_error_kinds_each_have_their_word() -> None:
    stats = VersionStats()
    for n, kind in enumerate(UPSTREAM_ERROR_KINDS, start=1):
        for _ in range(n):
            stats.upstream_error(kind)
    assert stats.upstream_errors == {"connect": 1, "timeout": 2, "reset": 3, "protocol": 4}
    assert stats.codes == {}
    assert sum(stats.buckets) == 0
    assert stats.duration_sum == 0.0


def test_every_counter_has_a_word_of_its_own() -> None:
    """Codes, buckets, error kinds and the sum do not overlap (the layout's offsets)."""
    stats = VersionStats()
    durations = [*DURATION_BUCKETS, 3600.0]  # one in each bucket, +Inf last
    for code in range(1000):
        stats.observe(code, durations[code % len(durations)])
    for kind in UPSTREAM_ERROR_KINDS:
        stats.upstream_error(kind)
    assert stats.codes == dict.fromkeys(range(1000), 1)
    assert sum(stats.buckets) == 1000
    assert stats.buckets == [
        sum(1 for code in range(1000) if code % len(durations) == bucket)
        for bucket in range(len(durations))
    ]
    assert stats.upstream_errors == dict.fromkeys(UPSTREAM_ERROR_KINDS, 1)
    assert stats.duration_sum == pytest.approx(
        sum(durations[c % len(durations)] for c in range(1000))
    )
    assert stats.requests == 1000


def test_since_finds_every_changed_code_whichever_block_it_is_in() -> None:
    stats = VersionStats()
    for code in (200, 200, 503):
        stats.observe(code, 0.01)
    before = stats.copy()
    changed = {0: 1, 49: 2, 50: 1, 200: 3, 999: 1}  # block edges, and a code seen before
    for code, n in changed.items():
        for _ in range(n):
            stats.observe(code, 0.01)
    delta = stats.since(before)
    assert delta is not None
    assert delta[0] == changed
    assert sum(delta[1]) == sum(changed.values())
    assert stats.since(stats.copy()) is None
