"""The fleet: replicas with the same `cluster.name` run one rollout per route through Redis.

- **Decisions.** A decision this replica makes (guard rollback, ramp step, admin verb) is
  applied here at once, like without a fleet, then written to the route's record in Redis by a
  compare-and-set on the record's version, which also publishes it (one Lua script). Every
  replica subscribes, applies a record newer than the one it has, and writes it to its own
  state_dir and audit log. A write that lost a race, or a record that meets a decision of ours
  not yet written, is settled by `proxy.core.fleet.resolve`: the newer decision wins, except
  that an abort is never undone by a decision made before it.
- **Degraded mode.** Nothing on the data path waits for Redis: requests record into tallies
  and read weights from memory. Redis down or slow: the replica keeps its weights, its guard
  still rolls back, ramps hold (only a lease holder advances one, and a replica that cannot
  reach Redis holds no lease), and the admin refuses what would raise a weight (503). What it
  decided meanwhile is written on reconnect, aborts first, after catching up on what the fleet
  decided meanwhile.
- **Pooled evidence.** Each replica adds what its guarded routes saw to the fleet's window in
  Redis (one hash per route and time slot, expiring after the window) every EVIDENCE_SECONDS,
  and at once on a canary error; it reads the window back and judges the fleet's totals, so
  `min_requests` counts every replica's traffic. The local window still trips in line.
- **One ramp.** A lease (SET NX PX, renewed every HEARTBEAT_SECONDS) names the replica that
  advances ramps; when it dies another takes over within LEASE_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from time import monotonic
from typing import Final

import redis.asyncio as aioredis
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.control.controller import ABORTED_REVISIONS_KEY, Controller, DecisionRefused
from proxy.control.store import StateStore
from proxy.core.config import Cluster, Config
from proxy.core.fleet import (
    Decision,
    decision,
    increments,
    is_newer,
    keep_own,
    lease_held,
    offline_refusal,
    pool,
    resolve,
    slot_of,
    slot_ttl_ms,
    slot_width,
    window_slots,
)
from proxy.core.rollout import RolloutState, Transition

log = logging.getLogger("canary_proxy")

COMMAND_SECONDS: Final = 1.0  # one Redis round trip, at most: slower counts as unreachable
SEED_SECONDS: Final = 2.0  # start-up waits this long for the fleet's state, then uses state_dir
HEARTBEAT_SECONDS: Final = 0.5
LEASE_SECONDS: Final = 3.0  # the ramp lease's TTL: a dead holder is replaced within it
EVIDENCE_SECONDS: Final = 0.1  # pooled evidence is added at least this often
MIN_EVIDENCE_GAP_SECONDS: Final = 0.005  # and, on canary errors, at most this often
RECONNECT_SECONDS: Final = 0.25
# The subscription is pinged every HEARTBEAT_SECONDS; silent for this long, it is renewed (a
# connection that died without a FIN or a RST never says so).
SUBSCRIPTION_SILENT_SECONDS: Final = 2.0
SETTLE_SECONDS: Final = 1.0  # an admin answer waits this long for its decision to be written
REPLICA_ALIVE_SECONDS: Final = 5.0  # a replica heard from within this is counted as live
REPLICA_FORGET_SECONDS: Final = 300.0  # one silent for this long leaves the list
LAG_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONNECTION_ERRORS: Final = (RedisError, OSError, TimeoutError)

# KEYS: the route's record, the decisions channel. ARGV: the version the decision was taken
# on, the record, the route. Written and published only if nobody wrote since that version;
# otherwise the current version and record come back for `resolve`.
_CAS: Final = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current, redis.call('HGET', KEYS[1], 'record') or ''}
end
local version = current + 1
redis.call('HSET', KEYS[1], 'version', version, 'record', ARGV[2])
redis.call('PUBLISH', KEYS[2], version .. ' ' .. ARGV[3] .. ' ' .. ARGV[2])
return {1, version, ''}
"""
# KEYS: the lease. ARGV: this replica, the TTL in ms. Takes a free lease or keeps our own.
_LEASE: Final = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def replica_id(config: Config) -> str:
    """`cluster.replica`, or for `auto` this host and the listen port (the pid when the port is
    chosen by the OS, so that two such replicas on one host differ)."""
    assert config.cluster is not None
    if config.cluster.replica != "auto":
        return config.cluster.replica
    port = config.listen.port
    return f"{socket.gethostname()}:{port if port else f'pid{os.getpid()}'}"


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key of one cluster, under `canary-proxy:<name>:`."""

    prefix: str

    def route(self, name: str) -> str:
        return f"{self.prefix}:route:{name}"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}:decisions"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}:replicas"

    @property
    def lease(self) -> str:
        return f"{self.prefix}:ramp-lease"

    def slot(self, route: str, revision: str | None, slot: int) -> str:
        return f"{self.prefix}:window:{route}:{revision or ''}:{slot}"


@dataclass(frozen=True, slots=True)
class Pending:
    """A decision of ours not yet in Redis, taken on top of fleet version `base`."""

    base: int
    decision: Decision


class SeededStore(StateStore):
    """state_dir, with the fleet's records (read from Redis at start) over its own."""

    def __init__(self, state_dir: str, fleet: Fleet) -> None:
        super().__init__(state_dir)
        self.fleet = fleet

    def load(self) -> dict[str, Mapping[str, object]]:
        return self.fleet.over_saved(super().load())


