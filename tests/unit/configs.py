"""Small valid configs (as parsed YAML) that the unit tests build on."""

from __future__ import annotations

from typing import Any


def minimal() -> dict[str, Any]:
    """The smallest valid config: one route with one stable upstream."""
    return {"routes": [{"name": "shop", "stable": {"upstreams": ["http://10.0.0.1:8000"]}}]}


def with_canary(**route: Any) -> dict[str, Any]:
    """A valid config whose route has a canary, plus the given route fields."""
    data = minimal()
    data["routes"][0]["canary"] = {"upstreams": ["http://10.0.1.1:8000"], "revision": "v2"}
    data["routes"][0].update(route)
    return data
