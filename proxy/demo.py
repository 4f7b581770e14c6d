"""The self-contained demo: two in-process upstreams, the proxy, and traffic; prints the split.

Everything runs on loopback ports chosen by the kernel, so the demo never collides with a
running proxy and needs no config file.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from typing import Final, TextIO

from aiohttp import ClientSession, web

from proxy.config import Config, parse_config
from proxy.runtime import RuntimeHolder
from proxy.server import Server

WEIGHT_PERCENT: Final = 10
STICKY_USERS: Final = 200
REQUESTS_PER_USER: Final = 5
CONCURRENCY: Final = 32


async def _start_upstream(version: str) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {version}\n", headers={"X-Version": version})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, int(port)


def demo_config(stable_port: int, canary_port: int) -> Config:
    return parse_config(
        {
            "listen": "127.0.0.1:0",
            "routes": [
                {
                    "name": "shop",
                    "stable": {"upstreams": [f"http://127.0.0.1:{stable_port}"]},
                    "canary": {
                        "upstreams": [f"http://127.0.0.1:{canary_port}"],
                        "revision": "v2",
                    },
                    "split": {
                        "weight": WEIGHT_PERCENT,
                        "sticky": {"header": "X-User-ID"},
                        "force": {"header": "X-Canary"},
                    },
                }
            ],
        },
        base_dir="/",
    )


async def _fetch(session: ClientSession, url: str, headers: dict[str, str]) -> str:
    async with session.get(url, headers=headers) as response:
        await response.read()
        return response.headers.get("X-Version", "?")


async def _burst(session: ClientSession, url: str, header_sets: list[dict[str, str]]) -> list[str]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(headers: dict[str, str]) -> str:
        async with gate:
            return await _fetch(session, url, headers)

    return list(await asyncio.gather(*(one(h) for h in header_sets)))


async def _play(requests: int, out: TextIO) -> int:
    stable, stable_port = await _start_upstream("stable")
    canary, canary_port = await _start_upstream("canary")
    holder = RuntimeHolder(demo_config(stable_port, canary_port))
    server = Server(holder, asyncio.get_running_loop())
    host, port = await server.start("127.0.0.1", 0)
    url = f"http://{host}:{port}/"
    print(f"proxy on {url}  stable :{stable_port}  canary :{canary_port}", file=out)
    print(f"route 'shop': canary weight {WEIGHT_PERCENT} %, sticky on X-User-ID", file=out)
    try:
        async with ClientSession() as session:
            anonymous = Counter(await _burst(session, url, [{}] * requests))
            share = 100 * anonymous["canary"] / max(1, requests)
            print(
                f"\n{requests} requests without a user key: stable {anonymous['stable']}, "
                f"canary {anonymous['canary']} ({share:.1f} % canary)",
                file=out,
            )
            users = [f"user-{n}" for n in range(STICKY_USERS)]
            asks = [{"X-User-ID": u} for u in users for _ in range(REQUESTS_PER_USER)]
            random.shuffle(asks)
            answers = await _burst(session, url, asks)
            seen: dict[str, set[str]] = {}
            for ask, version in zip(asks, answers, strict=True):
                seen.setdefault(ask["X-User-ID"], set()).add(version)
            flip_flops = sum(1 for versions in seen.values() if len(versions) > 1)
            in_canary = sum(1 for versions in seen.values() if versions == {"canary"})
            print(
                f"{STICKY_USERS} sticky users x {REQUESTS_PER_USER} requests: {in_canary} users "
                f"in canary ({100 * in_canary / STICKY_USERS:.1f} %), "
                f"{flip_flops} saw both versions",
                file=out,
            )
            forced = await _burst(session, url, [{"X-Canary": "always"}] * 20)
            print(f"X-Canary: always -> {Counter(forced)['canary']}/20 to canary", file=out)
    finally:
        await server.shutdown(1.0)
        await stable.cleanup()
        await canary.cleanup()
    ok = flip_flops == 0 and Counter(forced)["canary"] == len(forced)
    print("\nsplit, stickiness and force behaved as configured" if ok else "\nUNEXPECTED", file=out)
    return 0 if ok else 1


def run_demo(*, requests: int = 2000, out: TextIO = sys.stdout) -> int:
    import uvloop

    return uvloop.run(_play(requests, out))