class LagHistogram:
    """Decision made (on its replica's clock) to applied here, in seconds."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LAG_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        index = next((i for i, bound in enumerate(LAG_BUCKETS) if seconds <= bound), -1)
        self.counts[index] += 1
        self.total += seconds


class Fleet:
    """This replica's link to the fleet: its decisions out, the others' in, evidence pooled,
    the ramp lease, and who is there."""

    def __init__(self, cluster: Cluster, replica: str) -> None:
        self.cluster = cluster
        self.replica = replica
        self.keys = Keys(f"canary-proxy:{cluster.name}")
        password = None
        if cluster.redis_password_env is not None:
            password = os.environ.get(cluster.redis_password_env) or None
        # No retries inside the client: every caller here has its own loop and deadline.
        self.client = aioredis.Redis.from_url(
            cluster.redis,
            password=password,  # a password in the URL itself wins
            socket_timeout=COMMAND_SECONDS,
            socket_connect_timeout=COMMAND_SECONDS,
            socket_keepalive=True,
            socket_keepalive_options=_KEEPALIVE,
            retry=Retry(NoBackoff(), 0),
        )
        self._cas = self.client.register_script(_CAS)
        self._lease = self.client.register_script(_LEASE)
        self._release = self.client.register_script(_RELEASE)
        self.controller: Controller | None = None
        self.applied: dict[str, int] = {}  # route: the fleet version applied here
        self.seeded: dict[str, tuple[int, Decision]] = {}  # read before serving
        self.pending: dict[str, Pending] = {}
        self.since: dict[str, float] = {}  # route: pooled evidence before this (wall) is old
        self.replicas: list[dict[str, object]] = []
        self.lag = LagHistogram()
        self.subscribed = False
        self.healthy = False
        # Routes whose record a heartbeat found newer than the version applied here: if the
        # next heartbeat still does, the subscription missed it.
        self._behind: dict[str, int] = {}
        self._writing_first: set[str] = set()  # routes with a `write_first` on the wire
        # Rollbacks of ours not yet in the fleet: counted when written (a replica whose write
        # lost took the fleet's rollback instead, counted where it was decided).
        self._rollbacks: dict[str, tuple[Decision, Transition]] = {}
        self._resubscribe = False
        self._said_lost = False
        self.instance = os.urandom(6).hex()  # this process, in the heartbeat
        self._beaten = False
        self._said_twin = False
        self.lease_renewed: float | None = None  # monotonic, when the kept renewal was sent
        self._wake: asyncio.Event | None = None
        self._published = asyncio.Event()  # a round of publishing ended
        self._evidence_due: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        return self.subscribed and self.healthy

    # -- start and stop ----------------------------------------------------------------------

    async def seed(self, routes: Iterable[str]) -> None:
        """Read the fleet's record of each route before serving (`over_saved` puts them over
        state_dir's). Redis silent for SEED_SECONDS: the replica starts from its state_dir."""
        names = list(routes)
        try:
            async with asyncio.timeout(SEED_SECONDS):
                replies = await self._read_records(names)
        except CONNECTION_ERRORS as error:
            log.warning(
                "cluster %s: cannot read the fleet's state from Redis (%s); serving from state_dir",
                self.cluster.name,
                _describe(error),
            )
            return
        for name, (version, record) in zip(names, replies, strict=True):
            if version is not None and record is not None:
                self.seeded[name] = (version, record)

    def over_saved(self, saved: dict[str, Mapping[str, object]]) -> dict[str, Mapping[str, object]]:
        """state_dir's records with the fleet's over them, except where this replica keeps
        its own (an abort made while cut off from the fleet: `keep_own`), which it writes to
        the fleet once connected."""
        merged = dict(saved)
        for name, (version, record) in self.seeded.items():
            own = _rollout_state(saved.get(name))
            if own is not None and keep_own(own, record):
                log.warning(
                    "cluster %s: route %s: keeping this replica's abort, made after the fleet's"
                    " last decision, and writing it to the fleet: %s",
                    self.cluster.name,
                    name,
                    own.reason,
                )
                continue  # not synced yet: the catch-up on connecting publishes it
            self.applied[name] = version
            merged[name] = {
                **record.state.to_dict(),
                ABORTED_REVISIONS_KEY: list(record.aborted_revisions),
            }
        log.info(
            "cluster %s: took the fleet's state of %d route(s)",
            self.cluster.name,
            len(self.applied),
        )
        return merged

    def attach(self, controller: Controller) -> None:
        self.controller = controller
        controller.on_decision = self.decided
        controller.check_decision = self.check
        controller.may_ramp = self.may_ramp
        controller.on_evidence = self.evidence_soon
        controller.write_first = self.write_first
        controller.rollbacks_counted_by_fleet = True

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._evidence_due = asyncio.Event()
        self._tasks = [
            loop.create_task(self._subscribe_forever()),
            loop.create_task(self._beat_forever()),
            loop.create_task(self._publish_forever()),
            loop.create_task(self._pool_forever()),
        ]

    async def stop(self) -> None:
        """Stop, handing the ramp lease on at once and leaving the replica list."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.connected:
            with contextlib.suppress(*CONNECTION_ERRORS):
                async with asyncio.timeout(COMMAND_SECONDS):
                    await self.publish_pending()
                    await self._release(keys=[self.keys.lease], args=[self.replica])
                    await self.client.hdel(self.keys.replicas, self.replica)
        await self.client.aclose()

    # -- the controller's hooks --------------------------------------------------------------

    def decided(self, name: str, state: RolloutState, transition: Transition) -> None:
        """A decision of ours, applied here: write it to the fleet (in the background)."""
        controller = self.controller
        assert controller is not None
        record = decision(
            state,
            transition,
            controller.aborted_revisions.get(name, ()),
            origin=self.replica,
            now=time.time(),
        )
        if transition.action in ("start", "new_revision", "retry"):
            self.since[name] = record.decided_at
        earlier = self.pending.get(name)
        base = earlier.base if earlier is not None else self.applied.get(name, 0)
        self.pending[name] = Pending(base, record)
        if transition.action in ("rollback", "abort"):
            if self.connected:
                self._rollbacks[name] = (record, transition)
            else:
                controller.count_rollback(name, transition)  # no fleet to count it once
        self._wake_publisher()

    def check(self, transition: Transition) -> None:
        """Refuse (503) an admin decision that would raise a weight while Redis is away."""
        if not self.connected:
            refusal = offline_refusal(transition)
            if refusal is not None:
                raise DecisionRefused(refusal)

    async def write_first(self, name: str, state: RolloutState, transition: Transition) -> None:
        """Write a decision that raises a weight to the fleet before it is applied here (a
        replica that has lost Redis without knowing it yet must not raise one alone): within
        SETTLE_SECONDS, on top of the version applied here, or DecisionRefused."""
        controller = self.controller
        assert controller is not None
        refusal = offline_refusal(transition) or "the fleet's store (Redis) is unreachable"
        if self.connected and name in self.pending:
            await self.settled()  # ours first: the raise goes on top of it
        if not self.connected or name in self.pending:
            raise DecisionRefused(refusal)
        record = decision(
            state,
            transition,
            controller.revisions_after(name, transition, state),
            origin=self.replica,
            now=time.time(),
        )
        self._writing_first.add(name)
        try:
            async with asyncio.timeout(SETTLE_SECONDS):
                written, version, text = await self._cas(
                    keys=[self.keys.route(name), self.keys.decisions],
                    args=[self.applied.get(name, 0), record.encode(), name],
                )
        except CONNECTION_ERRORS as error:
            raise DecisionRefused(f"{refusal} (writing it: {_describe(error)})") from None
        finally:
            self._writing_first.discard(name)
        version = int(version)
        if not written:
            fleet = _decoded(name, version, text)
            if fleet is not None:
                self._arrived(name, *fleet)
            raise DecisionRefused(
                f"another replica decided for route {name} meanwhile (fleet version {version});"
                " look at the route again"
            )
        self.applied[name] = max(self.applied.get(name, 0), version)
        if transition.action in ("start", "new_revision", "retry"):
            self.since[name] = record.decided_at

    def may_ramp(self) -> bool:
        return self.connected and lease_held(self.lease_renewed, LEASE_SECONDS, monotonic())

    def evidence_soon(self) -> None:
        if self._evidence_due is not None:
            self._evidence_due.set()

    async def settled(self) -> None:
        """Returns once our decisions are in Redis, or after SETTLE_SECONDS, or at once while
        Redis is away (they are written on reconnect)."""
        deadline = monotonic() + SETTLE_SECONDS
        while self.pending and self.connected and (left := deadline - monotonic()) > 0:
            self._published.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._published.wait(), left)

    # -- decisions out -----------------------------------------------------------------------

    def _wake_publisher(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _publish_forever(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.connected:
                continue  # the reconnect wakes this again
            try:
                async with asyncio.timeout(COMMAND_SECONDS * 3):
                    await self.publish_pending()
            except CONNECTION_ERRORS as error:
                self._lost(error)
            except Exception:
                log.exception("cluster %s: publishing a decision failed", self.cluster.name)
            self._published.set()

    async def publish_pending(self) -> None:
        """Write every decision of ours not yet in Redis (the background publisher's round).
        Aborts first: the decision that must not wait behind any other."""
        for name in sorted(self.pending, key=lambda n: not self.pending[n].decision.aborted):
            pending = self.pending.get(name)
            if pending is not None:
                await self._publish(name, pending)

    async def _publish(self, name: str, pending: Pending) -> None:
        for _ in range(8):  # each round trip means another replica wrote: bounded all the same
            written, version, text = await self._cas(
                keys=[self.keys.route(name), self.keys.decisions],
                args=[pending.base, pending.decision.encode(), name],
            )
            version = int(version)
            if written:
                self.applied[name] = max(self.applied.get(name, 0), version)
                self._settle(name, pending, version)
                self._written(name, pending.decision)
                return
            # Lost a race. What we decided meanwhile (an abort, say) is what meets the fleet's
            # record now, not the decision that was on the wire.
            current = self.pending.get(name)
            if current is None:
                return  # settled meanwhile (a record that arrived saw to it)
            fleet = _decoded(name, version, text)
            match resolve(pending=current.decision, fleet=fleet, base=current.base):
                case "publish":
                    pending = Pending(version, current.decision)
                    self.pending[name] = pending
                case _:
                    assert fleet is not None
                    del self.pending[name]
                    if is_newer(self.applied.get(name, 0), version):
                        self._adopt(name, *fleet)
                    return
        log.error(
            "cluster %s: route %s: gave up writing a decision after 8 races",
            self.cluster.name,
            name,
        )

    def _settle(self, name: str, pending: Pending, version: int | None) -> None:
        """`pending` is written (as `version`) or given up; a later decision of ours stays,
        now on top of it."""
        current = self.pending.get(name)
        if current is pending or (current is not None and current.decision == pending.decision):
            del self.pending[name]
        elif current is not None and version is not None:
            self.pending[name] = Pending(version, current.decision)

    # -- decisions in ------------------------------------------------------------------------

    async def _subscribe_forever(self) -> None:
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.decisions)
                    async with asyncio.timeout(COMMAND_SECONDS * 2):
                        await self._catch_up()
                    self.subscribed = self.healthy = True
                    self._said_lost = False
                    log.info("cluster %s: connected as %s", self.cluster.name, self.replica)
                    self._wake_publisher()
                    await self._listen(pubsub)
            except CONNECTION_ERRORS as error:
                self._lost(error)
            except Exception:
                log.exception("cluster %s: the subscription failed", self.cluster.name)
                self._lost(None)
            self.subscribed = False
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        """Apply what is published until the subscription goes silent (pinged, it answers
        within SUBSCRIPTION_SILENT_SECONDS) or a heartbeat finds it missed a decision."""
        self._resubscribe = False
        heard = pinged = monotonic()
        while not self._resubscribe:
            if monotonic() - pinged >= HEARTBEAT_SECONDS:
                await pubsub.ping()
                pinged = monotonic()
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=HEARTBEAT_SECONDS
            )
            if message is not None:
                heard = monotonic()
                if message.get("type") == "message":
                    self._received(message.get("data"))
            elif monotonic() - heard > SUBSCRIPTION_SILENT_SECONDS:
                raise TimeoutError(
                    f"the subscription was silent for {SUBSCRIPTION_SILENT_SECONDS:g}s"
                )
        log.warning(
            "cluster %s: the subscription missed a decision; subscribing again", self.cluster.name
        )

    def _lost(self, error: BaseException | None) -> None:
        """Redis failed us: degraded until it answers again (said once per outage)."""
        if self.connected or not self._said_lost:
            log.warning(
                "cluster %s: Redis unreachable (%s): serving at the last weights; ramps hold and"
                " nothing raises a weight until it is back",
                self.cluster.name,
                "?" if error is None else _describe(error),
            )
            self._said_lost = True
        self.healthy = False
        self.lease_renewed = None

    def _received(self, data: object) -> None:
        if not isinstance(data, bytes):
            return
        version, _, rest = data.partition(b" ")
        name, _, text = rest.partition(b" ")
        try:
            self._arrived(name.decode(), int(version), text)
        except Exception:  # one bad message must not end the subscription
            log.exception("cluster %s: cannot apply a published decision", self.cluster.name)

    async def _read_records(self, names: list[str]) -> list[tuple[int | None, Decision | None]]:
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(self.keys.route(name), "version", "record")
            replies = await pipe.execute()
        records: list[tuple[int | None, Decision | None]] = []
        for name, (version, text) in zip(names, replies, strict=True):
            fleet = _decoded(name, int(version), text) if version is not None else None
            records.append((None, None) if fleet is None else fleet)
        return records

    async def _catch_up(self) -> None:
        """After (re)connecting: what the fleet decided while we were away, then ours."""
        controller = self.controller
        if controller is None:
            return
        names = list(controller.live)
        for name, (version, record) in zip(names, await self._read_records(names), strict=True):
            if name not in self.applied and version is not None and record is not None:
                # Never synced (started without Redis, or kept its own at start-up): an abort
                # made meanwhile goes to the fleet rather than being overwritten.
                own = controller.live[name].rollout
                if keep_own(own, record) and name not in self.pending:
                    self.pending[name] = Pending(version, self._current(name))
                    self.applied[name] = version
                    continue
            applied = self.applied.get(name, 0)
            if version is None or record is None:
                # Redis lost what we applied (it restarted empty): our state is the fleet's
                # best knowledge, so it goes back in, written only while the record is still
                # missing (base 0); a replica that wrote first is met by `resolve`. A replica
                # that never synced offers only an abort it made meanwhile.
                offer = applied > 0 or controller.live[name].aborted
                self._offer(name, offer)
                self.applied[name] = 0
                continue
            if version < applied:
                # Lost, and another replica wrote its state back first: it stands, except that
                # an abort of ours wins over it (`resolve`, never a blind overwrite).
                self._offer(name, controller.live[name].aborted)
                self.applied[name] = 0
            self._arrived(name, version, record)

    def _offer(self, name: str, offer: bool) -> None:
        """After Redis lost the route's record: our current state (if `offer`) or our pending
        decision goes back in on top of nothing (version 0)."""
        pending = self.pending.get(name)
        if pending is not None:
            self.pending[name] = Pending(0, pending.decision)
        elif offer:
            self.pending[name] = Pending(0, self._current(name))

    def _current(self, name: str) -> Decision:
        controller = self.controller
        assert controller is not None
        state = controller.live[name].rollout
        return decision(
            state,
            None,
            controller.aborted_revisions.get(name, ()),
            origin=self.replica,
            now=state.updated,  # when it was decided, for `resolve`
        )

    def _arrived(self, name: str, version: int, record: Decision | bytes) -> None:
        if not is_newer(self.applied.get(name, 0), version):
            return
        if not isinstance(record, Decision):
            fleet = _decoded(name, version, record)
            if fleet is None:
                self.applied[name] = version
                return
            record = fleet[1]
        pending = self.pending.get(name)
        if record.origin == self.replica:
            # Ours, applied here when we made it (its answer to the CAS may come later). A
            # later decision of ours goes on top of it (its CAS may have timed out here and
            # run all the same).
            self.applied[name] = version
            if pending is not None and pending.decision == record:
                del self.pending[name]
                self._written(name, record)
                self._published.set()
            elif pending is not None and pending.base < version:
                self.pending[name] = Pending(version, pending.decision)
            elif pending is None and self._serves_otherwise(name, record):
                # Ours, but not what we serve: a write that ran although its answer never came
                # (the admin was told 503): the fleet has it, so it goes in here too.
                self._adopt(name, version, record)
            return
        if pending is not None:
            if (
                resolve(pending=pending.decision, fleet=(version, record), base=pending.base)
                == "publish"
            ):
                self.pending[name] = Pending(version, pending.decision)
                self.applied[name] = version
                self._wake_publisher()
                return
            del self.pending[name]
            self._published.set()
        self._adopt(name, version, record)

    def _serves_otherwise(self, name: str, record: Decision) -> bool:
        """Whether this replica serves something else than `record` (a decision of ours)
        while no write of ours for the route is on the wire."""
        controller = self.controller
        assert controller is not None
        live = controller.live.get(name)
        if live is None or name in self._writing_first:
            return False
        here, there = live.rollout, record.state
        return (here.state, here.weight_bp, here.revision) != (
            there.state,
            there.weight_bp,
            there.revision,
        )

    def _written(self, name: str, record: Decision) -> None:
        """A decision of ours is in the fleet: a rollback counts now, here only."""
        controller = self.controller
        assert controller is not None
        entry = self._rollbacks.get(name)
        if entry is not None and entry[0] == record:
            del self._rollbacks[name]
            controller.count_rollback(name, entry[1])

    def _adopt(self, name: str, version: int, record: Decision) -> None:
        controller = self.controller
        assert controller is not None
        self._rollbacks.pop(name, None)  # the fleet's decision, counted where it was made
        self.applied[name] = version
        if record.action in ("start", "new_revision", "retry"):
            self.since[name] = record.decided_at
        if controller.follow_fleet(
            name, record.state, record.aborted_revisions, record.event, record.origin
        ):
            self.lag.observe(max(0.0, time.time() - record.decided_at))

    # -- heartbeat and lease -----------------------------------------------------------------

    async def _beat_forever(self) -> None:
        while True:
            try:
                async with asyncio.timeout(COMMAND_SECONDS):
                    await self._beat()
            except CONNECTION_ERRORS as error:
                self._lost(error)
            except Exception:
                log.exception("cluster %s: heartbeat failed", self.cluster.name)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _beat(self) -> None:
        now = time.time()
        sent = monotonic()
        names = list(self.controller.live) if self.controller is not None else []
        beat = json.dumps(
            {"last_seen": now, "applied_version": self.applied, "instance": self.instance}
        )
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.replicas, self.replica)
            pipe.hset(self.keys.replicas, self.replica, beat)
            pipe.hgetall(self.keys.replicas)
            await self._lease(
                keys=[self.keys.lease], args=[self.replica, int(LEASE_SECONDS * 1000)], client=pipe
            )
            for name in names:
                pipe.hmget(self.keys.route(name), "version", "record")
            previous, _, replicas, leased, *records = await pipe.execute()
        self._check_unique(previous)
        if self.connected:
            self._missed(dict(zip(names, records, strict=True)))
        self.lease_renewed = sent if leased else None
        self.replicas, gone = _replicas(replicas, now)
        if gone:
            await self.client.hdel(self.keys.replicas, *gone)
        if self.subscribed and not self.healthy:
            await self._catch_up()  # Redis was slow or away while we stayed subscribed
            self.healthy = True
            self._said_lost = False
            log.info("cluster %s: Redis answers again", self.cluster.name)
            self._wake_publisher()

    def _missed(self, records: Mapping[str, list[bytes | None]]) -> None:
        """A record newer than the version applied here, at two heartbeats in a row: the
        subscription missed it (a published decision arrives within milliseconds). Applied
        now, and the subscription renewed."""
        behind: dict[str, int] = {}
        missed = False
        for name, (version, text) in records.items():
            if version is None or not is_newer(self.applied.get(name, 0), int(version)):
                continue
            behind[name] = int(version)
            if name in self._behind:
                missed = True
                self._arrived(name, int(version), text or b"")
        self._behind = {n: v for n, v in behind.items() if is_newer(self.applied.get(n, 0), v)}
        if missed:
            self._resubscribe = True

    def _check_unique(self, previous: bytes | None) -> None:
        """Two processes with one replica id would each take the other's decisions for their
        own and share one lease: said loudly (a restart finds its own old entry: not that)."""
        if previous is not None and self._beaten and not self._said_twin:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                if json.loads(previous).get("instance") != self.instance:
                    log.error(
                        "cluster %s: another process also runs as replica %r; give every replica"
                        " its own cluster.replica (decisions and the ramp lease get mixed up)",
                        self.cluster.name,
                        self.replica,
                    )
                    self._said_twin = True
        self._beaten = True

    @property
    def lease_holder(self) -> bool:
        return lease_held(self.lease_renewed, LEASE_SECONDS, monotonic())

    # -- pooled evidence ---------------------------------------------------------------------

    async def _pool_forever(self) -> None:
        assert self._evidence_due is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._evidence_due.wait(), EVIDENCE_SECONDS)
            self._evidence_due.clear()
            if self.connected:
                try:
                    async with asyncio.timeout(COMMAND_SECONDS):
                        await self._pool()
                except CONNECTION_ERRORS as error:
                    self._lost(error)
                except Exception:
                    log.exception("cluster %s: pooling evidence failed", self.cluster.name)
            else:
                self._drop_unpooled()
            await asyncio.sleep(MIN_EVIDENCE_GAP_SECONDS)

    def _drop_unpooled(self) -> None:
        """What our routes count while Redis is away never joins the pool: added on reconnect,
        it would all land in the time slot of that moment (the local window judged it)."""
        controller = self.controller
        assert controller is not None
        for live in controller.live.values():
            for tally in (live.stable_pool, live.canary_pool):
                if tally is not None:
                    tally.drain()

    async def _pool(self) -> None:
        """Add what our guarded routes counted to the fleet's window and judge its totals.
        Counts drained here and not written (Redis failed) are lost to the pool, not to the
        local window, which judged them already."""
        controller = self.controller
        assert controller is not None
        now = time.time()
        reads: list[tuple[str, int, int]] = []
        async with self.client.pipeline(transaction=False) as pipe:
            for name, live in controller.live.items():
                guard = live.guard
                if guard is None or live.stable_pool is None or live.canary_pool is None:
                    continue
                revision = live.route.canary.revision if live.route.canary else None
                fields: dict[str, int] = {}
                for canary, tally in ((False, live.stable_pool), (True, live.canary_pool)):
                    counts = tally.drain()
                    if counts is not None:
                        fields.update(
                            increments(canary, counts.requests, counts.errors, counts.buckets)
                        )
                key = self.keys.slot(name, revision, slot_of(now, slot_width(guard.window)))
                for field, count in fields.items():
                    pipe.hincrby(key, field, count)
                if fields:
                    pipe.pexpire(key, slot_ttl_ms(guard.window))
                since = self.since.get(name)
                first = -math.inf if since is None else slot_of(since, slot_width(guard.window)) + 1
                slots = [s for s in window_slots(now, guard.window) if s >= first]
                for slot in slots:
                    pipe.hgetall(self.keys.slot(name, revision, slot))
                reads.append((name, len(fields) + (1 if fields else 0), len(slots)))
            if not reads:
                return
            replies = await pipe.execute()
        at = 0
        for name, writes, count in reads:
            hashes = replies[at + writes : at + writes + count]
            at += writes + count
            stable_counts, canary_counts = pool(_fields(h) for h in hashes)
            controller.judge_pooled(name, stable_counts, canary_counts)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return {
            "name": self.cluster.name,
            "replica": self.replica,
            "connected": self.connected,
            "ramp_lease": self.lease_holder,
            "replicas": self.replicas,
        }

    def live_replicas(self) -> int:
        now = time.time()
        return sum(
            1
            for replica in self.replicas
            if isinstance(seen := replica.get("last_seen"), float)
            and now - seen < REPLICA_ALIVE_SECONDS
        )


class FleetCollector(Collector):
    """canary_proxy_cluster_connected, _replicas and _decision_lag_seconds, read at scrape
    time."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self.fleet
        yield GaugeMetricFamily(
            "canary_proxy_cluster_connected",
            "1 while this replica reaches the fleet's Redis, else 0.",
            value=1.0 if fleet.connected else 0.0,
        )
        yield GaugeMetricFamily(
            "canary_proxy_cluster_replicas",
            f"Replicas of the cluster heard from within {REPLICA_ALIVE_SECONDS:g}s (as last read).",
            value=float(fleet.live_replicas()),
        )
        buckets = []
        total = 0
        for bound, count in zip((*LAG_BUCKETS, math.inf), fleet.lag.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), float(total)))
        yield HistogramMetricFamily(
            "canary_proxy_cluster_decision_lag_seconds",
            "From a decision made on another replica to it applied here.",
            buckets=buckets,
            sum_value=fleet.lag.total,
        )


