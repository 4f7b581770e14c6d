"""Pure fleet rules: how replicas that share one rollout through a store agree on it.

A route's fleet record is the last decision any replica made (its rollout state, the revisions
rolled back, the event), stored under a version number that every decision bumps by one
(compare-and-set). These functions say what a replica does with records and with the
decisions it made itself: which one is newer, what may be decided while the store is
unreachable (nothing that raises a weight), what wins on reconnect (an abort, over any older
decision), when a replica may still count on its ramp lease, and how the pooled window's time
slots and counts add up. No I/O; time is passed in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from proxy.core.rollout import RolloutState, Transition
from proxy.core.window import LATENCY_BUCKETS, WindowCounts, p99_of

RECORD_FORMAT: Final = 1
# A lease is counted on for this share of its TTL after the renewal that kept it was sent:
# the rest covers a slow answer and clocks that run at slightly different rates.
LEASE_SAFE_FRACTION: Final = 0.8

Resolution = Literal["adopt", "publish", "keep"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """One route's fleet record: what every replica applies, and who decided it when."""

    state: RolloutState
    aborted_revisions: tuple[str, ...]
    event: Mapping[str, object] | None  # the transition, as the audit log has it
    origin: str  # the replica that decided
    decided_at: float  # wall clock, seconds

    @property
    def aborted(self) -> bool:
        return self.state.state == "aborted"

    @property
    def action(self) -> str | None:
        return None if self.event is None else str(self.event.get("action"))

    def encode(self) -> str:
        return json.dumps(
            {
                "format": RECORD_FORMAT,
                "state": self.state.to_dict(),
                "aborted_revisions": list(self.aborted_revisions),
                "event": None if self.event is None else dict(self.event),
                "origin": self.origin,
                "decided_at": self.decided_at,
            },
            sort_keys=True,
        )

    @classmethod
    def decode(cls, text: str | bytes) -> Decision:
        """The record `encode` wrote, or ValueError saying what is wrong with it."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ValueError(f"fleet record is not JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError(f"fleet record is not format {RECORD_FORMAT}")
        revisions = data.get("aborted_revisions")
        event = data.get("event")
        origin = data.get("origin")
        decided_at = data.get("decided_at")
        if not isinstance(revisions, list) or not all(isinstance(r, str) for r in revisions):
            raise ValueError("fleet record: aborted_revisions must be a list of strings")
        if event is not None and not isinstance(event, dict):
            raise ValueError("fleet record: event must be a mapping")
        if not isinstance(origin, str):
            raise ValueError("fleet record: origin must be a string")
        if isinstance(decided_at, bool) or not isinstance(decided_at, int | float):
            raise ValueError("fleet record: decided_at must be a number")
        return cls(
            state=RolloutState.from_dict(data.get("state")),
            aborted_revisions=tuple(revisions),
            event=event,
            origin=origin,
            decided_at=float(decided_at),
        )


def decision(
    state: RolloutState,
    transition: Transition | None,
    aborted_revisions: Iterable[str],
    *,
    origin: str,
    now: float,
) -> Decision:
    """A replica's own decision, ready to be published."""
    return Decision(
        state=state,
        aborted_revisions=tuple(sorted(aborted_revisions)),
        event=None if transition is None else transition.to_dict(),
        origin=origin,
        decided_at=now,
    )


def is_newer(applied: int, incoming: int) -> bool:
    """A record with a version above the one applied here is a decision not yet applied; one
    at or below it is old news (a message that came late, or twice)."""
    return incoming > applied


def raises_weight(transition: Transition) -> bool:
    """A decision that sends more users to the canary: in a fleet it is written to the store
    first and applied only once written, so no replica raises a weight the fleet has not."""
    return transition.weight_after_bp > transition.weight_before_bp


def offline_refusal(transition: Transition) -> str | None:
    """Why a decision must wait for the store, or None if it may be made without it.

    Without the fleet a replica may only make things safer: a rollback, an abort, a pause or a
    lower weight. Anything that raises a weight (promote, a higher set-weight, retry) could
    send one replica's users to a canary the rest of the fleet has rolled back.
    """
    if not raises_weight(transition):
        return None
    return (
        f"the fleet's store (Redis) is unreachable: {transition.action.replace('_', '-')}"
        f" would raise route {transition.route}'s weight from"
        f" {transition.weight_before_bp / 100:g} % to {transition.weight_after_bp / 100:g} %,"
        " which waits until it is back (lowering, pausing and aborting still work)"
    )


