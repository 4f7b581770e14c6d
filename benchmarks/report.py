"""Medians of the rounds, the side-by-side tables, the JSON file and the PNG chart."""

from __future__ import annotations

import importlib
import importlib.util
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from idle import IdleResult
from reaction import ReactionSummary
from scenarios import IDLE_GOAL_KB
from wrk import WrkReport

REFERENCE: Final = "canary-proxy"  # every ratio is against this target
_COLUMNS: Final = ("target", "req/s", "p50 ms", "p99 ms", "sock err", "non-2xx", "÷ canary-proxy")
_OPENS_COLUMN: Final = "conn/req"  # newconn: TCP connects per request (host-wide counter)


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """One target in one scenario: medians over the rounds, error counts summed over them."""

    target: str
    rounds: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    socket_errors: int
    non_2xx: int
    opens_per_request: float | None = None  # newconn only: TCP connects / requests


def summarise(target: str, reports: Sequence[WrkReport]) -> Summary:
    opens = [r.tcp_opens for r in reports]
    requests = sum(r.requests for r in reports)
    counted = [n for n in opens if n is not None]
    per_request = sum(counted) / requests if requests and len(counted) == len(opens) else None
    return Summary(
        target=target,
        rounds=len(reports),
        requests_per_second=statistics.median(r.requests_per_second for r in reports),
        p50_ms=statistics.median(r.p50_ms for r in reports),
        p99_ms=statistics.median(r.p99_ms for r in reports),
        requests=sum(r.requests for r in reports),
        socket_errors=sum(r.socket_errors.total for r in reports),
        non_2xx=sum(r.non_2xx for r in reports),
        opens_per_request=per_request,
    )


def table(summaries: Sequence[Summary]) -> str:
    """A Markdown table, so the same text goes to the terminal and to the README."""
    reference = _reference_rate(summaries)
    opens = any(summary.opens_per_request is not None for summary in summaries)
    header = (*_COLUMNS[:-1], _OPENS_COLUMN, _COLUMNS[-1]) if opens else _COLUMNS
    return _markdown([header, *(_row(summary, reference, opens) for summary in summaries)])


def _row(summary: Summary, reference: float | None, opens: bool) -> tuple[str, ...]:
    ratio = "—" if not reference else f"{summary.requests_per_second / reference:.2f}"
    cells = [
        summary.target,
        f"{summary.requests_per_second:,.0f}",
        f"{summary.p50_ms:.2f}",
        f"{summary.p99_ms:.2f}",
        str(summary.socket_errors),
        str(summary.non_2xx),
    ]
    if opens:
        per_request = summary.opens_per_request
        cells.append("—" if per_request is None else f"{per_request:.2f}")
    return (*cells, ratio)