# Keepalive probes: a peer gone without a word is found within about 8 s, where Linux has them.
_KEEPALIVE: Final = {
    option: value
    for option, value in (
        (getattr(socket, "TCP_KEEPIDLE", None), 5),
        (getattr(socket, "TCP_KEEPINTVL", None), 1),
        (getattr(socket, "TCP_KEEPCNT", None), 3),
    )
    if option is not None
}


def _decoded(name: str, version: int, text: object) -> tuple[int, Decision] | None:
    if not text:
        return None
    assert isinstance(text, bytes | str)
    try:
        return version, Decision.decode(text)
    except ValueError as error:
        log.error("route %s: ignoring fleet record version %d: %s", name, version, error)
        return None


def _rollout_state(record: object) -> RolloutState | None:
    try:
        return RolloutState.from_dict(record)
    except ValueError:
        return None


def _fields(raw: Mapping[bytes, bytes]) -> dict[str, int]:
    return {key.decode(): int(value) for key, value in raw.items()}


def _replicas(raw: Mapping[bytes, bytes], now: float) -> tuple[list[dict[str, object]], list[str]]:
    """The replica list as status shows it, and the ids silent for too long to keep."""
    replicas: list[dict[str, object]] = []
    gone: list[str] = []
    for key, value in sorted(raw.items()):
        replica = key.decode(errors="replace")
        try:
            beat = json.loads(value)
            last_seen = float(beat["last_seen"])
            applied = beat.get("applied_version", {})
        except (ValueError, KeyError, TypeError):
            gone.append(replica)
            continue
        if now - last_seen > REPLICA_FORGET_SECONDS:
            gone.append(replica)
            continue
        replicas.append({"id": replica, "last_seen": last_seen, "applied_version": applied})
    return replicas, gone


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
