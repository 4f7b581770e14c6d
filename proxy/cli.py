"""The `canary-proxy` command: run, check, demo, and the admin client (status, reload, verbs).

Exit codes: 0 success, 2 invalid config or usage, 1 runtime failure. Errors are one line each,
never a traceback, unless `--debug`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final

from proxy.client import DEFAULT_ADMIN
from proxy.control.loader import format_problems, load_config_file
from proxy.core.config import MAX_WORKERS, Config, ConfigError

EXIT_OK: Final = 0
EXIT_RUNTIME: Final = 1
EXIT_CONFIG: Final = 2
DEFAULT_CONFIG: Final = "config/proxy.yaml"

log = logging.getLogger("canary_proxy")


def _default_config_path() -> str:
    return os.environ.get("CANARY_PROXY_CONFIG") or DEFAULT_CONFIG


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary-proxy",
        description="HTTP reverse proxy with in-process canary routing and automatic rollback.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve traffic")
    run.add_argument(
        "--config",
        default=None,
        help=f"config file (default: $CANARY_PROXY_CONFIG or {DEFAULT_CONFIG})",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default=None,
        help="data plane processes (a number, or auto = one per CPU); default: the config's "
        "workers, 1",
    )
    worker = commands.add_parser("worker")  # started by `run --workers`, not by people
    worker.add_argument("--fd", type=int, required=True)
    worker.add_argument("--counters-fd", type=int, required=True)
    check = commands.add_parser("check", help="validate a config file and exit (like nginx -t)")
    check.add_argument("--config", default=None, help="config file to validate")
    commands.add_parser("schema", help="print the config file's JSON Schema (for editors)")
    demo = commands.add_parser(
        "demo", help="watch a canary ramp up, fail and be rolled back (self-contained)"
    )
    demo.add_argument(
        "--scenario",
        choices=("failing", "healthy", "fleet"),
        default="failing",
        help="failing: the canary breaks at 50 %% and is rolled back (default); "
        "healthy: it ramps to 100 %% and is promoted; fleet: three replicas share one rollout "
        "through Redis (needs redis-server), the canary fails behind one of them and all three "
        "roll back (--duration does not apply)",
    )
    demo.add_argument(
        "--duration",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="how long the story lasts; the ramp's pace follows (default 30)",
    )
    demo.add_argument(
        "--rate",
        type=_positive,
        default=200.0,
        metavar="REQ_PER_S",
        help="requests per second from the demo's users (default 200)",
    )
    _add_admin_commands(commands)
    return parser


ADMIN_VERBS: Final = {
    "promote": "advance the ramp one step now (--to 100 to finish)",
    "abort": "roll the canary back to 0 %% and keep it there until retry",
    "pause": "hold the ramp at its current weight",
    "resume": "continue a paused ramp",
    "retry": "start an aborted rollout again from its first step",
}


def _add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--admin", default=DEFAULT_ADMIN, help=f"admin URL ({DEFAULT_ADMIN})")
        sub.add_argument("--token", default=None, help="bearer token ($CANARY_PROXY_ADMIN_TOKEN)")
        return sub

    status = client("status", "show routes: state, weight, step, revision, window")
    status.add_argument("route", nargs="?", help="one route")
    client("reload", "make the running proxy re-read its config file (POST /reload)")
    for verb, help_text in ADMIN_VERBS.items():
        sub = client(verb, help_text)
        sub.add_argument("route")
        if verb == "promote":
            sub.add_argument(
                "--to", type=float, choices=[100.0], default=None, help="100: finish the ramp"
            )
        if verb == "abort":
            sub.add_argument("--reason", default="aborted by an operator")
    weight = client("set-weight", "set the canary weight (pauses the ramp)")
    weight.add_argument("route")
    weight.add_argument("percent", type=_percent, help="0 to 100, at most two decimals")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_CONFIG if exit_.code not in (0, None) else EXIT_OK
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as error:  # the one place a runtime failure becomes one line
        if args.debug:
            raise
        print(f"canary-proxy: error: {error}", file=sys.stderr)
        return EXIT_RUNTIME


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check":
        return _check(args.config or _default_config_path())
    if args.command == "schema":
        return _schema()
    if args.command == "run":
        return _run(args.config or _default_config_path(), args.workers)
    if args.command == "worker":
        from proxy.control.worker import run_worker

        _install_uvloop()
        asyncio.run(run_worker(args.fd, args.counters_fd))
        return EXIT_OK
    if args.command == "demo":
        return _demo(args)
    if args.command in ("status", "reload", "set-weight") or args.command in ADMIN_VERBS:
        return _admin(args)
    raise AssertionError(args.command)  # argparse only lets known commands through


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import plan_story, run_demo

    if args.scenario == "fleet":
        from proxy.demo_fleet import run_fleet_demo

        return run_fleet_demo(rate=args.rate, out=sys.stdout)

    try:
        plan = plan_story(args.scenario, duration=args.duration, rate=args.rate)
    except ValueError as error:  # options that are fine alone but leave no room for the story
        print(f"canary-proxy demo: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return run_demo(plan)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number greater than 0")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100 or abs(value * 100 - round(value * 100)) > 1e-6:
        raise argparse.ArgumentTypeError("must be from 0 to 100 with at most two decimals")
    return value


def _admin(args: argparse.Namespace) -> int:
    from proxy.client import (
        AdminError,
        call,
        format_cluster,
        format_reload,
        format_status,
        route_path,
    )

    token = args.token or os.environ.get("CANARY_PROXY_ADMIN_TOKEN")
    try:
        if args.command == "reload":
            print(format_reload(call(args.admin, "POST", "/reload", token=token)))
            return EXIT_OK
        if args.command == "status":
            if args.route:
                print(format_status([call(args.admin, "GET", route_path(args.route))]))
            else:
                document = call(args.admin, "GET", "/status")
                routes = document.get("routes")
                print(format_status(routes if isinstance(routes, list) else []))
                cluster = document.get("cluster")
                if isinstance(cluster, dict):
                    print()
                    print(format_cluster(cluster, time.time()))
            return EXIT_OK
        path, body = _verb_request(args, route_path)
        method = "PUT" if args.command == "set-weight" else "POST"
        route = call(args.admin, method, path, token=token, body=body)
    except AdminError as error:
        if error.problems:  # a refused config: every problem on its own line, as `check` does
            print(
                "canary-proxy: the proxy refused its config file and keeps serving the one it had:",
                file=sys.stderr,
            )
            print("\n".join(error.problems), file=sys.stderr)
        else:
            print(f"canary-proxy: {error}", file=sys.stderr)
        return EXIT_RUNTIME
    weight = float(str(route.get("weight", 0)))
    print(f"{route.get('name')}: {route.get('state')}, weight {weight:g}%")
    return EXIT_OK


def _verb_request(
    args: argparse.Namespace, route_path: Callable[[str, str], str]
) -> tuple[str, dict[str, object] | None]:
    if args.command == "set-weight":
        return route_path(args.route, "weight"), {"weight": args.percent}
    path = route_path(args.route, args.command)
    if args.command == "promote" and args.to is not None:
        path += f"?to={args.to:g}"
    if args.command == "abort":
        return path, {"reason": args.reason}
    return path, None


def _load(path: str) -> Config | None:
    try:
        return load_config_file(path)
    except ConfigError as error:
        print(f"canary-proxy: invalid config {path}:", file=sys.stderr)
        print(format_problems(error.problems), file=sys.stderr)
        return None


def _check(path: str) -> int:
    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    print("OK")
    return EXIT_OK


def _schema() -> int:
    import json

    from proxy.core.schema import config_schema

    print(json.dumps(config_schema(), indent=2))
    return EXIT_OK


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or auto: {text!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_WORKERS}")
    return count


def _run(path: str, workers: int | str | None) -> int:
    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    from proxy.app import serve
    from proxy.control.admin import AdminSetupError
    from proxy.control.supervisor import worker_count

    _install_uvloop()
    try:
        count = worker_count(workers if workers is not None else config.workers)
        asyncio.run(serve(config, config_path=path, workers=count))
    except AdminSetupError as error:
        print(f"canary-proxy: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _install_uvloop() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
