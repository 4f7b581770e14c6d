"""`canary-proxy demo` as a user runs it, output captured (so in plain-line mode): the ramp, the
failure, the rollback and its numbers, or the promotion; clean shutdown; usage errors."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[2]
# Every warning shown (ResourceWarning included): a clean shutdown leaves stderr empty.
DEMO: Final = (sys.executable, "-W", "always", "-m", "proxy", "demo")
SHORT: Final = ("--duration", "8", "--rate", "200")
STORY_TIMEOUT: Final = 60.0  # a bound on an 8-second story, not a speed claim

EVENT: Final = re.compile(
    r"^\+(?P<at>[\d.]+)s (?P<actor>\w+)/(?P<action>\w+): "
    r"(?P<before>\w+) (?P<w0>[\d.]+)% -> (?P<after>\w+) (?P<w1>[\d.]+)%: (?P<reason>.*)$",
    re.MULTILINE,
)
STATUS: Final = re.compile(r"^\+[\d.]+s status shop: (?P<state>\w+) (?P<weight>[\d.]+)%", re.M)
ADMIN: Final = re.compile(r"try: canary-proxy status --admin (http://\S+)")


@dataclass(frozen=True, slots=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    status: str = ""  # what `canary-proxy status` printed while the demo was running

    def events(self) -> list[re.Match[str]]:
        return list(EVENT.finditer(self.stdout))

    def ramp(self) -> list[float]:
        return [float(e["w1"]) for e in self.events() if e["action"] in ("start", "advance")]

    def summary(self, label: str) -> str:
        found = re.search(rf"^  {label}:\s+(.*)$", self.stdout, re.MULTILINE)
        assert found is not None, f"no {label!r} line in:\n{self.stdout}"
        return found[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=STORY_TIMEOUT,
        check=False,
        cwd=ROOT,
    )


def watch_demo(*args: str, interrupt: bool = False) -> Run:
    """Run the demo, reading its stdout as it comes: once it prints its admin URL, ask
    `canary-proxy status` there (or, `interrupt`, press Ctrl-C)."""
    with (
        tempfile.TemporaryFile("w+") as stderr,
        subprocess.Popen(
            [*DEMO, *args], stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT
        ) as process,
    ):
        try:
            assert process.stdout is not None
            lines, status = [], ""
            for line in process.stdout:
                lines.append(line)
                admin = ADMIN.search(line)
                if admin and interrupt:
                    process.send_signal(signal.SIGINT)
                elif admin:
                    status = cli("status", "--admin", admin[1]).stdout
            returncode = process.wait(timeout=STORY_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
        stderr.seek(0)
        return Run(returncode, "".join(lines), stderr.read(), status)


@pytest.fixture(scope="module")
def failing() -> Run:
    return watch_demo(*SHORT)


@pytest.fixture(scope="module")
def healthy() -> Run:
    return watch_demo(*SHORT, "--scenario", "healthy")


# -- the failing canary (the default story) -----------------------------------------------------


def test_the_failing_story_succeeds_and_says_so(failing: Run) -> None:
    assert failing.returncode == 0, failing.stdout + failing.stderr
    assert "OK: the guard rolled the failing canary back" in failing.stdout


def test_the_ramp_goes_through_5_25_and_50_percent_before_the_canary_fails(failing: Run) -> None:
    assert failing.ramp() == [5, 25, 50]
    fifty = failing.stdout.index("-> progressing 50%")
    breaks = failing.stdout.index("demo: the canary upstream starts failing")
    assert fifty < breaks
    assert failing.summary("ramp") == "5% -> 25% -> 50%"


def test_the_guard_rolls_the_canary_back_to_0_and_it_stays_there(failing: Run) -> None:
    rollbacks = [e for e in failing.events() if e["action"] == "rollback"]
    assert len(rollbacks) == 1
    rollback = rollbacks[0]
    assert (rollback["actor"], rollback["before"], rollback["w0"]) == ("guard", "progressing", "50")
    assert (rollback["after"], rollback["w1"]) == ("aborted", "0")
    assert "canary error rate" in rollback["reason"]
    last = list(STATUS.finditer(failing.stdout))[-1]
    assert (last["state"], last["weight"]) == ("aborted", "0")


def test_the_rollback_time_is_measured_from_the_failure_to_the_controllers_event(
    failing: Run,
) -> None:
    failure = re.fullmatch(
        r"the canary began failing at \+([\d.]+)s .*", failing.summary("failure")
    )
    rollback = re.fullmatch(
        r"weight 50% -> 0% at \+([\d.]+)s, ([\d.]+) s after the canary began failing .*",
        failing.summary("rollback"),
    )
    assert failure is not None
    assert rollback is not None
    began, rolled_back, took = float(failure[1]), float(rollback[1]), float(rollback[2])
    event = next(e for e in failing.events() if e["action"] == "rollback")
    assert rolled_back == float(event["at"])  # the time is the controller's, as printed live
    assert took > 0
    assert took == pytest.approx(rolled_back - began, abs=0.0015)


def test_the_requests_and_users_exposed_to_the_failing_canary_are_counted(failing: Run) -> None:
    exposed = re.match(
        r"(\d+) requests got an error from the failing canary, from (\d+) distinct users "
        r"\((\d+) of the 300 users were in its 50% cohort\)$",
        failing.summary("exposed"),
    )
    assert exposed is not None, failing.summary("exposed")
    requests, users, cohort = (int(n) for n in exposed.groups())
    # The guard's own reason says how many errors its window held when it acted: at least
    # those requests were exposed, and no more users than requests (a user may see two).
    reason = failing.summary("reason")
    guard_errors = re.search(r"\((\d+)/\d+\)$", reason)
    assert guard_errors is not None, reason
    assert requests >= int(guard_errors[1]) >= 1
    assert 1 <= users <= min(requests, cohort)
    assert 0 < cohort < 300


def test_the_printed_admin_url_answers_canary_proxy_status(failing: Run) -> None:
    assert re.search(r"^shop\s+progressing\s+\d+%", failing.status, re.MULTILINE), failing.status


def test_plain_mode_prints_a_status_line_a_second_and_no_terminal_codes(failing: Run) -> None:
    assert len(STATUS.findall(failing.stdout)) >= 6  # 8 seconds of story
    assert "\x1b" not in failing.stdout


def test_the_demo_shuts_down_without_a_warning_or_a_traceback(failing: Run) -> None:
    assert failing.stderr == ""


# -- the healthy canary -------------------------------------------------------------------------


def test_a_healthy_canary_ramps_to_100_percent_and_is_promoted(healthy: Run) -> None:
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.ramp() == [5, 25, 50, 100]
    promoted = [e for e in healthy.events() if e["after"] == "promoted"]
    assert len(promoted) == 1
    assert not [e for e in healthy.events() if e["action"] == "rollback"]
    assert "demo: the canary upstream starts failing" not in healthy.stdout
    assert healthy.summary("canary").startswith("0 errors in ")
    assert "OK: the canary was promoted; route shop is promoted at 100%" in healthy.stdout
    assert healthy.stderr == ""


# -- stopping early and bad usage ---------------------------------------------------------------


def test_ctrl_c_stops_the_demo_cleanly_with_exit_130() -> None:
    run = watch_demo(*SHORT, interrupt=True)
    assert run.returncode == 130, run.stdout + run.stderr
    assert "interrupted after" in run.stdout
    assert "summary" not in run.stdout
    assert run.stderr == ""


@pytest.mark.parametrize(
    "options",
    [
        ("--duration", "-1"),
        ("--duration", "0"),
        ("--rate", "fast"),
        ("--scenario", "chaotic"),
        ("--requests", "400"),  # the old demo's option is gone
        ("--duration", "2"),  # too short for the ramp
        ("--duration", "8", "--rate", "10"),  # too little traffic for the 5 % step
    ],
)
def test_bad_demo_options_are_a_usage_error_with_exit_2(options: tuple[str, ...]) -> None:
    result = cli("demo", *options)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip()


# -- the fleet ----------------------------------------------------------------------------------

ROLLED_BACK: Final = re.compile(
    r"^\[[\d. ]+s\]   (?P<replica>edge-\d): weight 0 % +(?P<ms>\d+) ms after the first failure"
    r" \((?P<how>[^)]*)\)",
    re.MULTILINE,
)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_the_fleet_story_rolls_back_every_replica_and_prints_each_ones_time() -> None:
    run = watch_demo("--scenario", "fleet", "--rate", "300")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == ""
    rows = {m["replica"]: m for m in ROLLED_BACK.finditer(run.stdout)}
    assert set(rows) == {"edge-1", "edge-2", "edge-3"}, run.stdout
    # The failure was behind edge-1 only: its guard decided, the others applied its decision.
    assert rows["edge-1"]["how"] == "its own guard rolled back", run.stdout
    assert rows["edge-2"]["how"] == rows["edge-3"]["how"] == "applied edge-1's rollback"
    assert "requests the canary answered in the 1 s after: 0" in run.stdout
    assert run.stdout.rstrip().endswith("every replica rolled back")
