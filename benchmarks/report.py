"""Medians of the rounds, the side-by-side table, the JSON file and the optional PNG chart."""

from __future__ import annotations

import importlib
import importlib.util
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from wrk import WrkReport

REFERENCE: Final = "canary-proxy"  # every ratio is against this target
_COLUMNS: Final = ("target", "req/s", "p50 ms", "p99 ms", "sock err", "non-2xx", "÷ canary-proxy")


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


def summarise(target: str, reports: Sequence[WrkReport]) -> Summary:
    return Summary(
        target=target,
        rounds=len(reports),
        requests_per_second=statistics.median(r.requests_per_second for r in reports),
        p50_ms=statistics.median(r.p50_ms for r in reports),
        p99_ms=statistics.median(r.p99_ms for r in reports),
        requests=sum(r.requests for r in reports),
        socket_errors=sum(r.socket_errors.total for r in reports),
        non_2xx=sum(r.non_2xx for r in reports),
    )


def table(summaries: Sequence[Summary]) -> str:
    """A Markdown table, so the same text goes to the terminal and to the README."""
    reference = _reference_rate(summaries)
    rows = [_COLUMNS, *(_row(summary, reference) for summary in summaries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    lines = [_markdown_line(row, widths) for row in rows]
    return "\n".join([lines[0], rule, *lines[1:]])


def _row(summary: Summary, reference: float | None) -> tuple[str, ...]:
    ratio = "—" if not reference else f"{summary.requests_per_second / reference:.2f}"
    return (
        summary.target,
        f"{summary.requests_per_second:,.0f}",
        f"{summary.p50_ms:.2f}",
        f"{summary.p99_ms:.2f}",
        str(summary.socket_errors),
        str(summary.non_2xx),
        ratio,
    )


def _markdown_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    aligned = [
        cell.ljust(width) if i == 0 else cell.rjust(width)
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


def write_json(path: Path, payload: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_chart(path: Path, tables: Mapping[str, Sequence[Summary]]) -> str:
    """A grouped bar chart of req/s if matplotlib is installed; says what it did either way."""
    if importlib.util.find_spec("matplotlib") is None:
        return "chart skipped: matplotlib is not installed (it is optional)"
    _draw(path, tables)
    return f"chart: {path}"


def _draw(path: Path, tables: Mapping[str, Sequence[Summary]]) -> None:
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    figure, axes = pyplot.subplots(figsize=(8, 4.5))
    targets = list(dict.fromkeys(s.target for rows in tables.values() for s in rows))
    width = 0.8 / max(len(targets), 1)
    for index, target in enumerate(targets):
        rates = [_rate_of(rows, target) for rows in tables.values()]
        offsets = [group + index * width for group in range(len(tables))]
        axes.bar(offsets, rates, width, label=target)
    axes.set_xticks([group + 0.4 - width / 2 for group in range(len(tables))], list(tables))
    axes.set_ylabel("req/s (median of rounds)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _rate_of(rows: Sequence[Summary], target: str) -> float:
    return next((s.requests_per_second for s in rows if s.target == target), 0.0)
