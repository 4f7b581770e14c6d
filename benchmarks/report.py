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
from targets import TIMES
from wrk import WrkReport

REFERENCE: Final = "canary-proxy"  # every ratio is against this target (at the same N)
_COLUMNS: Final = (
    "target",
    "req/s",
    "p50 ms",
    "p99 ms",
    "sock err",
    "non-2xx",
    "CPU %",
    "÷ canary-proxy",
)
_OPENS_COLUMN: Final = "conn/req"  # newconn: TCP connects per request (host-wide counter)


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """One target in one scenario: medians over the rounds, error counts summed over them."""

    target: str  # the row's name: `nginx`, or `nginx x2` in a run of several worker counts
    rounds: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    socket_errors: int
    non_2xx: int
    opens_per_request: float | None = None  # newconn only: TCP connects / requests
    name: str = ""  # the target without its count: direct, canary-proxy, nginx, haproxy
    workers: int | None = None  # a proxy's worker processes (threads for HAProxy); direct: None
    cpu_percent: float | None = None  # CPU time of its process group / wall time (100 = a core)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.target)


def summarise(
    target: str, reports: Sequence[WrkReport], *, name: str = "", workers: int | None = None
) -> Summary:
    opens = [r.tcp_opens for r in reports]
    requests = sum(r.requests for r in reports)
    counted = [n for n in opens if n is not None]
    per_request = sum(counted) / requests if requests and len(counted) == len(opens) else None
    cpu = [r.cpu_percent for r in reports if r.cpu_percent is not None]
    return Summary(
        target=target,
        name=name or target,
        workers=workers,
        cpu_percent=statistics.median(cpu) if cpu else None,
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
    """A Markdown table, so the same text goes to the terminal and to the README.

    Each row's ratio is to canary-proxy at the row's worker count; direct (no workers) gets
    one ratio per count, `4.99 / 2.80` for x1 / x2.
    """
    references = _reference_rates(summaries)
    opens = any(summary.opens_per_request is not None for summary in summaries)
    ratio_column = _COLUMNS[-1] + (f" {TIMES}N" if len(references) > 1 else "")
    header = (*_COLUMNS[:-1], *([_OPENS_COLUMN] if opens else []), ratio_column)
    return _markdown([header, *(_row(summary, references, opens) for summary in summaries)])


def _row(summary: Summary, references: Mapping[int, float], opens: bool) -> tuple[str, ...]:
    cells = [
        summary.target,
        f"{summary.requests_per_second:,.0f}",
        f"{summary.p50_ms:.2f}",
        f"{summary.p99_ms:.2f}",
        str(summary.socket_errors),
        str(summary.non_2xx),
        "—" if summary.cpu_percent is None else f"{summary.cpu_percent:.0f}",
    ]
    if opens:
        per_request = summary.opens_per_request
        cells.append("—" if per_request is None else f"{per_request:.2f}")
    return (*cells, _ratio(summary, references))


def _ratio(summary: Summary, references: Mapping[int, float]) -> str:
    if summary.workers is None:  # direct: against canary-proxy at every count
        rates = [rate for _, rate in sorted(references.items())]
    else:
        rates = [references.get(summary.workers, 0.0)]
    if not rates or not all(rates):
        return "—"
    return " / ".join(f"{summary.requests_per_second / rate:.2f}" for rate in rates)


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
    """canary-proxy's req/s as a multiple of each peer's, e.g. `canary-proxy = 0.81 x direct`;
    with several worker counts, one line per count (peers at the same count, and direct), then
    how each target's req/s grew from the smallest count."""
    counts = sorted({s.workers for s in summaries if s.workers is not None})
    if not counts:
        return _verdict_at(summaries, None)
    lines = [_verdict_at(summaries, count) for count in counts]
    if len(counts) > 1:
        lines.append(_scaling(summaries, counts))
    return "\n".join(lines)


def _verdict_at(summaries: Sequence[Summary], workers: int | None) -> str:
    ours = next((s for s in summaries if s.name == REFERENCE and s.workers == workers), None)
    peers = [
        s
        for s in summaries
        if s.name != REFERENCE and s.workers in (workers, None) and s.requests_per_second > 0
    ]
    if ours is None or not ours.requests_per_second or not peers:
        return f"({REFERENCE} or its peers not measured: no ratios)"
    reference = ours.requests_per_second
    parts = [f"{reference / peer.requests_per_second:.2f} x {peer.target}" for peer in peers]
    return f"{ours.target} req/s = " + ", ".join(parts)


def _scaling(summaries: Sequence[Summary], counts: Sequence[int]) -> str:
    """`req/s x2 ÷ x1: canary-proxy 1.60, nginx 1.85, haproxy 1.72`."""
    base, parts = counts[0], []
    for count in counts[1:]:
        ratios = []
        for name in dict.fromkeys(s.name for s in summaries if s.workers is not None):
            low = _rate_of(summaries, name, base)
            high = _rate_of(summaries, name, count)
            if low and high is not None:
                ratios.append(f"{name} {high / low:.2f}")
        parts.append(f"req/s {TIMES}{count} ÷ {TIMES}{base}: " + (", ".join(ratios) or "—"))
    return "\n".join(parts)


def _rate_of(summaries: Sequence[Summary], name: str, workers: int) -> float | None:
    found = next((s for s in summaries if s.name == name and s.workers == workers), None)
    return None if found is None else found.requests_per_second


def _reference_rates(summaries: Sequence[Summary]) -> dict[int, float]:
    """canary-proxy's req/s per worker count (direct's None never is one)."""
    return {
        s.workers if s.workers is not None else 1: s.requests_per_second
        for s in summaries
        if s.name == REFERENCE
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerBalance:
    """How canary-proxy xN shared the work among its worker processes, in one scenario."""

    target: str
    requests: tuple[int, ...]  # per worker slot, from its admin `GET /status` (whole scenario)
    restarts: tuple[int, ...]  # per worker slot
    cpu_percent_supervisor: float | None  # median over the measured runs
    cpu_percent_workers: tuple[float, ...]  # per worker process, median over the measured runs


def balance_line(balance: WorkerBalance) -> str:
    total = sum(balance.requests)
    shares = " / ".join(f"{100 * n / total:.0f} %" for n in balance.requests) if total else "—"
    cpu = " / ".join(f"{p:.0f} %" for p in balance.cpu_percent_workers) or "—"
    supervisor = balance.cpu_percent_supervisor
    return (
        f"{balance.target} workers: requests {shares} (of {total:,}, warm-ups included),"
        f" restarts {'/'.join(str(n) for n in balance.restarts) or '—'};"
        f" CPU per worker {cpu}, supervisor {'—' if supervisor is None else f'{supervisor:.0f} %'}"
    )


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
    """Issue 5's goal, for canary-proxy at each worker count measured."""
    ours = [r for r in results if r.target.split(f" {TIMES}")[0] == REFERENCE]
    if not ours:
        return f"({REFERENCE} not measured)"
    return "\n".join(
        f"{r.target}: {r.per_connection_kb:.1f} KB per idle connection; issue 5's goal"
        f" <= {IDLE_GOAL_KB:g} KB: {'met' if r.per_connection_kb <= IDLE_GOAL_KB else 'NOT met'}"
        for r in ours
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
    bars = len({s.target for rows in data.throughput.values() for s in rows})
    figure, axes = pyplot.subplots(2, 2, figsize=(13 if bars <= 4 else 16, 8.5))
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
    # One bar per row of the tables: x1 rows solid, xN rows in the same colour, hatched.
    rows = {s.target: s for table_rows in tables.values() for s in table_rows}
    width = 0.8 / max(len(rows), 1)
    for index, (target, summary) in enumerate(rows.items()):
        values = [_value_of(table_rows, target, field) for table_rows in tables.values()]
        offsets = [group + index * width for group in range(len(tables))]
        axes.bar(offsets, values, width, label=target, **_style(summary.name, summary.workers))
    axes.set_xticks([group + 0.4 - width / 2 for group in range(len(tables))], list(tables))
    if len(rows) > 4:  # room above the bars for a two-column legend
        axes.set_ylim(top=axes.get_ylim()[1] * 1.3)
    axes.legend(fontsize="small", ncol=2 if len(rows) > 4 else 1)


def _value_of(rows: Sequence[Summary], target: str, field: str) -> float:
    found = next((s for s in rows if s.target == target), None)
    return 0.0 if found is None else float(getattr(found, field))


def _idle_panel(axes: Any, results: Sequence[IdleResult]) -> None:
    axes.set_ylabel("RSS per idle keep-alive connection, KB")
    if not results:
        _empty(axes)
        return
    for result in results:
        style = _style(result.target.split(f" {TIMES}")[0], result.workers)
        bars = axes.bar([result.target], [result.per_connection_kb], **style)
        axes.bar_label(bars, fmt="%.1f")
    if len(results) > 4:  # long row names would overlap
        axes.tick_params(axis="x", labelsize="small", labelrotation=20)
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
    several = len({s.workers for s in measured}) > 1
    names = [f"{s.rate:,} req/s" + (f"\n{TIMES}{s.workers}" if several else "") for s in measured]
    medians = [s.rollback_ms_median or 0.0 for s in measured]
    spans = [(s.rollback_ms_max or 0.0) - (s.rollback_ms_median or 0.0) for s in measured]
    errors = [[0.0] * len(spans), spans]
    bars = axes.bar(names, medians, color=_color(REFERENCE), yerr=errors, capsize=6)
    for bar, summary in zip(bars, measured, strict=True):
        bar.set_hatch(_style(REFERENCE, summary.workers)["hatch"])
        bar.set_edgecolor("white")
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


def _style(name: str, workers: int | None) -> dict[str, str]:
    """A target's colour; hatched when it ran more than one worker."""
    hatch = "//" if workers is not None and workers > 1 else ""
    return {"color": _color(name), "hatch": hatch, "edgecolor": "white"}


def _empty(axes: Any) -> None:
    axes.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axes.transAxes)
