"""The product's one vocabulary: versions, rollout states, guard verdicts and actions, upstream
error kinds and rollback reasons. Every module (and every metric label set) takes them from
here, so a name cannot drift between the decision that makes it and the metric that shows it.
"""

from __future__ import annotations

from typing import Final, Literal

VersionName = Literal["stable", "canary"]
STABLE: Final = "stable"
CANARY: Final = "canary"
VERSIONS: Final[tuple[VersionName, ...]] = (STABLE, CANARY)

State = Literal["steady", "progressing", "paused", "promoted", "aborted"]
STATES: Final[tuple[State, ...]] = ("steady", "progressing", "paused", "promoted", "aborted")

# The guard's assessment of a window: inconclusive is "not enough evidence", never a breach.
Verdict = Literal["healthy", "breach", "inconclusive"]
VERDICTS: Final[tuple[Verdict, ...]] = ("healthy", "breach", "inconclusive")

# What a breach does (`guard.action`, and `canary_proxy_guard_breaches_total{action}`).
GuardAction = Literal["rollback", "observe"]
GUARD_ACTIONS: Final[tuple[GuardAction, ...]] = ("rollback", "observe")

# `canary_proxy_upstream_errors_total{kind}`.
UPSTREAM_ERROR_KINDS: Final = ("connect", "timeout", "reset", "protocol")

# `canary_proxy_rollbacks_total{reason}`: the guard's limit that was breached, or an admin's
# abort (the controller derives it from the transition).
RollbackReason = Literal["error_rate", "error_rate_increase", "latency", "admin"]
ROLLBACK_REASONS: Final[tuple[RollbackReason, ...]] = (
    "error_rate",
    "error_rate_increase",
    "latency",
    "admin",
)