def _markdown(rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """Rows as a Markdown table, the first `left` columns aligned left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    lines = [_markdown_line(row, widths, left) for row in rows]
    return "\n".join([lines[0], rule, *lines[1:]])


def _markdown_line(cells: Sequence[str], widths: Sequence[int], left: int) -> str:
    aligned = [
        cell.ljust(width) if i < left else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "| " + " | ".join(aligned) + " |"


def verdict(summaries: Sequence[Summary]) -> str:
    """canary-proxy's req/s as a multiple of each peer's, e.g. `canary-proxy = 0.81 x direct`."""
    reference = _reference_rate(summaries)
    peers = [s for s in summaries if s.target != REFERENCE and s.requests_per_second > 0]
    if not reference or not peers:
        return f"({REFERENCE} or its peers not measured: no ratios)"
    parts = [f"{reference / peer.requests_per_second:.2f} x {peer.target}" for peer in peers]
    return f"{REFERENCE} req/s = " + ", ".join(parts)


def _reference_rate(summaries: Sequence[Summary]) -> float | None:
    for summary in summaries:
        if summary.target == REFERENCE:
            return summary.requests_per_second
    return None


def idle_table(results: Sequence[IdleResult], skipped: Sequence[str]) -> str:
    """RSS per idle keep-alive client connection, one row per proxy measured."""
    header = (
        "target",
        "processes (RSS summed)",
        "RSS before MB",
        "RSS after MB",
        "KB/conn",
        "still open",
        "RSS closed MB",
    )
    rows = [
        (
            r.target,
            r.processes,
            _mb(r.rss_before_kb),
            _mb(r.rss_after_kb),
            f"{r.per_connection_kb:.1f}",
            f"{r.still_open:,}/{r.connections:,}",
            _mb(r.rss_closed_kb),
        )
        for r in results
    ]
    rows += [(name, "n/a (not a proxy)", "—", "—", "—", "—", "—") for name in skipped]
    return _markdown([header, *rows], left=2)


def idle_verdict(results: Sequence[IdleResult]) -> str:
    ours = next((r for r in results if r.target == REFERENCE), None)
    if ours is None:
        return f"({REFERENCE} not measured)"
    met = "met" if ours.per_connection_kb <= IDLE_GOAL_KB else "NOT met"
    return (
        f"{REFERENCE}: {ours.per_connection_kb:.1f} KB per idle connection; issue 5's goal"
        f" <= {IDLE_GOAL_KB:g} KB: {met}"
    )


def _mb(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def reaction_table(summaries: Sequence[ReactionSummary], peers: Sequence[str]) -> str:
    """The guard's reaction per offered rate; the peers have no guard to measure."""
    header = (
        "target",
        "offered req/s",
        "sent req/s",
        "repeats",
        "rollback ms median",
        "rollback ms max",
        "failed median",
        "failed max",
        "missed",
    )
    rows = [
        (
            s.target,
            f"{s.rate:,}",
            f"{s.sent_median:,.0f}",
            str(s.repeats),
            _ms(s.rollback_ms_median),
            _ms(s.rollback_ms_max),
            f"{s.failed_median:g}",
            str(s.failed_max),
            str(s.missed),
        )
        for s in summaries
    ]
    rows += [(name, "n/a (no guard)", "—", "—", "—", "—", "—", "—", "—") for name in peers]
    return _markdown([header, *rows])


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def write_json(path: Path, payload: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


# --- the chart -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ChartData:
    throughput: Mapping[str, Sequence[Summary]]  # scenario name -> its table
    idle: Sequence[IdleResult]
    reaction: Sequence[ReactionSummary]


def write_chart(path: Path, data: ChartData) -> str:
    """Four panels: req/s and p99 per scenario and target, idle KB/conn, the guard's reaction.

    `make bench` installs matplotlib (the `bench` extra); run directly without it, the chart
    is skipped with a note.
    """
    if importlib.util.find_spec("matplotlib") is None:
        return "chart skipped: matplotlib is not installed (`make bench` installs it)"
    _draw(path, data)
    return f"chart: {path}"


def _draw(path: Path, data: ChartData) -> None:
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    figure, axes = pyplot.subplots(2, 2, figsize=(13, 8.5))
    _grouped_bars(axes[0][0], data.throughput, "requests_per_second", "req/s (median of rounds)")
    axes[0][0].set_title("throughput per scenario (higher is better)", fontsize="small")
    _grouped_bars(axes[0][1], data.throughput, "p99_ms", "p99 latency, ms (median of rounds)")
    axes[0][1].set_title("p99 latency per scenario (lower is better)", fontsize="small")
    _idle_panel(axes[1][0], data.idle)
    _reaction_panel(axes[1][1], data.reaction)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _grouped_bars(
    axes: Any, tables: Mapping[str, Sequence[Summary]], field: str, label: str
) -> None:
    axes.set_ylabel(label)
    if not tables:
        _empty(axes)
        return
    targets = list(dict.fromkeys(s.target for rows in tables.values() for s in rows))
    width = 0.8 / max(len(targets), 1)
    for index, target in enumerate(targets):
        values = [_value_of(rows, target, field) for rows in tables.values()]
        offsets = [group + index * width for group in range(len(tables))]
        axes.bar(offsets, values, width, label=target, color=_color(target))
    axes.set_xticks([group + 0.4 - width / 2 for group in range(len(tables))], list(tables))
    axes.legend(fontsize="small")


def _value_of(rows: Sequence[Summary], target: str, field: str) -> float:
    found = next((s for s in rows if s.target == target), None)
    return 0.0 if found is None else float(getattr(found, field))


def _idle_panel(axes: Any, results: Sequence[IdleResult]) -> None:
    axes.set_ylabel("RSS per idle keep-alive connection, KB")
    if not results:
        _empty(axes)
        return
    names = [r.target for r in results]
    values = [r.per_connection_kb for r in results]
    bars = axes.bar(names, values, color=[_color(name) for name in names])
    axes.bar_label(bars, fmt="%.1f")
    goal = f"goal for {REFERENCE}: {IDLE_GOAL_KB:g} KB"
    axes.axhline(IDLE_GOAL_KB, color="black", linestyle="--", linewidth=1, label=goal)
    count = results[0].connections
    axes.set_title(f"{count:,} idle clients, (RSS after - before) / {count:,}", fontsize="small")
    axes.legend(fontsize="small")


def _reaction_panel(axes: Any, summaries: Sequence[ReactionSummary]) -> None:
    axes.set_ylabel("T0 to rollback, ms (bar: median, line: max)")
    measured = [s for s in summaries if s.rollback_ms_median is not None]
    if not measured:
        _empty(axes)
        return
    names = [f"{s.rate:,} req/s" for s in measured]
    medians = [s.rollback_ms_median or 0.0 for s in measured]
    spans = [(s.rollback_ms_max or 0.0) - (s.rollback_ms_median or 0.0) for s in measured]
    errors = [[0.0] * len(spans), spans]
    bars = axes.bar(names, medians, color=_color(REFERENCE), yerr=errors, capsize=6)
    labels = [f"failed {s.failed_median:g} (max {s.failed_max})" for s in measured]
    axes.bar_label(bars, labels=labels, label_type="center", fontsize="small")
    axes.set_title(
        f"canary-proxy's guard ({measured[0].repeats} repeats; nginx, HAProxy: no guard)",
        fontsize="small",
    )


_COLORS: Final = {"direct": "C0", REFERENCE: "C1", "nginx": "C2", "haproxy": "C3"}


def _color(target: str) -> str:
    """The same colour for a target in every panel."""
    return _COLORS.get(target, "C7")


def _empty(axes: Any) -> None:
    axes.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axes.transAxes)
