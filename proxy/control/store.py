"""Persistence in `state_dir`: the rollout state of every route (one JSON document, replaced
atomically) and the audit log (`audit.jsonl`, one JSON object per event, appended and synced).

A decision is written here before anything reports it, so a rollback is never forgotten by a
restart — not even after `kill -9`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final

log = logging.getLogger("canary_proxy")

STATE_FILE: Final = "state.json"
AUDIT_FILE: Final = "audit.jsonl"
STATE_FORMAT: Final = 1


class StateStore:
    """Reads and writes the files in one `state_dir`."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.state_path = os.path.join(state_dir, STATE_FILE)
        self.audit_path = os.path.join(state_dir, AUDIT_FILE)

    def ensure(self) -> None:
        """Create the folder, and fail early (at start, not at the first rollback) if it is
        not writable."""
        os.makedirs(self.state_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.state_dir, prefix=".probe-"):
            pass

    def load(self) -> dict[str, Mapping[str, object]]:
        """Saved route records by route name; a missing file is an empty store."""
        try:
            with open(self.state_path, encoding="utf-8") as handle:
                document = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.error("cannot read %s (%s); starting from the config", self.state_path, error)
            return {}
        routes = document.get("routes") if isinstance(document, dict) else None
        if not isinstance(routes, dict):
            log.error("%s has no routes mapping; starting from the config", self.state_path)
            return {}
        return {str(name): record for name, record in routes.items() if isinstance(record, dict)}

    def save(self, routes: Mapping[str, Mapping[str, object]]) -> None:
        document = {"format": STATE_FORMAT, "routes": dict(routes)}
        write_atomically(self.state_path, json.dumps(document, indent=2, sort_keys=True) + "\n")

    def append(self, events: Iterable[Mapping[str, object]]) -> None:
        lines = "".join(json.dumps(dict(e), sort_keys=True) + "\n" for e in events)
        if not lines:
            return
        with open(self.audit_path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def recent(self, limit: int) -> list[dict[str, object]]:
        """The last `limit` audit events, oldest first; unreadable lines are skipped."""
        try:
            with open(self.audit_path, encoding="utf-8") as handle:
                tail = deque(handle, maxlen=limit)
        except FileNotFoundError:
            return []
        events = []
        for line in tail:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def write_atomically(path: str, text: str) -> None:
    """Temp file in the same folder, fsync, rename over the old file, fsync the folder: a
    reader (or a crash) sees the old document or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if os.path.exists(path):
            os.chmod(temp, os.stat(path).st_mode & 0o777)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
