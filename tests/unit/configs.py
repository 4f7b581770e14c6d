"""Small valid configs (as parsed YAML) that the unit tests build on."""

from __future__ import annotations

from typing import Any

from proxy.core.config import Config, parse_config


def minimal() -> dict[str, Any]:
    """The smallest valid config: one route with one stable upstream."""
    return {"routes": [{"name": "shop", "stable": {"upstreams": ["http://10.0.0.1:8000"]}}]}


def with_canary(**route: Any) -> dict[str, Any]:
    """A valid config whose route has a canary, plus the given route fields."""
    data = minimal()
    data["routes"][0]["canary"] = {"upstreams": ["http://10.0.1.1:8000"], "revision": "v2"}
    data["routes"][0].update(route)
    return data


def guarded(listen: str | None = None, /, **route: object) -> Config:
    """A parsed config whose route `shop` has a canary at 10 % and a guard (min 20 requests,
    max error rate 5 %), plus the given route fields."""
    base: dict[str, object] = {
        "name": "shop",
        "stable": {"upstreams": ["http://127.0.0.1:9001"]},
        "canary": {"upstreams": ["http://127.0.0.1:9002"], "revision": "v2"},
        "split": {"weight": 10},
        "guard": {"window": "10s", "min_requests": 20, "max_error_rate": 0.05},
    }
    base.update(route)
    data: dict[str, object] = {"routes": [base]}
    if listen is not None:
        data["listen"] = listen
    return parse_config(data, base_dir="/srv")
