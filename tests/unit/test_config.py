"""Config parsing and validation (docs/configuration.md): every problem, with its field path."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from configs import minimal, with_canary
from hypothesis import given
from hypothesis import strategies as st

from proxy.control.loader import format_problems, load_config_file, parse_config_text
from proxy.core.config import (
    BASIS_POINTS,
    Address,
    Admin,
    Cluster,
    Config,
    ConfigError,
    ConfigProblem,
    Guard,
    KeySource,
    Limits,
    Match,
    Rollout,
    Split,
    Timeouts,
    Upstream,
    Version,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "proxy.yaml"
BASE_DIR = "/etc/canary-proxy"

Problems = list[tuple[str, str]]


def parse(data: object) -> Config:
    return parse_config(data, base_dir=BASE_DIR)


def problems(data: object) -> Problems:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return [(p.path, p.message) for p in caught.value.problems]


def problems_with(path: str, value: object) -> Problems:
    """The problems of a config with canary, guard and rollout once `path` is set to `value`."""
    data = with_canary(split={}, rollout={"steps": [5, 50], "interval": "1m"}, guard={})
    _set(data, path, value)
    return problems(data)


def _set(data: dict[str, Any], path: str, value: object) -> None:
    keys = path.replace("routes[0]", "routes.0").split(".")
    node: Any = data
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[keys[-1]] = value


# --- The example file and defaults ---------------------------------------------------------------


def test_the_example_file_parses_to_every_value_it_writes() -> None:
    config = load_config_file(str(EXAMPLE))

    assert config.listen == Address(host="127.0.0.1", port=8080)
    assert config.workers == 1
    assert config.admin == Admin(
        listen=Address(host="127.0.0.1", port=9901), token_env="CANARY_PROXY_ADMIN_TOKEN"
    )
    assert config.state_dir == str(EXAMPLE.parent / "state")
    assert config.timeouts == Timeouts(
        connect=2.0, response_header=30.0, idle=60.0, client_header=10.0, shutdown=30.0
    )
    assert config.limits == Limits(max_header_bytes=65536, max_url_bytes=8192, max_body_bytes=0)
    (shop,) = config.routes
    assert shop.name == "shop"
    assert shop.match == Match(host="localhost", path_prefix="/")
    assert shop.stable == Version(
        upstreams=(Upstream(url="http://127.0.0.1:8001", host="127.0.0.1", port=8001),),
        revision="v1",
    )
    assert shop.canary == Version(
        upstreams=(Upstream(url="http://127.0.0.1:8002", host="127.0.0.1", port=8002),),
        revision="v2",
    )
    assert shop.split == Split(
        weight_bp=500,
        salt="shop",
        sticky=KeySource(header="x-user-id", cookie="uid"),
        force=KeySource(header="x-canary", cookie="canary"),
    )
    assert shop.rollout == Rollout(steps_bp=(500, 2500, 5000, 10000), interval=60.0)
    assert shop.guard == Guard(
        window=10.0,
        min_requests=20,
        max_error_rate=0.05,
        max_error_rate_increase=0.02,
        max_p99_latency=0.5,
        action="rollback",
    )


def test_the_example_file_writes_every_field_the_parser_knows() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for name in (
        "listen:", "workers:", "admin:", "token_env:", "token_file", "state_dir:", "timeouts:",
        "connect:", "response_header:", "idle:", "client_header:", "shutdown:", "limits:",
        "max_header_bytes:", "max_url_bytes:", "max_body_bytes:", "max_response_header_bytes:",
        "routes:", "name:", "match:", "host:", "path_prefix:", "stable:", "canary:", "upstreams:",
        "revision:", "split:",
        "weight:", "salt:", "sticky:", "force:", "rollout:", "steps:", "interval:", "guard:",
        "window:", "min_requests:", "max_error_rate:", "max_error_rate_increase:",
        "max_p99_latency:", "action:", "cluster:", "redis:", "redis_password_env:", "replica:",
    ):  # fmt: skip
        assert name in text, name


def test_a_minimal_config_takes_every_default() -> None:
    config = parse(minimal())

    assert config == Config(
        listen=Address(host="0.0.0.0", port=8080),
        admin=Admin(listen=Address(host="127.0.0.1", port=9901)),
        state_dir="/etc/canary-proxy/state",
        timeouts=Timeouts(),
        limits=Limits(),
        routes=config.routes,
    )
    assert config.workers == 1
    assert config.admin.token_env == "CANARY_PROXY_ADMIN_TOKEN"
    assert config.admin.token_file is None
    assert config.timeouts == Timeouts(
        connect=2.0, response_header=30.0, idle=60.0, client_header=10.0, shutdown=30.0
    )
    assert config.limits == Limits(max_header_bytes=65536, max_url_bytes=8192, max_body_bytes=0)
    (shop,) = config.routes
    assert shop.match == Match(host=None, path_prefix="/")
    assert shop.canary is None
    assert shop.split == Split(weight_bp=0, salt="shop")
    assert shop.rollout is None
    assert shop.guard is None


def test_an_empty_guard_takes_the_documented_defaults() -> None:
    (shop,) = parse(with_canary(guard={})).routes

    assert shop.guard == Guard(
        window=10.0,
        min_requests=20,
        max_error_rate=0.05,
        max_error_rate_increase=None,
        max_p99_latency=None,
        action="rollback",
    )


def test_an_explicit_null_reads_as_an_absent_field() -> None:
    data = minimal()
    data.update(listen=None, workers=None, admin=None, timeouts=None, limits=None, state_dir=None)
    data["routes"][0].update(match=None, canary=None, split=None, rollout=None, guard=None)

    assert parse(data) == parse(minimal())


def test_the_split_salt_defaults_to_the_route_name_and_can_be_set() -> None:
    assert parse(with_canary(name="cart")).routes[0].split.salt == "cart"
    assert parse(with_canary(split={"salt": "2024-q3"})).routes[0].split.salt == "2024-q3"


def test_a_rollout_starts_the_weight_at_its_first_step() -> None:
    data = with_canary(rollout={"steps": [12.5, 100], "interval": "30s"})

    (shop,) = parse(data).routes

    assert shop.split.weight_bp == 1250
    assert shop.rollout == Rollout(steps_bp=(1250, 10000), interval=30.0)


def test_a_weight_equal_to_the_first_rollout_step_is_accepted() -> None:
    data = with_canary(split={"weight": 5}, rollout={"steps": [5, 100], "interval": 60})

    assert parse(data).routes[0].split.weight_bp == 500


def test_a_route_may_guard_a_static_weight_without_a_rollout() -> None:
    (shop,) = parse(with_canary(split={"weight": 10}, guard={"action": "observe"})).routes

    assert shop.split.weight_bp == 1000
    assert shop.rollout is None
    assert shop.guard == Guard(action="observe")


def test_routes_keep_their_config_order() -> None:
    data = minimal()
    data["routes"].append({"name": "api", "stable": {"upstreams": ["http://api:9000"]}})

    assert [r.name for r in parse(data).routes] == ["shop", "api"]


# --- Whole-document errors -----------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, [], "routes: []", 42])
def test_a_config_that_is_not_a_mapping_is_one_problem_without_a_path(data: object) -> None:
    assert problems(data) == [("", "config must be a mapping")]


def test_routes_are_required() -> None:
    assert problems({}) == [("routes", "is required")]


@pytest.mark.parametrize(
    ("routes", "message"), [([], "must not be empty"), ({"shop": {}}, "must be a list")]
)
def test_routes_must_be_a_non_empty_list(routes: object, message: str) -> None:
    assert problems({"routes": routes}) == [("routes", message)]


def test_unknown_fields_are_reported_at_every_level() -> None:
    data = with_canary(wieght=5, split={"weigth": 5, "sticky": {"headers": "X-User"}})
    data["listn"] = "0.0.0.0:80"
    data["timeouts"] = {"conect": "1s"}
    data["routes"][0]["canary"]["revison"] = "v3"

    assert problems(data) == [
        ("listn", "unknown field (did you mean listen?)"),
        ("timeouts.conect", "unknown field (did you mean connect?)"),
        ("routes[0].wieght", "unknown field"),
        ("routes[0].canary.revison", "unknown field (did you mean revision?)"),
        ("routes[0].split.weigth", "unknown field (did you mean weight?)"),
        ("routes[0].split.sticky.headers", "unknown field (did you mean header?)"),
    ]


def test_a_non_string_key_is_an_unknown_field() -> None:
    data: dict[Any, Any] = minimal()
    data[True] = "on"

    assert problems(data) == [("True", "unknown field")]


def test_every_problem_is_reported_at_once_in_document_order() -> None:
    data = {
        "listen": "nowhere",
        "admin": {"listen": "127.0.0.1:99999"},
        "timeouts": {"connect": "0s", "idle": "soon"},
        "limits": {"max_header_bytes": 100},
        "routes": [
            {
                "name": "Shop",
                "stable": {"upstreams": []},
                "canary": {"upstreams": ["https://10.0.1.1"]},
                "split": {"weight": 101},
                "guard": {"max_error_rate": 2},
            },
            {"stable": {"upstreams": ["http://10.0.0.1"]}},
        ],
    }

    assert problems(data) == [
        ("listen", "must be host:port or [ipv6]:port"),
        ("admin.listen", "port must be between 0 and 65535"),
        ("timeouts.connect", "must be greater than 0"),
        ("timeouts.idle", "must be a duration such as 250ms, 10s, 2m or 1h"),
        ("limits.max_header_bytes", "must be at least 256"),
        ("routes[0].name", "must match [a-z0-9-]+"),
        ("routes[0].stable.upstreams", "must not be empty"),
        ("routes[0].canary.upstreams[0]", "only http:// upstreams are supported"),
        ("routes[0].split.weight", "must be between 0 and 100"),
        ("routes[0].guard.max_error_rate", "must be between 0 and 1"),
        ("routes[1].name", "is required"),
    ]


def test_config_error_carries_the_problems_and_prints_one_per_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"listen": 1, "routes": []})

    assert caught.value.problems == (
        ConfigProblem(path="listen", message="must be a string"),
        ConfigProblem(path="routes", message="must not be empty"),
    )
    assert str(caught.value) == "listen: must be a string\nroutes: must not be empty"
    assert format_problems(caught.value.problems) == str(caught.value)


def test_a_problem_without_a_path_prints_just_its_message() -> None:
    assert str(ConfigProblem(path="", message="config must be a mapping")) == (
        "config must be a mapping"
    )


# --- Listen addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8080", Address(host="0.0.0.0", port=8080)),
        ("LocalHost:1", Address(host="localhost", port=1)),
        ("127.0.0.1:0", Address(host="127.0.0.1", port=0)),
        ("proxy.internal:65535", Address(host="proxy.internal", port=65535)),
        ("[::1]:9901", Address(host="::1", port=9901)),
        ("[::]:80", Address(host="::", port=80)),
    ],
)
def test_listen_accepts_host_port_and_bracketed_ipv6(text: str, expected: Address) -> None:
    data = minimal()
    data["listen"] = text
    data["admin"] = {"listen": text}

    config = parse(data)

    assert config.listen == expected
    assert config.admin.listen == expected


@pytest.mark.parametrize("text", ["0.0.0.0:8080", "[::1]:9901", "[fe80::1]:0"])
def test_a_listen_address_prints_as_it_is_written(text: str) -> None:
    data = minimal()
    data["listen"] = text

    assert str(parse(data).listen) == text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8080", "must be host:port or [ipv6]:port"),
        (":8080", "must be host:port or [ipv6]:port"),
        ("localhost", "must be host:port or [ipv6]:port"),
        ("::1:8080", "must be host:port or [ipv6]:port"),
        ("[::g]:8080", "must be host:port or [ipv6]:port"),
        ("host:http", "must be host:port or [ipv6]:port"),
        ("host:123456", "must be host:port or [ipv6]:port"),
        ("host:65536", "port must be between 0 and 65535"),
        ("", "must not be empty"),
        (8080, "must be a string"),
    ],
)
def test_a_malformed_listen_address_is_rejected(value: object, message: str) -> None:
    data = minimal()
    data["listen"] = value
    data["admin"] = {"listen": value}

    assert problems(data) == [("listen", message), ("admin.listen", message)]


# --- Workers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 64, 256, "auto"])
def test_workers_is_a_whole_number_of_at_least_1_or_auto(workers: object) -> None:
    data = minimal()
    data["workers"] = workers

    assert parse(data).workers == workers


@pytest.mark.parametrize(
    "workers", [0, -1, 257, 2000, 1.5, 2.0, True, False, "Auto", "AUTO", "2", "", [2]]
)
def test_a_malformed_worker_count_is_rejected(workers: object) -> None:
    data = minimal()
    data["workers"] = workers

    assert problems(data) == [("workers", "must be a whole number from 1 to 256, or auto")]


# --- Admin ---------------------------------------------------------------------------------------


def test_admin_token_env_can_be_renamed() -> None:
    data = minimal()
    data["admin"] = {"token_env": "SHOP_ADMIN_TOKEN"}

    assert parse(data).admin == Admin(
        listen=Address(host="127.0.0.1", port=9901), token_env="SHOP_ADMIN_TOKEN"
    )


@pytest.mark.parametrize(
    ("token_file", "expected"),
    [
        ("admin.token", "/etc/canary-proxy/admin.token"),
        ("../secrets/./admin.token", "/etc/secrets/admin.token"),
        ("/run/secrets/admin", "/run/secrets/admin"),
    ],
)
def test_a_token_file_resolves_against_the_config_folder_and_replaces_the_env(
    token_file: str, expected: str
) -> None:
    data = minimal()
    data["admin"] = {"token_file": token_file}

    admin = parse(data).admin

    assert admin.token_file == expected
    assert admin.token_env is None


def test_token_env_and_token_file_together_are_rejected() -> None:
    data = minimal()
    data["admin"] = {"token_env": "TOKEN", "token_file": "token"}

    assert problems(data) == [("admin", "set token_env or token_file, not both")]


@pytest.mark.parametrize(
    ("admin", "expected"),
    [
        ({"token_env": "1TOKEN"}, [("admin.token_env", "must be an environment variable name")]),
        ({"token_env": "MY-TOKEN"}, [("admin.token_env", "must be an environment variable name")]),
        ({"token_env": 7}, [("admin.token_env", "must be a string")]),
        ({"token_file": ""}, [("admin.token_file", "must not be empty")]),
        ({"token_file": ["a"]}, [("admin.token_file", "must be a string")]),
        ("127.0.0.1:9901", [("admin", "must be a mapping")]),
    ],
)
def test_a_malformed_admin_section_is_rejected(admin: object, expected: Problems) -> None:
    data = minimal()
    data["admin"] = admin

    assert problems(data) == expected


# --- state_dir -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state_dir", "expected"),
    [
        ("./state", "/etc/canary-proxy/state"),
        ("var/lib", "/etc/canary-proxy/var/lib"),
        ("../common/state/", "/etc/common/state"),
        ("/var/lib/canary-proxy", "/var/lib/canary-proxy"),
    ],
)
def test_state_dir_resolves_against_the_config_folder(state_dir: str, expected: str) -> None:
    data = minimal()
    data["state_dir"] = state_dir

    assert parse(data).state_dir == expected


@pytest.mark.parametrize(
    ("state_dir", "message"), [("  ", "must not be empty"), (1, "must be a string")]
)
def test_a_malformed_state_dir_is_rejected(state_dir: object, message: str) -> None:
    data = minimal()
    data["state_dir"] = state_dir

    assert problems(data) == [("state_dir", message)]


# --- Durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("0.5ms", 0.0005),
        (3, 3.0),
        (0.75, 0.75),
    ],
)
def test_a_duration_is_a_string_with_a_unit_or_a_number_of_seconds(
    value: object, seconds: float
) -> None:
    data = minimal()
    data["timeouts"] = {"connect": value}

    assert parse(data).timeouts.connect == pytest.approx(seconds)


def test_every_timeout_can_be_set() -> None:
    data = minimal()
    data["timeouts"] = {
        "connect": "1s",
        "response_header": "5s",
        "idle": "90s",
        "client_header": "3s",
        "shutdown": "1m",
    }

    assert parse(data).timeouts == Timeouts(
        connect=1.0, response_header=5.0, idle=90.0, client_header=3.0, shutdown=60.0
    )


DURATION_HINT = "must be a duration such as 250ms, 10s, 2m or 1h"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10", DURATION_HINT),
        ("10 s", DURATION_HINT),
        ("10sec", DURATION_HINT),
        ("1d", DURATION_HINT),
        ("-1s", DURATION_HINT),
        (".5s", DURATION_HINT),
        ("1e3ms", DURATION_HINT),
        ("", DURATION_HINT),
        (True, DURATION_HINT),
        (False, DURATION_HINT),
        ([10], DURATION_HINT),
        (float("inf"), DURATION_HINT),
        (float("nan"), DURATION_HINT),
        (10**400, DURATION_HINT),
        (0, "must be greater than 0"),
        ("0s", "must be greater than 0"),
        ("0ms", "must be greater than 0"),
        (-2, "must be greater than 0"),
    ],
)
def test_a_malformed_or_non_positive_duration_is_rejected(value: object, message: str) -> None:
    data = minimal()
    data["timeouts"] = {"shutdown": value}

    assert problems(data) == [("timeouts.shutdown", message)]


@pytest.mark.parametrize(
    "path",
    [
        "timeouts.connect",
        "routes[0].rollout.interval",
        "routes[0].guard.window",
        "routes[0].guard.max_p99_latency",
    ],
)
def test_every_duration_field_is_checked_as_a_duration(path: str) -> None:
    assert problems_with(path, "soon") == [(path, DURATION_HINT)]
    assert problems_with(path, "0ms") == [(path, "must be greater than 0")]


# --- Percentages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "basis_points"),
    [(0, 0), (5, 500), (12.5, 1250), (0.01, 1), (0.29, 29), (33.33, 3333), (99.99, 9999),
     (100, 10000), (100.0, 10000), (1.10, 110)],
)  # fmt: skip
def test_a_percentage_becomes_basis_points(weight: float, basis_points: int) -> None:
    assert parse(with_canary(split={"weight": weight})).routes[0].split.weight_bp == basis_points


@given(st.integers(min_value=0, max_value=BASIS_POINTS))
def test_any_basis_point_written_as_a_percentage_parses_back_to_itself(basis_points: int) -> None:
    config = parse(with_canary(split={"weight": basis_points / 100}))

    assert config.routes[0].split.weight_bp == basis_points


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (12.345, "must have at most two decimals"),
        (0.001, "must have at most two decimals"),
        (1e-05, "must have at most two decimals"),
        (-1, "must be between 0 and 100"),
        (-0.01, "must be between 0 and 100"),
        (101, "must be between 0 and 100"),
        (100.01, "must be between 0 and 100"),
        (True, "must be a number"),
        (False, "must be a number"),
        ("5", "must be a number"),
        ("5%", "must be a number"),
        (float("nan"), "must be a number"),
        (float("inf"), "must be a number"),
    ],
)
def test_a_weight_outside_0_to_100_or_finer_than_a_basis_point_is_rejected(
    weight: object, message: str
) -> None:
    assert problems(with_canary(split={"weight": weight})) == [("routes[0].split.weight", message)]


def test_weight_above_100_is_rejected_with_its_path() -> None:
    assert problems(with_canary(split={"weight": 150})) == [
        ("routes[0].split.weight", "must be between 0 and 100")
    ]


# --- Limits --------------------------------------------------------------------------------------


def test_every_limit_can_be_set() -> None:
    data = minimal()
    data["limits"] = {
        "max_header_bytes": 256,
        "max_url_bytes": 1024,
        "max_body_bytes": 10**9,
        "max_response_header_bytes": 4096,
    }

    assert parse(data).limits == Limits(
        max_header_bytes=256,
        max_url_bytes=1024,
        max_body_bytes=10**9,
        max_response_header_bytes=4096,
    )


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"max_header_bytes": 255}, [("limits.max_header_bytes", "must be at least 256")]),
        ({"max_url_bytes": 0}, [("limits.max_url_bytes", "must be at least 256")]),
        (
            {"max_response_header_bytes": 255},
            [("limits.max_response_header_bytes", "must be at least 256")],
        ),
        ({"max_body_bytes": -1}, [("limits.max_body_bytes", "must not be negative")]),
        ({"max_body_bytes": 1.5}, [("limits.max_body_bytes", "must be an integer")]),
        ({"max_body_bytes": "1MB"}, [("limits.max_body_bytes", "must be an integer")]),
        ({"max_url_bytes": True}, [("limits.max_url_bytes", "must be an integer")]),
        ([65536], [("limits", "must be a mapping")]),
    ],
)
def test_a_malformed_limit_is_rejected(limits: object, expected: Problems) -> None:
    data = minimal()
    data["limits"] = limits

    assert problems(data) == expected


def test_a_malformed_timeouts_section_is_rejected() -> None:
    data = minimal()
    data["timeouts"] = "30s"

    assert problems(data) == [("timeouts", "must be a mapping")]


# --- Routes --------------------------------------------------------------------------------------


def test_duplicate_route_names_are_reported_on_the_later_route() -> None:
    data = minimal()
    data["routes"] += copy.deepcopy(data["routes"]) * 2

    assert problems(data) == [
        ("routes[1].name", "duplicate route name (already used by routes[0])"),
        ("routes[2].name", "duplicate route name (already used by routes[0])"),
    ]


def test_broken_route_names_are_not_also_reported_as_duplicates() -> None:
    data = minimal()
    data["routes"] = [{"name": "Shop", "stable": data["routes"][0]["stable"]}] * 2

    assert problems(data) == [
        ("routes[0].name", "must match [a-z0-9-]+"),
        ("routes[1].name", "must match [a-z0-9-]+"),
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Shop", "must match [a-z0-9-]+"),
        ("shop_v2", "must match [a-z0-9-]+"),
        ("shop cart", "must match [a-z0-9-]+"),
        ("", "must not be empty"),
        (42, "must be a string"),
    ],
)
def test_a_route_name_must_be_lower_case_letters_digits_and_dashes(
    name: object, message: str
) -> None:
    data = minimal()
    data["routes"][0]["name"] = name

    assert problems(data) == [("routes[0].name", message)]


@pytest.mark.parametrize("route", [None, "shop", ["shop"]])
def test_a_route_that_is_not_a_mapping_is_rejected(route: object) -> None:
    assert problems({"routes": [route]}) == [("routes[0]", "must be a mapping")]


def test_a_route_needs_a_name_and_a_stable_version() -> None:
    assert problems({"routes": [{}]}) == [
        ("routes[0].name", "is required"),
        ("routes[0].stable", "is required"),
    ]


@pytest.mark.parametrize(
    ("stable", "expected"),
    [
        ({}, [("routes[0].stable.upstreams", "is required")]),
        ({"upstreams": []}, [("routes[0].stable.upstreams", "must not be empty")]),
        ({"upstreams": "http://a:1"}, [("routes[0].stable.upstreams", "must be a list")]),
        ({"upstreams": [None]}, [("routes[0].stable.upstreams[0]", "must be a string")]),
        ("http://a:1", [("routes[0].stable", "must be a mapping")]),
        (
            {"upstreams": ["http://a:1"], "revision": 2.4},
            [("routes[0].stable.revision", "must be a string")],
        ),
    ],
)
def test_a_malformed_stable_version_is_rejected(stable: object, expected: Problems) -> None:
    data = minimal()
    data["routes"][0]["stable"] = stable

    assert problems(data) == expected


# --- Match ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("shop.example.com", "shop.example.com"),
        ("Shop.Example.com:8080", "shop.example.com"),
        ("shop.example.com.", "shop.example.com"),
        ("localhost", "localhost"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]"),
        ("::1", "[::1]"),
        ("FE80::1", "[fe80::1]"),
    ],
)
def test_match_host_is_lower_cased_with_the_port_stripped(host: str, expected: str) -> None:
    data = minimal()
    data["routes"][0]["match"] = {"host": host}

    assert parse(data).routes[0].match == Match(host=expected, path_prefix="/")


@pytest.mark.parametrize("host", ["shop example.com", "*.example.com", "shop:", "[::g]", "a:b:c"])
def test_a_malformed_match_host_is_rejected(host: str) -> None:
    data = minimal()
    data["routes"][0]["match"] = {"host": host}

    assert problems(data) == [
        ("routes[0].match.host", "must be a host name, optionally with :port")
    ]


def test_match_path_prefix_is_kept_as_written() -> None:
    data = minimal()
    data["routes"][0]["match"] = {"path_prefix": "/api/v1/"}

    assert parse(data).routes[0].match == Match(host=None, path_prefix="/api/v1/")


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"path_prefix": "api"}, [("routes[0].match.path_prefix", "must start with /")]),
        (
            {"path_prefix": "/a?b"},
            [("routes[0].match.path_prefix", "must not contain spaces, ? or #")],
        ),
        (
            {"path_prefix": "/a b"},
            [("routes[0].match.path_prefix", "must not contain spaces, ? or #")],
        ),
        (
            {"path_prefix": "/#x"},
            [("routes[0].match.path_prefix", "must not contain spaces, ? or #")],
        ),
        ({"path_prefix": ""}, [("routes[0].match.path_prefix", "must not be empty")]),
        ({"host": 1}, [("routes[0].match.host", "must be a string")]),
        ({"paths": "/"}, [("routes[0].match.paths", "unknown field")]),
        ("/", [("routes[0].match", "must be a mapping")]),
    ],
)
def test_a_malformed_match_is_rejected(match: object, expected: Problems) -> None:
    data = minimal()
    data["routes"][0]["match"] = match

    assert problems(data) == expected


# --- Upstreams -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.1:8000", Upstream(url="http://10.0.0.1:8000", host="10.0.0.1", port=8000)),
        ("http://10.0.0.1", Upstream(url="http://10.0.0.1:80", host="10.0.0.1", port=80)),
        ("http://api:9000/", Upstream(url="http://api:9000", host="api", port=9000)),
        (
            "HTTP://Api.Internal:1",
            Upstream(url="http://api.internal:1", host="api.internal", port=1),
        ),
        ("http://my_service:80", Upstream(url="http://my_service:80", host="my_service", port=80)),
        ("http://[::1]:8000", Upstream(url="http://[::1]:8000", host="::1", port=8000)),
        ("http://[::1]", Upstream(url="http://[::1]:80", host="::1", port=80)),
    ],
)
def test_an_upstream_is_an_http_url_with_host_and_port(url: str, expected: Upstream) -> None:
    data = minimal()
    data["routes"][0]["stable"] = {"upstreams": [url, url]}

    assert parse(data).routes[0].stable.upstreams == (expected, expected)


URL_HINT = "must be a URL like http://host:port"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://10.0.0.1:8443", "only http:// upstreams are supported"),
        ("10.0.0.1:8000", "only http:// upstreams are supported"),
        ("ws://10.0.0.1", "only http:// upstreams are supported"),
        ("http://user:pass@10.0.0.1:8000", "must not contain user info"),
        ("http://user@10.0.0.1", "must not contain user info"),
        ("http://10.0.0.1:8000/api", "must not have a path"),
        ("http://10.0.0.1:8000?x=1", "must not have a query or fragment"),
        ("http://10.0.0.1:8000#top", "must not have a query or fragment"),
        ("http://10.0.0.1:0", "port must be between 1 and 65535"),
        ("http://10.0.0.1:65536", URL_HINT),
        ("http://10.0.0.1:http", URL_HINT),
        ("http://[::1", URL_HINT),
        ("http://[zz]:80", URL_HINT),
        ("http://:8000", URL_HINT),
        ("http://", URL_HINT),
        ("http://a b:80", URL_HINT),
        ("", "must not be empty"),
        (8000, "must be a string"),
    ],
)
def test_a_malformed_upstream_is_rejected_with_its_index(url: object, message: str) -> None:
    data = minimal()
    data["routes"][0]["stable"] = {"upstreams": ["http://10.0.0.1:8000", url]}

    assert problems(data) == [("routes[0].stable.upstreams[1]", message)]


# --- Canary --------------------------------------------------------------------------------------


def test_a_canary_has_its_own_upstreams_and_revision() -> None:
    (shop,) = parse(with_canary()).routes

    assert shop.canary == Version(
        upstreams=(Upstream(url="http://10.0.1.1:8000", host="10.0.1.1", port=8000),),
        revision="v2",
    )


@pytest.mark.parametrize(
    ("canary", "expected"),
    [
        ({"revision": "v2"}, [("routes[0].canary.upstreams", "is required")]),
        ({"upstreams": []}, [("routes[0].canary.upstreams", "must not be empty")]),
        (["http://a:1"], [("routes[0].canary", "must be a mapping")]),
        (
            {"upstreams": ["http://a:1"], "revision": ""},
            [("routes[0].canary.revision", "must not be empty")],
        ),
    ],
)
def test_a_malformed_canary_is_rejected(canary: object, expected: Problems) -> None:
    assert problems(with_canary(canary=canary)) == expected


def test_without_a_canary_a_weight_rollout_or_guard_is_rejected() -> None:
    data = minimal()
    data["routes"][0].update(
        split={"weight": 5}, rollout={"steps": [5, 100], "interval": "1m"}, guard={}
    )

    assert problems(data) == [
        ("routes[0].split.weight", "must be 0 without a canary"),
        ("routes[0].rollout", "requires a canary"),
        ("routes[0].guard", "requires a canary"),
    ]


def test_without_a_canary_a_zero_weight_and_key_sources_are_accepted() -> None:
    data = minimal()
    data["routes"][0]["split"] = {"weight": 0, "sticky": {"header": "X-User-ID"}}

    assert parse(data).routes[0].split.sticky == KeySource(header="x-user-id")


# --- Split ---------------------------------------------------------------------------------------


def test_sticky_and_force_header_names_are_lower_cased_and_cookies_kept() -> None:
    split = {"sticky": {"header": "X-User-ID", "cookie": "UID"}, "force": {"cookie": "canary"}}

    (shop,) = parse(with_canary(split=split)).routes

    assert shop.split.sticky == KeySource(header="x-user-id", cookie="UID")
    assert shop.split.force == KeySource(header=None, cookie="canary")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("routes[0].split.sticky.header", "X User", "must be a valid header name"),
        ("routes[0].split.sticky.header", "X-User:", "must be a valid header name"),
        ("routes[0].split.force.header", "Über", "must be a valid header name"),
        ("routes[0].split.sticky.cookie", "u=id", "must be a valid cookie name"),
        ("routes[0].split.force.cookie", "can;ary", "must be a valid cookie name"),
        ("routes[0].split.force.cookie", 1, "must be a string"),
        ("routes[0].split.sticky", "X-User-ID", "must be a mapping"),
        ("routes[0].split.salt", "", "must not be empty"),
        ("routes[0].split.salt", 7, "must be a string"),
        ("routes[0].split", 5, "must be a mapping"),
    ],
)
def test_a_malformed_split_is_rejected(path: str, value: object, message: str) -> None:
    assert problems_with(path, value) == [(path, message)]


# --- Rollout -------------------------------------------------------------------------------------


def test_a_weight_that_differs_from_the_first_rollout_step_is_rejected() -> None:
    data = with_canary(split={"weight": 10}, rollout={"steps": [12.5, 100], "interval": "1m"})

    assert problems(data) == [
        (
            "routes[0].split.weight",
            "must be omitted or equal rollout.steps[0] (12.5): a rollout starts at its first step",
        )
    ]


def test_an_invalid_weight_beside_a_rollout_is_reported_once() -> None:
    data = with_canary(split={"weight": 500}, rollout={"steps": [5], "interval": "1m"})

    assert problems(data) == [("routes[0].split.weight", "must be between 0 and 100")]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([], [("routes[0].rollout.steps", "must not be empty")]),
        (50, [("routes[0].rollout.steps", "must be a list")]),
        ([0, 50], [("routes[0].rollout.steps[0]", "must be greater than 0")]),
        ([5, 150], [("routes[0].rollout.steps[1]", "must be between 0 and 100")]),
        ([5, 2.555], [("routes[0].rollout.steps[1]", "must have at most two decimals")]),
        ([5, "25"], [("routes[0].rollout.steps[1]", "must be a number")]),
        ([50, 25], [("routes[0].rollout.steps[1]", "must be greater than the previous step")]),
        (
            [5, 5, 50, 40, 100],
            [
                ("routes[0].rollout.steps[1]", "must be greater than the previous step"),
                ("routes[0].rollout.steps[3]", "must be greater than the previous step"),
            ],
        ),
    ],
)
def test_rollout_steps_must_be_ascending_percentages_above_0(
    steps: object, expected: Problems
) -> None:
    assert problems_with("routes[0].rollout.steps", steps) == expected


def test_a_single_step_rollout_up_to_100_is_accepted() -> None:
    (shop,) = parse(with_canary(rollout={"steps": [100], "interval": 1})).routes

    assert shop.rollout == Rollout(steps_bp=(10000,), interval=1.0)
    assert shop.split.weight_bp == BASIS_POINTS


@pytest.mark.parametrize(
    ("rollout", "expected"),
    [
        ({"interval": "1m"}, [("routes[0].rollout.steps", "is required")]),
        ({"steps": [5]}, [("routes[0].rollout.interval", "is required")]),
        (
            {},
            [
                ("routes[0].rollout.steps", "is required"),
                ("routes[0].rollout.interval", "is required"),
            ],
        ),
        ([5, 50], [("routes[0].rollout", "must be a mapping")]),
        (
            {"steps": [5], "interval": "1m", "pause": "1m"},
            [("routes[0].rollout.pause", "unknown field")],
        ),
    ],
)
def test_a_rollout_needs_steps_and_an_interval(rollout: object, expected: Problems) -> None:
    assert problems(with_canary(rollout=rollout)) == expected


# --- Guard ---------------------------------------------------------------------------------------


def test_every_guard_field_can_be_set() -> None:
    guard = {
        "window": "30s",
        "min_requests": 1,
        "max_error_rate": 0,
        "max_error_rate_increase": 1,
        "max_p99_latency": 2,
        "action": "observe",
    }

    assert parse(with_canary(guard=guard)).routes[0].guard == Guard(
        window=30.0,
        min_requests=1,
        max_error_rate=0.0,
        max_error_rate_increase=1.0,
        max_p99_latency=2.0,
        action="observe",
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("min_requests", 0, "must be at least 1"),
        ("min_requests", 2.5, "must be an integer"),
        ("min_requests", "20", "must be an integer"),
        ("max_error_rate", 1.01, "must be between 0 and 1"),
        ("max_error_rate", -0.1, "must be between 0 and 1"),
        ("max_error_rate", "5%", "must be a number"),
        ("max_error_rate", True, "must be a number"),
        ("max_error_rate_increase", 2, "must be between 0 and 1"),
        ("action", "rollforward", "must be rollback or observe"),
        ("action", "Rollback", "must be rollback or observe"),
        ("action", 1, "must be rollback or observe"),
    ],
)
def test_a_malformed_guard_field_is_rejected(field: str, value: object, message: str) -> None:
    path = f"routes[0].guard.{field}"

    assert problems_with(path, value) == [(path, message)]


def test_a_guard_that_is_not_a_mapping_is_rejected() -> None:
    assert problems(with_canary(guard="rollback")) == [("routes[0].guard", "must be a mapping")]


# --- Loader --------------------------------------------------------------------------------------


MINIMAL_YAML = """\
routes:
  - name: shop
    stable: {upstreams: ["http://10.0.0.1:8000"]}
