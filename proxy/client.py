"""The admin client behind `canary-proxy status|reload|promote|abort|pause|resume|retry|set-weight`.

Plain blocking HTTP (urllib): one request per command, readable output, one line per error.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Final

DEFAULT_ADMIN: Final = "http://127.0.0.1:9901"
TIMEOUT_SECONDS: Final = 10.0


class AdminError(Exception):
    """The admin API could not be reached, or it refused the call (message is for the user).

    A refused config (`400` with `{"errors": [...]}`) also has its problems, one `path: message`
    line each, in `problems`.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


def call(
    admin: str,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: Mapping[str, object] | None = None,
) -> dict[str, object]:
    url = admin.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return _document(response.read())
    except urllib.error.HTTPError as error:
        document = _document(error.read())
        message = f"{error.code}: {_message(document) or error.reason}"
        raise AdminError(message, _problems(document)) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise AdminError(f"cannot reach the admin API at {admin}: {reason}") from None


def _document(raw: bytes) -> dict[str, object]:
    try:
        document = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw.decode("utf-8", "replace").strip()[:200]}
    return document if isinstance(document, dict) else {"value": document}


def _message(document: Mapping[str, object]) -> str:
    problems = _problems(document)
    if problems:
        return "; ".join(problems)
    error = document.get("error")
    return str(error) if error is not None else ""


def _problems(document: Mapping[str, object]) -> list[str]:
    """The config problems of a `{"errors": [{"path", "message"}]}` answer, as `check` prints
    them: `path: message`, or the message alone for one about the whole file."""
    errors = document.get("errors")
    if not isinstance(errors, list):
        return []
    problems = []
    for error in errors:
        if isinstance(error, dict):
            path, message = error.get("path"), error.get("message")
            problems.append(f"{path}: {message}" if path else str(message))
    return problems


def format_reload(document: Mapping[str, object]) -> str:
    """What a successful `POST /reload` changed, in one line."""
    parts = []
    routes = document.get("routes")
    for change in ("added", "removed", "changed"):
        names = routes.get(change) if isinstance(routes, dict) else None
        if isinstance(names, list) and names:
            parts.append(f"routes {change}: {', '.join(str(name) for name in names)}")
    settings = document.get("settings")
    if isinstance(settings, list) and settings:
        parts.append(f"settings changed: {', '.join(str(name) for name in settings)}")
    summary = "; ".join(parts) or "nothing changed"
    return f"reloaded, generation {document.get('generation')}: {summary}"


def route_path(route: str, verb: str = "") -> str:
    quoted = urllib.parse.quote(route, safe="")
    return f"/routes/{quoted}" + (f"/{verb}" if verb else "")


def format_status(routes: Sequence[Mapping[str, object]]) -> str:
    """A table: one row per route, the columns an operator looks at first (in a fleet, the
    canary errors in the fleet's window too)."""
    fleet = any(route.get("fleet_window") is not None for route in routes)
    header = ("ROUTE", "STATE", "WEIGHT", "STEP", "REVISION", "CANARY ERR")
    rows = [(*header, *(("FLEET ERR",) if fleet else ()), "REASON")]
    for route in routes:
        rows.append(
            (
                str(route.get("name", "")),
                str(route.get("state", "")),
                f"{float(str(route.get('weight', 0))):g}%",
                _step(route.get("step")),
                str(route.get("revision") or "-"),
                _canary_errors(route.get("window")),
                *((_canary_errors(route.get("fleet_window")),) if fleet else ()),
                str(route.get("reason") or ""),
            )
        )
    return _table(rows)


def format_cluster(cluster: Mapping[str, object], now: float) -> str:
    """The fleet as this replica sees it: its Redis link, and each replica with when it was
    last heard from (`now`: wall clock) and the rollout version it applied per route."""
    link = "connected" if cluster.get("connected") else "NOT CONNECTED to Redis (degraded)"
    lease = ", holds the ramp lease" if cluster.get("ramp_lease") else ""
    lines = [
        f"cluster {cluster.get('name')}: {link} (this replica: {cluster.get('replica')}{lease})"
    ]
    replicas = cluster.get("replicas")
    rows: list[tuple[str, ...]] = [("REPLICA", "LAST SEEN", "APPLIED")]
    for replica in replicas if isinstance(replicas, list) else []:
        seen = replica.get("last_seen")
        applied = replica.get("applied_version")
        rows.append(
            (
                str(replica.get("id")),
                f"{max(0.0, now - seen):.1f}s ago" if isinstance(seen, int | float) else "-",
                " ".join(f"{k}={v}" for k, v in sorted(applied.items()))
                if isinstance(applied, dict) and applied
                else "-",
            )
        )
    return "\n".join([*lines, _table(rows)])


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last one (free text) is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _step(step: object) -> str:
    if isinstance(step, dict):
        # The API's index counts from 0; people (and the log, and the events) count from 1.
        index = step.get("index", 0)
        position = index + 1 if isinstance(index, int) else index
        return f"{position}/{step.get('count', 0)}"
    return "-" if step is None else str(step)


def _canary_errors(window: object) -> str:
    if not isinstance(window, dict):
        return "-"
    canary = window.get("canary")
    if not isinstance(canary, dict):
        return "-"
    requests = canary.get("requests", 0)
    errors = canary.get("errors", 0)
    return f"{errors}/{requests}"
