"""Shell: find wrk, nginx, haproxy and taskset; install the missing ones from Debian as root.

Installing is the only network the benchmark uses: `apt-get update && apt-get install -y ...`.
Without root it prints exactly what to install instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

# Debian package of each tool; taskset is in util-linux, which every Debian system has.
PACKAGES: Final[Mapping[str, str]] = {
    "wrk": "wrk",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "taskset": "util-linux",
    "valgrind": "valgrind",  # instructions.py: callgrind counts the instructions per request
    "callgrind_control": "valgrind",
}
_SBIN: Final = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # not on a normal user's PATH
APT_TIMEOUT_SECONDS: Final = 900
VERSION_TIMEOUT_SECONDS: Final = 10
_VERSION_NOISE: Final = re.compile(r"\s+(- https?://\S+|Copyright .*)$")  # HAProxy's URL, wrk's (C)


class MissingTools(RuntimeError):
    """Tools are missing and we may not install them; the message says what to install."""


def find(tool: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(tool, path=path)


def ensure(tools: Iterable[str]) -> dict[str, str]:
    """Path of every tool, installing the missing ones first if we run as root."""
    wanted = sorted(set(tools))
    missing = [tool for tool in wanted if find(tool) is None]
    if missing:
        _install(sorted({PACKAGES[tool] for tool in missing}))
    paths = {tool: find(tool) for tool in wanted}
    still_missing = [tool for tool, path in paths.items() if path is None]
    if still_missing:
        raise MissingTools(f"still missing after installing: {', '.join(still_missing)}")
    return {tool: path for tool, path in paths.items() if path is not None}


def _install(packages: list[str]) -> None:
    command = f"apt-get update && apt-get install -y {' '.join(packages)}"
    if os.geteuid() != 0:
        raise MissingTools(f"missing Debian packages; as root run:\n  {command}")
    print(f"installing: {command}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        subprocess.run(argv, check=True, env=env, timeout=APT_TIMEOUT_SECONDS)


def version(tool: str, path: str) -> str:
    """The first line a tool prints about its version (nginx and wrk write it to stderr)."""
    flag = {"nginx": "-v", "haproxy": "-v", "wrk": "-v"}.get(tool, "--version")
    lines = _output([path, flag], stderr=True).strip().splitlines()
    return _VERSION_NOISE.sub("", lines[0]).strip() if lines else "unknown"


def git_revision(root: Path) -> str:
    """`git describe --always --dirty` of the checkout at `root`, or `unknown`."""
    described = _output(["git", "-C", str(root), "describe", "--always", "--dirty"])
    return described.strip() or "unknown"


def _output(argv: list[str], *, stderr: bool = False) -> str:
    """What a short command prints (its stdout, and its stderr too if asked); empty if it
    cannot run or takes too long."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + (done.stderr if stderr else "")
