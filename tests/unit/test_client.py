"""The CLI's status table, from the admin API's route documents."""

from __future__ import annotations

from proxy.client import format_cluster, format_status


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


def test_in_a_fleet_the_table_adds_the_fleets_canary_errors_before_the_reason() -> None:
    fleet_window = {
        "stable": {"requests": 90, "errors": 0},
        "canary": {"requests": 36, "errors": 4},
    }
    window = {"stable": {"requests": 30, "errors": 0}, "canary": {"requests": 12, "errors": 1}}
    header, row = format_status([route(window=window, fleet_window=fleet_window)]).splitlines()
    assert header.split()[5:9] == ["CANARY", "ERR", "FLEET", "ERR"]
    assert row.split()[5:7] == ["1/12", "4/36"]
    assert row.endswith("advanced to step 2/4 (25 %)")


def test_the_fleet_lists_each_replica_with_when_it_was_heard_from_and_what_it_applied() -> None:
    cluster = {
        "name": "shop-edge",
        "replica": "a",
        "connected": True,
        "ramp_lease": True,
        "replicas": [
            {"id": "a", "last_seen": 99.5, "applied_version": {"shop": 4, "api": 2}},
            {"id": "b", "last_seen": 91.0, "applied_version": {}},
        ],
    }
    lines = format_cluster(cluster, now=100.0).splitlines()
    assert lines[0] == "cluster shop-edge: connected (this replica: a, holds the ramp lease)"
    assert lines[1].split() == ["REPLICA", "LAST", "SEEN", "APPLIED"]
    assert lines[2].split() == ["a", "0.5s", "ago", "api=2", "shop=4"]
    assert lines[3].split() == ["b", "9.0s", "ago", "-"]


def test_a_replica_cut_off_from_redis_says_so() -> None:
    cluster = {"name": "e", "replica": "a", "connected": False, "replicas": [{"id": "a"}]}
    lines = format_cluster(cluster, now=1.0).splitlines()
    assert "NOT CONNECTED" in lines[0]
    assert lines[2].split() == ["a", "-", "-"]