def resolve(
    *, pending: Decision | None, fleet: tuple[int, Decision] | None, base: int
) -> Resolution:
    """What a replica does when the fleet's record and its own unpublished decision meet.

    `pending` is this replica's latest decision not yet in the store (made while the store was
    unreachable, or a compare-and-set that lost a race), taken on top of fleet version `base`;
    `fleet` is the store's (version, record). The answer:

    - `adopt`: apply the fleet's record and drop `pending`;
    - `publish`: keep `pending` and write it over the fleet's current version;
    - `keep`: nothing to do.

    Nobody decided since `base`: ours goes in. Somebody did: theirs wins, except that an
    abort wins over any decision that is not itself an abort or a later retry — a rollback is
    never undone by a decision made before it, or without knowing of it.
    """
    if fleet is None or fleet[0] <= base:
        return "keep" if pending is None else "publish"
    if pending is None or not pending.aborted:
        return "adopt"
    version, record = fleet
    del version
    if record.aborted:
        return "adopt"  # aborted already: theirs is the same outcome, and the fleet's
    if record.action == "retry" and record.decided_at > pending.decided_at:
        return "adopt"  # an operator retried after the rollback: the newer decision
    if record.state.revision != pending.state.revision:
        return "adopt"  # a record about another canary: this abort is not about it
    return "publish"


def keep_own(own: RolloutState, fleet: Decision) -> bool:
    """Whether a replica that has not yet synced with the fleet (it starts, or it started while
    the store was unreachable) keeps its own saved state over the fleet's record, and writes
    it to the fleet: only an abort of the same canary made after the fleet's last decision (a
    rollback it made while cut off, then restarted). Anything else, the fleet's record wins."""
    return (
        own.state == "aborted"
        and not fleet.aborted
        and own.revision == fleet.state.revision
        and own.updated > fleet.decided_at
    )


def lease_held(renewed_at: float | None, ttl: float, now: float) -> bool:
    """Whether a replica may still act as the lease holder at `now` (monotonic seconds), given
    when it sent the last renewal the store accepted; None: it holds no lease."""
    if renewed_at is None:
        return False
    return 0 <= now - renewed_at < ttl * LEASE_SAFE_FRACTION


# -- the pooled window ---------------------------------------------------------------------------
#
# Each replica adds its counts to the time slot they fall in (one store hash per route and
# slot, expiring once the window has passed it); a verdict reads every slot of the window and
# adds them up. A slot's fields: "<v>r" requests, "<v>e" errors, "<v>b<i>" latency bucket i,
# with <v> "s" for stable and "c" for the canary.

STABLE_FIELD: Final = "s"
CANARY_FIELD: Final = "c"


def slot_width(span: float) -> float:
    """Slots of a tenth of the window (at most a second): a verdict sees between 90 % and all
    of the window, like the local sliding window's ring."""
    return min(1.0, span / 10)


def slot_of(now: float, width: float) -> int:
    return math.floor(now / width)


def window_slots(now: float, span: float) -> range:
    """The slot numbers a window of `span` seconds ending at `now` (wall clock) covers."""
    width = slot_width(span)
    current = slot_of(now, width)
    count = math.ceil(span / width - 1e-9)  # 10 for spans up to 10 s; float error is no slot
    return range(current - count + 1, current + 1)


def slot_ttl_ms(span: float) -> int:
    """How long a slot is kept: the window and one more slot, so no reader misses it."""
    return math.ceil((span + 2 * slot_width(span)) * 1000)


def increments(
    canary: bool, requests: int, errors: int, buckets: Iterable[tuple[int, int]]
) -> dict[str, int]:
    """The slot fields one replica's counts add to (HINCRBY each)."""
    version = CANARY_FIELD if canary else STABLE_FIELD
    fields = {f"{version}r": requests}
    if errors:
        fields[f"{version}e"] = errors
    for bucket, count in buckets:
        fields[f"{version}b{bucket}"] = count
    return fields


def pool(slots: Iterable[Mapping[str, int]]) -> tuple[WindowCounts, WindowCounts]:
    """The fleet's (stable, canary) counts over the slots read; fields it does not know are
    ignored (a newer replica's)."""
    totals = {STABLE_FIELD: _Totals(), CANARY_FIELD: _Totals()}
    for fields in slots:
        for name, count in fields.items():
            entry = totals.get(name[:1])
            if entry is not None:
                entry.add(name[1:], count)
    return totals[STABLE_FIELD].counts(), totals[CANARY_FIELD].counts()


class _Totals:
    __slots__ = ("errors", "histogram", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.histogram = [0] * LATENCY_BUCKETS

    def add(self, field: str, count: int) -> None:
        kind, bucket = field[:1], field[1:]
        if field == "r":
            self.requests += count
        elif field == "e":
            self.errors += count
        elif kind == "b" and bucket.isdigit() and int(bucket) < LATENCY_BUCKETS:
            self.histogram[int(bucket)] += count

    def counts(self) -> WindowCounts:
        return WindowCounts(
            requests=self.requests,
            errors=self.errors,
            p99=p99_of(self.histogram, self.requests),
        )
