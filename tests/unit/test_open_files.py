"""The open-file limit at start: raised to the hard limit, and a warning when the connection
cap cannot fit in it (client and upstream connections are each a descriptor)."""

from __future__ import annotations

import logging
import resource

import pytest

from proxy.app import raise_open_file_limit


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard open-file limit above 256, not {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    raise_open_file_limit(1)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_a_cap_beyond_the_limit_is_a_warning_naming_the_field(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="canary_proxy"):
        raise_open_file_limit(10**9)
    assert "limits.max_connections = 1000000000" in caplog.text


def test_a_cap_within_the_limit_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="canary_proxy"):
        raise_open_file_limit(10)
    assert caplog.text == ""
