"""The `canary-proxy` command as a user runs it: check, run with a bad config, reload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from fakes import HOST, FakeUpstream, unused_port
from proxy_process import (
    TOKEN_ENV,
    ProxyProcess,
    open_session,
    run_cli,
    running_proxy,
    scrape,
    value_of,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "proxy.yaml"
TOKEN: Final = "cli-reload-token"


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def test_check_accepts_the_shipped_example_config() -> None:
    result = cli("check", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_check_lists_every_problem_with_its_path_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "routes:\n"
        "  - name: Shop!\n"
        "    stable: {upstreams: ['http://127.0.0.1:1']}\n"
        "    canary: {upstreams: ['http://127.0.0.1:2']}\n"
        "    split: {weight: 120}\n"
        "timeouts: {connect: fast}\n"
    )
    result = cli("check", "--config", str(bad))
    assert result.returncode == 2
    assert "routes[0].name:" in result.stderr
    assert "routes[0].split.weight:" in result.stderr
    assert "timeouts.connect:" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_a_missing_file_in_one_line(tmp_path: Path) -> None:
    result = cli("check", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "absent.yaml" in result.stderr


def test_run_refuses_an_invalid_config_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: []\n")
    result = cli("run", "--config", str(bad), timeout=20)
    assert result.returncode == 2
    assert "routes" in result.stderr


def test_config_path_defaults_to_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANARY_PROXY_CONFIG", str(EXAMPLE))
    assert cli("check").returncode == 0
    monkeypatch.setenv("CANARY_PROXY_CONFIG", str(tmp_path / "nope.yaml"))
    assert cli("check").returncode == 2


def test_unknown_command_is_a_usage_error() -> None:
    assert cli("frobnicate").returncode == 2


# -- canary-proxy reload, against a real proxy ---------------------------------------------------


def shop_config(tmp_path: Path, stable: str, canary: str, weight: object) -> dict[str, object]:
    return {
        "listen": f"{HOST}:0",
        "admin": {"listen": f"{HOST}:0", "token_env": TOKEN_ENV},
        "state_dir": str(tmp_path / "state"),
        "timeouts": {"shutdown": "1s"},
        "routes": [
            {
                "name": "shop",
                "stable": {"upstreams": [stable]},
                "canary": {"upstreams": [canary], "revision": "v2"},
                "split": {"weight": weight},
            }
        ],
    }


async def versions(session: aiohttp.ClientSession, proxy: ProxyProcess) -> set[str]:
    seen = set()
    for n in range(10):
        async with session.get(f"{proxy.url}/{n}") as response:
            assert response.status == 200
            seen.add(response.headers["X-Version"])
    return seen


async def reload_cli(*args: str, token: str | None = None) -> tuple[int, str, str]:
    """`canary-proxy reload ARGS` with the admin token, if any, in its environment variable."""
    env = {k: v for k, v in os.environ.items() if k != "CANARY_PROXY_ADMIN_TOKEN"}
    if token is not None:
        env["CANARY_PROXY_ADMIN_TOKEN"] = token
    return await run_cli("reload", *args, env=env)


async def test_reload_applies_the_config_file_and_refuses_an_invalid_one_with_its_paths(
    stable: FakeUpstream, canary: FakeUpstream, tmp_path: Path
) -> None:
    path = write_config(tmp_path, shop_config(tmp_path, stable.url, canary.url, 0))
    async with open_session() as session, running_proxy(path, token=TOKEN) as proxy:
        admin = ("--admin", proxy.admin_url)
        assert await versions(session, proxy) == {"stable"}

        write_config(tmp_path, shop_config(tmp_path, stable.url, canary.url, 100))
        code, out, err = await reload_cli(*admin, "--token", TOKEN)
        assert (code, err) == (0, "")
        assert out == "reloaded, generation 2: routes changed: shop\n"
        assert await versions(session, proxy) == {"canary"}

        # Two problems at once: each on its own line with its field path, and nothing applied.
        bad = shop_config(tmp_path, stable.url, canary.url, 120)
        bad["timeouts"] = {"connect": "fast"}
        write_config(tmp_path, bad)
        code, out, err = await reload_cli(*admin, token=TOKEN)  # token from the environment
        assert (code, out) == (1, "")
        assert "Traceback" not in err
        lines = err.splitlines()
        assert lines[0] == (
            "canary-proxy: the proxy refused its config file and keeps serving the one it had:"
        )
        assert sorted(line.split(":")[0] for line in lines[1:]) == [
            "routes[0].split.weight",
            "timeouts.connect",
        ], err
        assert await versions(session, proxy) == {"canary"}  # still the config it had
        samples = await scrape(session, proxy.admin_url)
        assert value_of(samples, "canary_proxy_config_last_reload_successful") == 0
        assert value_of(samples, "canary_proxy_config_reloads_total", result="failure") == 1

        code, out, err = await reload_cli(*admin, "--token", "wrong")
        assert (code, out) == (1, "")
        assert err.startswith("canary-proxy: 401: "), err
        assert len(err.splitlines()) == 1, err

        write_config(tmp_path, shop_config(tmp_path, stable.url, canary.url, 100))
        code, out, err = await reload_cli(*admin, "--token", TOKEN)
        assert (code, out, err) == (0, "reloaded, generation 3: nothing changed\n", "")
        samples = await scrape(session, proxy.admin_url)
        assert value_of(samples, "canary_proxy_config_last_reload_successful") == 1

    code, out, err = await reload_cli("--admin", f"http://{HOST}:{unused_port()}", token=TOKEN)
    assert (code, out) == (1, "")
    assert "cannot reach the admin API" in err
    assert len(err.splitlines()) == 1, err