"""


def test_a_file_resolves_relative_paths_against_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "proxy.yaml").write_text(
        MINIMAL_YAML + "state_dir: data\nadmin: {token_file: ../token}\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)

    config = load_config_file(os.path.join("etc", "proxy.yaml"))

    assert config.state_dir == str(folder / "data")
    assert config.admin.token_file == str(tmp_path / "token")


def test_a_missing_file_is_one_problem_naming_it(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")

    with pytest.raises(ConfigError) as caught:
        load_config_file(path)

    assert caught.value.problems == (
        ConfigProblem(path="", message=f"cannot read {path}: No such file or directory"),
    )


def test_a_file_that_is_not_utf8_is_one_problem_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"routes: [\xff]\n")

    with pytest.raises(ConfigError) as caught:
        load_config_file(str(path))

    assert [str(p) for p in caught.value.problems] == [f"cannot read {path}: not UTF-8 text"]


def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("routes:\n  - name: shop\n    stable: {upstreams: [}\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_config_file(str(path))

    (problem,) = caught.value.problems
    assert problem.path == ""
    assert problem.message == (
        "invalid YAML at line 3, column 26: expected the node content, but found '}'"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: b: c\n", "invalid YAML at line 1, column 5: mapping values are not allowed here"),
        ("routes: []\nroutes: []\n", "invalid YAML at line 2, column 1: duplicate key 'routes'"),
        ("{a: 1, a: 2}", "invalid YAML at line 1, column 8: duplicate key 'a'"),
        ("? [1]\n: x\n", "invalid YAML at line 1, column 3: found unhashable key"),
        (
            "a: 1\n---\nb: 2\n",
            "invalid YAML at line 2, column 1:"
            " expected a single document in the stream but found another document",
        ),
        ("a: \x07\n", "invalid YAML: unacceptable character #x0007: special characters are not"
         ' allowed\n  in "<unicode string>", position 3'),
    ],
)  # fmt: skip
def test_invalid_yaml_is_one_problem_without_a_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, base_dir=BASE_DIR)

    assert caught.value.problems == (ConfigProblem(path="", message=message),)


def test_yaml_that_runs_code_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text("routes: !!python/object/apply:os.getpid []\n", base_dir=BASE_DIR)

    (problem,) = caught.value.problems
    assert problem.message.startswith("invalid YAML at line 1, column 9: could not determine")


def test_yaml_text_parses_like_the_same_mapping() -> None:
    assert parse_config_text(MINIMAL_YAML, base_dir=BASE_DIR) == parse(minimal())


def test_an_empty_yaml_document_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text("", base_dir=BASE_DIR)

    assert caught.value.problems == (ConfigProblem(path="", message="config must be a mapping"),)


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_json_text_parses_like_the_same_mapping(content_type: str) -> None:
    text = json.dumps(with_canary(split={"weight": 12.5}))

    config = parse_config_text(text, base_dir=BASE_DIR, content_type=content_type)

    assert config == parse(with_canary(split={"weight": 12.5}))


def test_invalid_json_names_its_line_and_column() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config_text('{"routes": [\n  }', base_dir=BASE_DIR, content_type="application/json")

    assert caught.value.problems == (
        ConfigProblem(path="", message="invalid JSON at line 2, column 3: Expecting value"),
    )


def test_problems_in_json_text_carry_their_paths() -> None:
    text = json.dumps(with_canary(split={"weight": 101}))

    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, base_dir=BASE_DIR, content_type="application/json")

    assert format_problems(caught.value.problems) == (
        "routes[0].split.weight: must be between 0 and 100"
    )


# --- cluster -------------------------------------------------------------------------------------


def test_without_a_cluster_section_a_replica_is_alone() -> None:
    assert parse(minimal()).cluster is None


def test_a_cluster_takes_its_redis_name_password_variable_and_replica() -> None:
    data = minimal()
    data["cluster"] = {
        "redis": "rediss://redis.internal:6380/2",
        "redis_password_env": "REDIS_PW",
        "name": "shop-edge",
        "replica": "edge-1",
    }
    assert parse(data).cluster == Cluster(
        redis="rediss://redis.internal:6380/2",
        redis_password_env="REDIS_PW",
        name="shop-edge",
        replica="edge-1",
    )


def test_a_clusters_replica_id_defaults_to_auto() -> None:
    data = minimal()
    data["cluster"] = {"redis": "unix:///run/redis.sock", "name": "edge"}
    assert parse(data).cluster == Cluster(redis="unix:///run/redis.sock", name="edge")


def test_every_cluster_problem_is_reported_with_its_path() -> None:
    data = minimal()
    data["cluster"] = {"redis": "redis://:6379", "replica": "a b", "redis_password_env": "A-B"}
    assert problems(data) == [
        ("cluster.redis", "must name a host (and a port from 1 to 65535, if any)"),
        ("cluster.name", "is required"),
        ("cluster.redis_password_env", "must be an environment variable name"),
        ("cluster.replica", "must match [A-Za-z0-9_.:-]+"),
    ]


@pytest.mark.parametrize(
    ("redis", "message"),
    [
        ("http://redis:6379", "must be a URL like redis://host:6379/0"),
        ("redis://redis:99999", "must be a URL like redis://host:6379/0"),
        ("redis://redis:0", "must name a host"),
        ("redis://redis:6379/cache", "the path must be a database number"),
        ("unix://run/redis.sock", "a unix:// URL needs an absolute socket path"),
    ],
)
def test_a_malformed_redis_url_is_rejected(redis: str, message: str) -> None:
    data = minimal()
    data["cluster"] = {"redis": redis, "name": "edge"}
    ((path, text),) = problems(data)
    assert path == "cluster.redis"
    assert text.startswith(message)


def test_a_cluster_name_is_part_of_redis_keys_and_must_be_plain() -> None:
    data = minimal()
    data["cluster"] = {"redis": "redis://r", "name": "shop edge"}
    assert problems(data) == [("cluster.name", "must match [A-Za-z0-9_.-]+")]


def test_a_cluster_that_is_not_a_mapping_is_one_problem() -> None:
    data = minimal()
    data["cluster"] = "redis://127.0.0.1:6379"
    assert problems(data) == [("cluster", "must be a mapping")]
