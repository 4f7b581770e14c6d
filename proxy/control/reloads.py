"""Config reloads: one path for `POST /reload`, `PUT /config` and SIGHUP.

Parse and validate fully, build the complete new runtime, then swap one reference. A failure
at any step changes nothing and is counted; `PUT /config` writes the file atomically (temp
file, fsync, rename) before the swap, so the file on disk and the running config never
disagree.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.control.holder import Prepared, RuntimeHolder
from proxy.control.loader import load_config_file, parse_config_text
from proxy.control.store import write_atomically
from proxy.core.config import Config, ConfigError, ConfigProblem

log = logging.getLogger("canary_proxy")

Preparer = Callable[[Config], Callable[[], None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadResult:
    """What a successful reload changed, for the admin API's answer and the log."""

    generation: int
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    settings: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "routes": {
                "added": list(self.added),
                "removed": list(self.removed),
                "changed": list(self.changed),
            },
            "settings": list(self.settings),
        }


class Reloader:
    """Applies a new config to a running proxy, all or nothing."""

    def __init__(self, holder: RuntimeHolder, config_path: str | None) -> None:
        self.holder = holder
        self.config_path = config_path
        self._preparers: list[Preparer] = []

    def add_preparer(self, preparer: Preparer) -> None:
        """Another part of the proxy that must accept a config too: it may refuse it with a
        ConfigError, or return a commit step that runs only once the swap is done."""
        self._preparers.append(preparer)

    def reload_file(self) -> ReloadResult:
        """Re-read the config file; raises ConfigError (and counts it) if it is invalid."""
        if self.config_path is None:
            raise self._failed(ConfigError((ConfigProblem(path="", message="no config file"),)))
        try:
            config = load_config_file(self.config_path)
        except ConfigError as error:
            raise self._failed(error) from None
        return self._apply(config)

    def replace_config(self, text: str, content_type: str) -> ReloadResult:
        """Apply a config sent over the API, then make it the file on disk, atomically."""
        base_dir = os.path.dirname(os.path.abspath(self.config_path or "proxy.yaml"))
        try:
            config = parse_config_text(text, base_dir=base_dir, content_type=content_type)
            commits, built = self._accept(config)
        except ConfigError as error:
            raise self._failed(error) from None
        if self.config_path is not None:
            try:
                write_atomically(self.config_path, text)
            except OSError as error:
                self.holder.outcomes.reload_failed()
                raise error
        return self._swap(config, commits, built)

    def _apply(self, config: Config) -> ReloadResult:
        try:
            commits, built = self._accept(config)
        except ConfigError as error:
            raise self._failed(error) from None
        return self._swap(config, commits, built)

    def _accept(self, config: Config) -> tuple[list[Callable[[], None]], Prepared]:
        """Everything that can fail, before anything changes: restart-only fields, the
        preparers, and building the complete runtime."""
        self._check_restart_only(config)
        commits = [prepare(config) for prepare in self._preparers]
        try:
            built = self.holder.prepare(config)
        except Exception as error:  # a config the parser accepted but the runtime cannot use
            log.exception("building the runtime for the new config failed")
            problem = ConfigProblem(path="", message=f"cannot build the runtime: {error}")
            raise ConfigError((problem,)) from None
        return commits, built

    def _swap(
        self, config: Config, commits: list[Callable[[], None]], built: Prepared
    ) -> ReloadResult:
        old = self.holder.current.config
        self.holder.install(built)
        for commit in commits:
            commit()
        self.holder.outcomes.reload_succeeded()
        result = describe(old, config, self.holder.current.generation)
        log.info("config reloaded: %s", result.as_dict())
        return result

    def _check_restart_only(self, config: Config) -> None:
        """Listeners are bound once; changing them needs a restart, not a reload."""
        current = self.holder.current.config
        problems = []
        if config.listen != current.listen:
            problems.append(
                ConfigProblem(path="listen", message="changing the listen address needs a restart")
            )
        if config.workers != current.workers:
            problems.append(
                ConfigProblem(path="workers", message="changing the worker count needs a restart")
            )
        if config.state_dir != current.state_dir:
            problems.append(
                ConfigProblem(path="state_dir", message="changing state_dir needs a restart")
            )
        if config.cluster != current.cluster:
            problems.append(
                ConfigProblem(path="cluster", message="changing the cluster needs a restart")
            )
        if config.admin.listen != current.admin.listen:
            problems.append(
                ConfigProblem(
                    path="admin.listen", message="changing the admin address needs a restart"
                )
            )
        if problems:
            raise ConfigError(tuple(problems))

    def _failed(self, error: ConfigError) -> ConfigError:
        self.holder.outcomes.reload_failed()
        log.warning("config reload refused; the running config is unchanged:\n%s", error)
        return error


def describe(old: Config, new: Config, generation: int) -> ReloadResult:
    before = {route.name: route for route in old.routes}
    after = {route.name: route for route in new.routes}
    settings = tuple(
        name
        for name in ("state_dir", "timeouts", "limits", "admin")
        if getattr(old, name) != getattr(new, name)
    )
    return ReloadResult(
        generation=generation,
        added=tuple(name for name in after if name not in before),
        removed=tuple(name for name in before if name not in after),
        changed=tuple(name for name in after if name in before and before[name] != after[name]),
        settings=settings,
    )
