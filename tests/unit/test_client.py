"""The CLI's status table, from the admin API's route documents."""

from __future__ import annotations

from proxy.client import format_status


def route(**fields: object) -> dict[str, object]:
    document: dict[str, object] = {
        "name": "shop",
        "state": "progressing",
        "weight": 25.0,
        "revision": "v2",
        "reason": "advanced to step 2/4 (25 %)",
        "step": {"index": 1, "count": 4},
        "window": None,
    }
    document.update(fields)
    return document


def test_the_step_column_counts_from_one_like_the_events() -> None:
    table = format_status([route()])
    header, row = table.splitlines()
    assert header.split()[:5] == ["ROUTE", "STATE", "WEIGHT", "STEP", "REVISION"]
    assert row.split()[:5] == ["shop", "progressing", "25%", "2/4", "v2"]


def test_the_last_step_of_a_promoted_ramp_reads_4_of_4() -> None:
    row = format_status([route(state="promoted", weight=100.0, step={"index": 3, "count": 4})])
    assert row.splitlines()[1].split()[:4] == ["shop", "promoted", "100%", "4/4"]


def test_a_route_without_a_ramp_shows_a_dash_for_its_step() -> None:
    row = format_status([route(state="steady", step=None, reason="")]).splitlines()[1]
    assert row.split()[3] == "-"
