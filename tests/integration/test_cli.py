"""The `canary-proxy` command as a user runs it: check, run with a bad config, demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "proxy.yaml"


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
