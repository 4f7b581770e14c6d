"""The running proxy: the data plane, the admin listener and the signals, started and stopped
together.

SIGHUP reloads the config file (the same path as `POST /reload`). SIGTERM and SIGINT flip
readiness, stop accepting, answer in-flight keep-alive requests with `Connection: close`, drain
for `timeouts.shutdown` at most, then return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from proxy.control.admin import AdminSetupError, AdminState, check_exposure, create_app, load_token
from proxy.control.exposition import ProxyCollector, build_registry
from proxy.control.fleet import Fleet, FleetCollector, SeededStore, replica_id
from proxy.control.holder import RuntimeHolder
from proxy.control.reloads import Reloader
from proxy.control.store import StateStore
from proxy.control.supervisor import WorkerPool
from proxy.core.config import Config, ConfigError, ConfigProblem
from proxy.dataplane.server import Server

log = logging.getLogger("canary_proxy")


class Proxy:
    """Owns the data plane and the admin app: the data plane is this process's server, or
    (`workers` > 1) worker processes it supervises (proxy.control.supervisor)."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None,
        workers: int = 1,
        fleet: Fleet | None = None,
    ) -> None:
        """`fleet`: this replica's link to the others (config.cluster), with the fleet's route
        states it read before serving (`Fleet.seed`)."""
        self.config = config
        self.workers = workers
        self.fleet = fleet
        self.token = load_token(config.admin)
        check_exposure(config.admin, self.token)
        self.store = (
            StateStore(config.state_dir) if fleet is None else SeededStore(config.state_dir, fleet)
        )
        try:
            self.store.ensure()
        except OSError as error:
            raise AdminSetupError(
                f"state_dir: cannot write {config.state_dir}: {error.strerror}"
            ) from None
        self.holder = RuntimeHolder(config, store=self.store, pooled=fleet is not None)
        if fleet is not None:
            fleet.attach(self.holder.controller)
        self.reloader = Reloader(self.holder, config_path)
        self.server: Server | None = None
        self.pool: WorkerPool | None = None
        self.admin: AdminState | None = None
        self._admin_runner: web.AppRunner | None = None
        self.data_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None

    async def start(self) -> None:
        host, port, connections = await self._start_data_plane()
        collector = ProxyCollector(self.holder.outcomes, self.holder.route_views, connections)
        registry = build_registry(collector)
        if self.fleet is not None:
            registry.register(FleetCollector(self.fleet))
        self.admin = AdminState(
            holder=self.holder,
            reloader=self.reloader,
            registry=registry,
            token=self.token,
            workers=self.pool.status if self.pool is not None else None,
            settle=self._settle if self.pool is not None or self.fleet is not None else None,
            cluster=self.fleet.status if self.fleet is not None else None,
        )
        self.reloader.add_preparer(self._prepare_admin)
        self.holder.controller.start(self.holder.canary_stats)
        if self.fleet is not None:
            self.fleet.start()
        runner = web.AppRunner(
            create_app(self.admin), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        self._admin_runner = runner
        admin = self.config.admin.listen
        await web.TCPSite(runner, admin.host, admin.port).start()
        self.data_address = (host, port)
        self.admin_address = (admin.host, int(runner.addresses[0][1]))
        # Tests and supervisors read these lines to learn the bound ports when they are 0.
        routes = len(self.config.routes)
        log.info(
            "canary-proxy listening on %s:%d (%d route%s)",
            host,
            port,
            routes,
            "" if routes == 1 else "s",
        )
        log.info("admin API listening on %s:%d", *self.admin_address)
        log.info("data plane: %s", data_plane_build())

    async def _start_data_plane(self) -> tuple[str, int, Callable[[], int]]:
        listen = self.config.listen
        if self.workers > 1:
            self.pool = pool = WorkerPool(self.holder, self.workers)
            self.holder.controller.on_change = pool.states_changed
            self.reloader.add_preparer(lambda config: pool.config_changed)
            host, port = await pool.start(listen)
            log.info("%d workers listening (SO_REUSEPORT)", self.workers)
            return host, port, pool.connections
        self.server = server = Server(self.holder.plane, asyncio.get_running_loop())
        host, port = await server.start(listen.host, listen.port)
        return host, port, lambda: len(server.connections)

    async def _settle(self) -> None:
        """An admin answer means the change is in the fleet's Redis (while it answers) and
        live on every worker."""
        if self.fleet is not None:
            await self.fleet.settled()
        if self.pool is not None:
            await self.pool.settled()

    def _prepare_admin(self, config: Config) -> Callable[[], None]:
        """Re-read the admin token with every reload (rotation without a restart); a token
        source that cannot be read, or a listener left exposed, refuses the whole reload."""
        try:
            token = load_token(config.admin)
            check_exposure(config.admin, token)
        except AdminSetupError as error:
            path, _, message = str(error).partition(": ")
            raise ConfigError((ConfigProblem(path=path, message=message),)) from None

        def commit() -> None:
            if self.admin is not None:
                self.admin.token = token

        return commit

    def reload(self) -> None:
        with contextlib.suppress(ConfigError):  # already logged and counted
            self.reloader.reload_file()

    async def stop(self) -> None:
        drain = self.holder.current.config.timeouts.shutdown
        log.info("shutting down: draining for up to %.1fs", drain)
        if self.admin is not None:
            self.admin.draining = True
        if self.server is not None:
            await self.server.shutdown(drain)
        if self.pool is not None:
            await self.pool.stop(drain)
        await self.holder.controller.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        log.info("stopped")


def data_plane_build() -> str:
    """Whether the hot modules run compiled (a wheel, or `make compile`) or interpreted."""
    path = getattr(sys.modules[Server.__module__], "__file__", None) or ""
    if path.endswith(".so"):
        return "compiled with mypyc"
    return "interpreted (compile it for about 1.5x the throughput: see setup.py)"


# File descriptors besides the client connections: listeners, admin, state files, logs.
SPARE_FILES = 64


def raise_open_file_limit(max_connections: int) -> None:
    """Use the hard open-file limit (nginx `worker_rlimit_nofile`, HAProxy does it by itself),
    and warn when the connection cap cannot even fit in it: every client connection is a
    descriptor, and a busy one holds an upstream connection on top (headroom the warning
    leaves to the operator, so that a default config on a common 20 000 limit stays quiet)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    needed = max_connections + SPARE_FILES
    if needed > soft:
        log.warning(
            "limits.max_connections = %d needs at least %d open files, but the limit is %d: "
            "past it new connections fail to be accepted; raise the limit (ulimit -n) or "
            "lower max_connections",
            max_connections,
            needed,
            soft,
        )


async def serve(config: Config, *, config_path: str | None, workers: int = 1) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the config file."""
    raise_open_file_limit(config.limits.max_connections)
    fleet = None
    if config.cluster is not None:
        fleet = Fleet(config.cluster, replica_id(config))
        # The fleet's state before serving (a replica that restarts after kill -9 included).
        await fleet.seed(route.name for route in config.routes)
    try:
        proxy = Proxy(config, config_path=config_path, workers=workers, fleet=fleet)
    except BaseException:
        if fleet is not None:
            await fleet.client.aclose()  # Proxy.stop closes it once it owns it
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Installed before starting: a SIGTERM while workers start is a graceful stop, not a death.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await proxy.start()
        loop.add_signal_handler(signal.SIGHUP, proxy.reload)
        await stop.wait()
    finally:
        await proxy.stop()
