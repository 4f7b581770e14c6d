"""The config file's JSON Schema (`canary-proxy schema`): a valid draft 2020-12 schema, built from
the parser's own field tables, and never stricter than the parser."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeAlias, get_args

import pytest
import yaml
from configs import minimal, with_canary
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from proxy.cli import main
from proxy.control.loader import load_config_file
from proxy.core.config import (
    ADDRESS,
    CLUSTER_NAME,
    CONFIG_SECTION,
    DURATION,
    ENV_NAME,
    MATCH_HOST,
    PLAIN_PATH,
    REPLICA,
    ROUTE_NAME,
    TOKEN,
    Config,
    ConfigError,
    FieldSpec,
    SectionSpec,
    ValueKind,
    parse_config,
)
from proxy.core.schema import DIALECT, SCHEMA_ID, config_schema

ROOT: Final = Path(__file__).resolve().parents[2]
EXAMPLES: Final = [ROOT / "config" / "proxy.yaml", *sorted(ROOT.glob("config/examples/*.yaml"))]
BASE_DIR: Final = "/etc/canary-proxy"
SCHEMA: Final = config_schema()
VALIDATOR: Final = Draft202012Validator(SCHEMA)

# Where a value sits in the document: ("routes", 0, "name").
Where: TypeAlias = tuple[str | int, ...]


def dotted(path: Sequence[str | int]) -> str:
    """A document path as the parser writes it: `routes[0].split.weight`."""
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else f".{key}" if text else key
    return text


def parses(data: object) -> Config | None:
    try:
        return parse_config(data, base_dir=BASE_DIR)
    except ConfigError:
        return None


def parser_paths(data: object) -> set[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=BASE_DIR)
    return {problem.path for problem in caught.value.problems}


def schema_paths(data: object) -> set[str]:
    """Where the schema's errors are, each followed into anyOf to the error that explains it."""
    return {dotted(best_match([e]).absolute_path) for e in VALIDATOR.iter_errors(data)}


def schema_messages(data: object) -> list[str]:
    return [best_match([e]).message for e in VALIDATOR.iter_errors(data)]


def put(data: dict[str, Any], path: Where, value: object) -> dict[str, Any]:
    node: Any = data
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else node.setdefault(key, {})
    node[path[-1]] = value
    return data


def drop(data: dict[str, Any], path: Where) -> dict[str, Any]:
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


def full() -> dict[str, Any]:
    """A valid config with every section and every field but token_file (token_env's rival)."""
    return {
        "listen": "127.0.0.1:8080",
        "workers": 2,
        "admin": {"listen": "127.0.0.1:9901", "token_env": "CANARY_PROXY_ADMIN_TOKEN"},
        "state_dir": "./state",
        "timeouts": {
            "connect": "2s",
            "response_header": "30s",
            "idle": "60s",
            "client_header": "10s",
            "shutdown": "30s",
        },
        "limits": {
            "max_header_bytes": 65536,
            "max_url_bytes": 8192,
            "max_body_bytes": 0,
            "max_connections": 10000,
            "max_response_header_bytes": 65536,
        },
        "routes": [
            {
                "name": "shop",
                "match": {"host": "shop.example.com", "path_prefix": "/"},
                "stable": {"upstreams": ["http://10.0.0.1:8000"], "revision": "v1"},
                "canary": {"upstreams": ["http://10.0.1.1:8000"], "revision": "v2"},
                "split": {
                    "weight": 5,
                    "salt": "shop",
                    "sticky": {"header": "X-User-ID", "cookie": "uid"},
                    "force": {"header": "X-Canary", "cookie": "canary"},
                },
                "rollout": {"steps": [5, 25, 50, 100], "interval": "60s"},
                "guard": {
                    "window": "10s",
                    "min_requests": 20,
                    "max_error_rate": 0.05,
                    "max_error_rate_increase": 0.02,
                    "max_p99_latency": "500ms",
                    "action": "rollback",
                },
            }
        ],
        "cluster": {
            "redis": "redis://10.0.9.1:6379/0",
            "redis_password_env": "CANARY_PROXY_REDIS_PASSWORD",
            "name": "shop-edge",
            "replica": "auto",
        },
    }


# The parser's rules across fields: a value written at the key needs the rival gone first.
RIVALS: Final[dict[Where, Where]] = {
    ("admin", "token_file"): ("admin", "token_env"),
    ("routes", 0, "split", "weight"): ("routes", 0, "rollout"),  # weight = the first step
    ("routes", 0, "rollout", "steps"): ("routes", 0, "split", "weight"),
}


def full_without_rival(path: Where) -> dict[str, Any]:
    data = full()
    return drop(data, RIVALS[path]) if path in RIVALS else data


# --- Walking the field tables --------------------------------------------------------------------


def sections(
    section: SectionSpec = CONFIG_SECTION, path: Where = ()
) -> Iterator[tuple[Where, SectionSpec]]:
    """Each section of the document with its path (the first item of a list)."""
    yield path, section
    for field in section.fields:
        if isinstance(field.kind, SectionSpec):
            yield from sections(field.kind, (*path, field.name, *((0,) if field.many else ())))


def leaves() -> Iterator[tuple[Where, FieldSpec]]:
    for path, section in sections():
        for field in section.fields:
            if not isinstance(field.kind, SectionSpec):
                yield (*path, field.name), field


SECTIONS: Final[list[tuple[Where, SectionSpec]]] = list(sections())
LEAVES: Final[list[tuple[Where, FieldSpec]]] = list(leaves())


def schema_object(section: SectionSpec) -> dict[str, Any]:
    if section is CONFIG_SECTION:
        return SCHEMA
    found: dict[str, Any] = SCHEMA["$defs"][section.name]
    return found


def ids(items: Sequence[tuple[Where, Any]]) -> list[str]:
    return [dotted(path) or "<root>" for path, _ in items]


# --- The schema document -------------------------------------------------------------------------


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)

    assert SCHEMA["$schema"] == DIALECT == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["$id"] == SCHEMA_ID
    assert SCHEMA["title"] == "canary-proxy config"


def test_the_schema_is_plain_json_with_javascript_compatible_patterns() -> None:
    text = json.dumps(SCHEMA)

    assert json.loads(text) == SCHEMA
    assert "(?P<" not in text  # Python-only named groups break editors' JavaScript regexes


def test_each_call_returns_a_fresh_schema() -> None:
    schema = config_schema()
    schema["$defs"]["guard"]["properties"]["action"]["enum"].append("explode")

    assert config_schema() == SCHEMA
    assert "explode" not in SCHEMA["$defs"]["guard"]["properties"]["action"]["enum"]


@pytest.mark.parametrize(("path", "section"), SECTIONS, ids=ids(SECTIONS))
def test_each_section_has_exactly_the_parsers_fields_and_nothing_else(
    path: Where, section: SectionSpec
) -> None:
    schema = schema_object(section)

    assert list(schema["properties"]) == list(section.names)
    assert schema["additionalProperties"] is False
    assert schema.get("required", []) == [f.name for f in section.fields if f.required]
    for name, field in schema["properties"].items():
        assert field["description"], name


@pytest.mark.parametrize(("path", "section"), SECTIONS, ids=ids(SECTIONS))
def test_each_section_rejects_an_unknown_field_like_the_parser(
    path: Where, section: SectionSpec
) -> None:
    data = put(full(), (*path, "bogus"), "x")

    assert parser_paths(data) == {dotted((*path, "bogus"))}
    assert schema_paths(data) == {dotted(path)}
    assert any("'bogus' was unexpected" in message for message in schema_messages(data))


def test_the_full_config_sets_every_field_but_token_file() -> None:
    for path, _ in LEAVES:
        node: Any = full()
        for key in path:
            node = node.get(key) if isinstance(node, dict) else node[key]
        assert (node is None) == (path == ("admin", "token_file")), dotted(path)


def test_a_field_the_tables_do_not_know_is_a_parser_bug() -> None:
    with pytest.raises(KeyError):
        CONFIG_SECTION.field("listn")


# --- Example files and valid configs -------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_the_shipped_config_files_validate(path: Path) -> None:
    load_config_file(str(path))  # they are meant to be valid: the parser agrees
    data = yaml.safe_load(path.read_text(encoding="utf-8"))

    assert schema_paths(data) == set()


# Valid configs from test_config.py: the values it shows the parser accepting.
VALID_CONFIGS: Final[list[dict[str, Any]]] = [
    minimal(),
    with_canary(),
    full(),
    put(full_without_rival(("admin", "token_file")), ("admin", "token_file"), "admin.token"),
    {**minimal(), **dict.fromkeys(("listen", "admin", "timeouts", "limits", "state_dir"))},
    put(minimal(), ("routes", 0), {**minimal()["routes"][0], **dict.fromkeys(
        ("match", "canary", "split", "rollout", "guard"))}),
    *(put(minimal(), ("listen",), a) for a in ("0.0.0.0:8080", "LocalHost:1", "127.0.0.1:0",
        "proxy.internal:65535", "[::1]:9901", "[::]:80", "[fe80::1]:0")),
    *(put(minimal(), ("admin",), {"listen": a}) for a in ("[::1]:9901", "localhost:1")),
    put(minimal(), ("admin",), {"token_env": "SHOP_ADMIN_TOKEN"}),
    *(put(minimal(), ("admin",), {"token_file": f}) for f in ("admin.token",
        "../secrets/./admin.token", "/run/secrets/admin")),
    *(put(minimal(), ("state_dir",), s) for s in ("./state", "var/lib", "../common/state/",
        "/var/lib/canary-proxy")),
    *(put(minimal(), ("timeouts", "connect"), d) for d in ("250ms", "10s", "1.5s", "2m", "1h",
        "0.5ms", 3, 0.75)),
    put(minimal(), ("timeouts",), {"connect": "1s", "response_header": "5s", "idle": "90s",
        "client_header": "3s", "shutdown": "1m"}),
    put(minimal(), ("limits",), {"max_header_bytes": 256, "max_url_bytes": 1024,
        "max_body_bytes": 10**9}),
    *(with_canary(split={"weight": w}) for w in (0, 5, 12.5, 0.01, 0.29, 33.33, 99.99, 100,
        100.0, 1.10)),
    with_canary(name="cart"),
    with_canary(split={"salt": "2024-q3"}),
    with_canary(rollout={"steps": [12.5, 100], "interval": "30s"}),
    with_canary(split={"weight": 5}, rollout={"steps": [5, 100], "interval": 60}),
    with_canary(rollout={"steps": [100], "interval": 1}),
    with_canary(split={"weight": 10}, guard={"action": "observe"}),
    with_canary(guard={}),
    with_canary(guard={"window": "30s", "min_requests": 1, "max_error_rate": 0,
        "max_error_rate_increase": 1, "max_p99_latency": 2, "action": "observe"}),
    with_canary(split={"sticky": {"header": "X-User-ID", "cookie": "UID"},
        "force": {"cookie": "canary"}}),
    put(minimal(), ("routes", 0, "split"), {"weight": 0, "sticky": {"header": "X-User-ID"}}),
    put(minimal(), ("routes", 0, "split"), {"weight": 0.0}),
    put(minimal(), ("routes", 0, "split"), {"weight": None}),
    {"routes": [*minimal()["routes"], {"name": "api", "stable": {"upstreams": ["http://a:9"]}}]},
    *(put(minimal(), ("routes", 0, "match"), {"host": h}) for h in ("shop.example.com",
        "Shop.Example.com:8080", "shop.example.com.", "localhost", "10.0.0.1:80", "[::1]",
        "[::1]:8080", "::1", "FE80::1", "fe80::1%eth0")),
    put(minimal(), ("routes", 0, "match"), {"path_prefix": "/api/v1/"}),
    *(put(minimal(), ("routes", 0, "stable", "upstreams"), [u, u]) for u in (
        "http://10.0.0.1:8000", "http://10.0.0.1", "http://api:9000/", "HTTP://Api.Internal:1",
        "http://my_service:80", "http://[::1]:8000", "http://[::1]", "http://h:", "http://h:80?#",
        "http://h:000080/", "http://[v1.fe]:80")),
]  # fmt: skip


@pytest.mark.parametrize("data", VALID_CONFIGS)
def test_configs_the_parser_accepts_validate(data: dict[str, Any]) -> None:
    assert parses(data) is not None
    assert schema_paths(data) == set()


# --- Broken configs ------------------------------------------------------------------------------


# Each broken config, where the schema reports it, and where the parser does.
BROKEN: Final[list[tuple[str, object, str, str]]] = [
    ("unknown top-level key", {**minimal(), "listn": "0.0.0.0:80"}, "", "listn"),
    ("unknown route key", with_canary(wieght=5), "routes[0]", "routes[0].wieght"),
    ("unknown nested key", with_canary(split={"sticky": {"headers": "X-User"}}),
     "routes[0].split.sticky", "routes[0].split.sticky.headers"),
    ("weight is a string", with_canary(split={"weight": "5"}), "routes[0].split.weight",
     "routes[0].split.weight"),
    ("weight above 100", with_canary(split={"weight": 150}), "routes[0].split.weight",
     "routes[0].split.weight"),
    ("limit is a string", put(minimal(), ("limits", "max_body_bytes"), "1MB"),
     "limits.max_body_bytes", "limits.max_body_bytes"),
    ("limit below its minimum", put(minimal(), ("limits", "max_header_bytes"), 100),
     "limits.max_header_bytes", "limits.max_header_bytes"),
    ("duration without a unit", put(minimal(), ("timeouts", "connect"), "10"),
     "timeouts.connect", "timeouts.connect"),
    ("duration with a bad unit", put(minimal(), ("timeouts", "idle"), "10 sec"),
     "timeouts.idle", "timeouts.idle"),
    ("zero duration", put(minimal(), ("timeouts", "shutdown"), "0ms"),
     "timeouts.shutdown", "timeouts.shutdown"),
    ("duration that is a boolean", with_canary(guard={"window": True}), "routes[0].guard.window",
     "routes[0].guard.window"),
    ("routes missing", {}, "", "routes"),
    ("routes empty", {"routes": []}, "routes", "routes"),
    ("stable missing", {"routes": [{"name": "shop"}]}, "routes[0]", "routes[0].stable"),
    ("stable null", put(minimal(), ("routes", 0, "stable"), None), "routes[0].stable",
     "routes[0].stable"),
    ("upstreams missing", with_canary(canary={"revision": "v2"}), "routes[0].canary",
     "routes[0].canary.upstreams"),
    ("upstream over https", with_canary(canary={"upstreams": ["https://10.0.1.1"]}),
     "routes[0].canary.upstreams[0]", "routes[0].canary.upstreams[0]"),
    ("route name in capitals", with_canary(name="Shop"), "routes[0].name", "routes[0].name"),
    ("route that is a string", {"routes": ["shop"]}, "routes[0]", "routes[0]"),
    ("unknown guard action", with_canary(guard={"action": "rollforward"}),
     "routes[0].guard.action", "routes[0].guard.action"),
    ("error rate above 1", with_canary(guard={"max_error_rate": 2}),
     "routes[0].guard.max_error_rate", "routes[0].guard.max_error_rate"),
    ("a zero step", with_canary(rollout={"steps": [0, 50], "interval": "1m"}),
     "routes[0].rollout.steps[0]", "routes[0].rollout.steps[0]"),
    ("rollout without interval", with_canary(rollout={"steps": [5]}), "routes[0].rollout",
     "routes[0].rollout.interval"),
    ("token_env and token_file", put(minimal(), ("admin",), {"token_env": "T", "token_file": "t"}),
     "admin", "admin"),
    ("rollout without a canary", put(minimal(), ("routes", 0, "rollout"),
     {"steps": [5], "interval": "1m"}), "routes[0].rollout", "routes[0].rollout"),
    ("guard without a canary", put(minimal(), ("routes", 0, "guard"), {}), "routes[0].guard",
     "routes[0].guard"),
    ("weight without a canary", put(minimal(), ("routes", 0, "split"), {"weight": 5}),
     "routes[0].split.weight", "routes[0].split.weight"),
    ("config that is a list", [], "", ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "schema_path", "parser_path"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_a_broken_config_is_rejected_at_the_right_path(
    data: object, schema_path: str, parser_path: str
) -> None:
    assert parser_paths(data) == {parser_path}
    assert schema_paths(data) == {schema_path}


@pytest.mark.parametrize(
    ("data", "missing"),
    [({}, "routes"), ({"routes": [{"name": "shop"}]}, "stable"), ({"routes": [{}]}, "name")],
)
def test_a_missing_required_field_is_named(data: object, missing: str) -> None:
    assert f"'{missing}' is a required property" in schema_messages(data)


# --- Value kinds: the schema's checks against the parser's ---------------------------------------


# Values each kind takes or refuses, in the parser and the schema alike; integers are relative to
# the field's minimum. The schema is looser than these (e.g. it takes port 99999) where it must be.
KIND_SAMPLES: Final[dict[ValueKind, tuple[list[object], list[object]]]] = {
    "address": (["0.0.0.0:8080", "LocalHost:1", "[::1]:9901", "proxy.internal:65535"],
                ["8080", ":8080", "localhost", "::1:8080", "host:http", "", 8080]),
    "path": (["./state", "/var/lib/x", "with space"], ["", "  ", 1, ["a"], True]),
    "text": (["v2", "2024-q3", "a b"], ["", " ", 2.4, ["v2"]]),
    "env_name": (["TOKEN", "_T1", "a"], ["1TOKEN", "MY-TOKEN", "", 7]),
    "duration": (["250ms", "10s", "1.5s", "2m", "1h", "0.5ms", "007s", 3, 0.75],
                 ["10", "10 s", "10sec", "1d", "-1s", ".5s", "1e3ms", "", True, False, [10], 0,
                  "0s", "0ms", "00.00h", -2]),
    "integer": ([0, 1, 10**9], [-1, 1.5, "20", True]),
    "route_name": (["shop", "a-1", "0"], ["Shop", "shop_v2", "shop cart", "", 42]),
    "host": (["shop.example.com", "Shop.Example.com:8080", "shop.example.com.", "10.0.0.1:80",
              "[::1]", "[::1]:8080", "::1", "FE80::1", "fe80::1%eth0", "::ffff:1.2.3.4"],
             ["shop example.com", "*.example.com", "shop:", "[::g]", "", 1]),
    "path_prefix": (["/", "/api/v1/", "/a;b"], ["api", "/a?b", "/a b", "/#x", "", 1]),
    "upstream": (["http://10.0.0.1:8000", "http://10.0.0.1", "http://api:9000/",
                  "HTTP://Api.Internal:1", "http://my_service:80", "http://[::1]:8000",
                  "http://[::1]", "http://h:", "http://h:80?", "http://h:80/?#"],
                 ["https://10.0.0.1:8443", "10.0.0.1:8000", "ws://10.0.0.1",
                  "http://user:pass@10.0.0.1:8000", "http://user@10.0.0.1",
                  "http://10.0.0.1:8000/api", "http://10.0.0.1:8000?x=1",
                  "http://10.0.0.1:8000#top", "http://10.0.0.1:http", "http://[::1",
                  "http://:8000", "http://", "http://a b:80", "", 8000, None]),
    "percentage": ([0, 5, 12.5, 0.01, 100, 100.0], [-1, -0.01, 101, 100.01, True, "5", "5%"]),
    "step": ([5, 12.5, 0.01, 100], [0, 0.0, 150, -1, "25", False]),
    "ratio": ([0, 0.05, 1, 1.0], [1.01, -0.1, 2, "5%", True]),
    "header_name": (["X-User-ID", "x_canary", "a"], ["X User", "X-User:", "Über", "", 1]),
    "cookie_name": (["uid", "UID"], ["u=id", "can;ary", "", 1]),
    "guard_action": (["rollback", "observe"], ["rollforward", "Rollback", "", 1]),
    "workers": ([1, 2, 64, 256, "auto"], [0, -1, 257, 1.5, True, "Auto", "2", "", "auto "]),
    "redis_url": (["redis://10.0.0.1:6379/0", "redis://redis", "rediss://:pw@r.internal:6380/2",
                   "unix:///run/redis.sock", "redis://[::1]:6379"],
                  ["http://redis:6379", "redis:6379", "REDIS://r", "redis://", "", 6379]),
    "cluster_name": (["shop-edge", "Edge_1.eu"], ["shop edge", "edge:1", "", 1]),
    "replica": (["auto", "edge-1", "host.local:8080"], ["edge 1", "a/b", "", 1]),
}  # fmt: skip


def samples(field: FieldSpec) -> tuple[list[object], list[object]]:
    assert isinstance(field.kind, str)
    good, bad = KIND_SAMPLES[field.kind]
    if field.kind == "integer":
        good = [field.minimum + int(n) for n in good if isinstance(n, int)]
        bad = [field.minimum + n if isinstance(n, int) and not isinstance(n, bool) else n
               for n in bad]  # fmt: skip
    return good, bad


def test_every_value_kind_has_samples() -> None:
    assert set(KIND_SAMPLES) == set(get_args(ValueKind))
    assert {field.kind for _, field in LEAVES} == set(get_args(ValueKind))


def _at(path: Where, field: FieldSpec, value: object) -> tuple[dict[str, Any], str]:
    """A full config with `value` at `path` (the first item of a list field), and that spot."""
    spot = (*path, 0) if field.many else path
    return put(full_without_rival(path), path, [value] if field.many else value), dotted(spot)


@pytest.mark.parametrize(("path", "field"), LEAVES, ids=ids(LEAVES))
def test_each_field_takes_and_refuses_the_same_samples_in_parser_and_schema(
    path: Where, field: FieldSpec
) -> None:
    good, bad = samples(field)
    for value in good:
        data, _ = _at(path, field, value)
        assert parses(data) is not None, value
        assert schema_paths(data) == set(), value
    for value in bad:
        data, spot = _at(path, field, value)
        assert parser_paths(data) == {spot}, value
        assert schema_paths(data) == {spot}, value


@pytest.mark.parametrize(("path", "field"), LEAVES, ids=ids(LEAVES))
def test_null_reads_as_absent_in_parser_and_schema(path: Where, field: FieldSpec) -> None:
    data = put(full_without_rival(path), path, None)

    if field.required:
        assert parser_paths(data) == schema_paths(data) == {dotted(path)}
    else:
        assert parses(data) is not None
        assert schema_paths(data) == set()


def _defaults() -> Iterator[tuple[Where, object]]:
    for path, section in SECTIONS:
        for name, prop in schema_object(section)["properties"].items():
            if "default" in prop:
                yield (*path, name), prop["default"]


DEFAULTS: Final = list(_defaults())


def test_the_schema_states_the_parsers_defaults() -> None:
    assert [dotted(path) for path, _ in DEFAULTS] == [
        "listen", "workers", "state_dir", "admin.listen", "admin.token_env", "timeouts.connect",
        "timeouts.response_header", "timeouts.idle", "timeouts.client_header",
        "timeouts.shutdown", "limits.max_header_bytes", "limits.max_url_bytes",
        "limits.max_body_bytes", "limits.max_connections", "limits.max_response_header_bytes",
        "routes[0].match.path_prefix",
        "routes[0].split.weight",
        "routes[0].guard.window", "routes[0].guard.min_requests",
        "routes[0].guard.max_error_rate", "routes[0].guard.action", "cluster.replica",
    ]  # fmt: skip


@pytest.mark.parametrize(("path", "default"), DEFAULTS, ids=ids(DEFAULTS))
def test_writing_a_default_out_parses_like_leaving_it_out(path: Where, default: object) -> None:
    base = with_canary(guard={})
    base["cluster"] = {"redis": "redis://redis:6379/0", "name": "edge"}  # its required fields
    data = put(copy.deepcopy(base), path, default)

    assert schema_paths(data) == set()
    assert parses(data) == parses(base)


# --- Never stricter than the parser --------------------------------------------------------------

ASCII: Final = st.characters(codec="ascii", categories=("L", "N", "P", "S", "Zs"))
NOISE: Final = st.one_of(
    st.text(ASCII, max_size=12), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()
)


def _regex(pattern: Any) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True, alphabet=ASCII)


def _any_case(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(text, st.sampled_from([str.lower, str.upper, str.title])).map(
        lambda pair: pair[1](pair[0])
    )


_IPV6: Final = st.ip_addresses(v=6).map(str)
_PORT: Final = st.one_of(st.just(""), st.just(":"), st.integers(0, 99999).map(":{}".format))
_UPSTREAM: Final = st.builds(
    "{}://{}{}{}".format,
    st.sampled_from(["http", "HTTP", "Http", "https"]),
    st.one_of(
        _any_case(_regex(r"[a-z0-9_.-]+")),
        st.ip_addresses(v=4).map(str),
        _IPV6.map("[{}]".format),
    ),
    _PORT,
    st.sampled_from(["", "/", "?", "#", "/?", "?#", "/?#", "/x", "?a", "#a", "//"]),
)
_PERCENT: Final = st.one_of(
    st.integers(-1, 101), st.integers(0, 10_000).map(lambda bp: bp / 100), st.floats(-1, 101)
)

# Values each kind may be written as, valid or nearly: the parser accepts many of them.
CANDIDATES: Final[dict[ValueKind, st.SearchStrategy[object]]] = {
    "address": _regex(ADDRESS),
    "path": st.text(ASCII),
    "text": st.text(ASCII),
    "env_name": _regex(ENV_NAME),
    "duration": st.one_of(_regex(DURATION), st.floats(-1, 1e6), st.integers(-1, 10**6)),
    "integer": st.one_of(st.integers(-1, 10**6), st.floats(-1, 1e6)),
    "route_name": _regex(ROUTE_NAME),
    "host": st.one_of(
        _any_case(_regex(MATCH_HOST)),
        _any_case(_IPV6),
        st.tuples(_IPV6, _PORT).map(lambda pair: f"[{pair[0]}]{pair[1]}"),
    ),
    "path_prefix": _regex(PLAIN_PATH),
    "upstream": _UPSTREAM,
    "percentage": _PERCENT,
    "step": _PERCENT,
    "ratio": st.one_of(st.floats(-0.5, 1.5), st.integers(-1, 2)),
    "header_name": _regex(TOKEN),
    "cookie_name": _regex(TOKEN),
    "guard_action": st.sampled_from(["rollback", "observe", "Rollback", "OBSERVE", "none"]),
    "workers": st.one_of(st.integers(-2, 300), st.sampled_from(["auto", "AUTO", "0", ""])),
    "redis_url": st.builds(
        "{}{}{}{}".format,
        st.sampled_from(["redis://", "rediss://", "unix://", "REDIS://", "redis:"]),
        st.sampled_from(["", "h", "[::1]", ":pw@h", "/run/r.sock"]),
        _PORT,
        st.sampled_from(["", "/", "/0", "/x", "?a"]),
    ),
    "cluster_name": _regex(CLUSTER_NAME),
    "replica": _regex(REPLICA),
}


def test_every_value_kind_has_candidates() -> None:
    assert set(CANDIDATES) == set(get_args(ValueKind))


@pytest.mark.parametrize(("path", "field"), LEAVES, ids=ids(LEAVES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_value_the_parser_accepts_the_schema_accepts(
    path: Where, field: FieldSpec, data: st.DataObject
) -> None:
    assert isinstance(field.kind, str)
    value = data.draw(st.one_of(CANDIDATES[field.kind], NOISE), label=dotted(path))
    config, _ = _at(path, field, value)

    if parses(config) is not None:
        assert schema_paths(config) == set()


def _section_configs(section: SectionSpec) -> st.SearchStrategy[dict[str, Any]]:
    """Mappings of `section` from the field tables: each optional field absent, null or set."""
    return st.fixed_dictionaries(
        {f.name: _field_values(f) for f in section.fields if f.required},
        optional={f.name: st.none() | _field_values(f) for f in section.fields if not f.required},
    )


def _field_values(field: FieldSpec) -> st.SearchStrategy[Any]:
    if isinstance(field.kind, SectionSpec):
        one: st.SearchStrategy[Any] = _section_configs(field.kind)
    else:
        one = st.sampled_from(samples(field)[0])
    return st.lists(one, min_size=1, max_size=3) if field.many else one


def _within_the_cross_field_rules(config: dict[str, Any]) -> dict[str, Any]:
    """The generated config, changed to keep the rules no field table states (nulls stay)."""
    admin = config.get("admin") or {}
    if admin.get("token_env") is not None and admin.get("token_file") is not None:
        admin["token_file"] = None
    for index, route in enumerate(config["routes"]):
        route["name"] = f"{route['name']}-{index}"
        split = route.get("split") or {}
        if route.get("canary") is None:
            route.update({name: None for name in ("rollout", "guard") if name in route})
            if split.get("weight") is not None:
                split["weight"] = 0
        if route.get("rollout") is not None:
            steps = route["rollout"]["steps"] = sorted(set(route["rollout"]["steps"]))
            if split.get("weight") is not None:
                split["weight"] = steps[0]
    return config


@settings(max_examples=300, deadline=None)
@given(config=_section_configs(CONFIG_SECTION).map(_within_the_cross_field_rules))
def test_any_config_the_parser_accepts_the_schema_accepts(config: dict[str, Any]) -> None:
    assert parses(config) is not None  # the generator keeps every rule
    assert schema_paths(config) == set()


# --- The command ---------------------------------------------------------------------------------


def test_the_schema_command_prints_the_schema_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0

    out, err = capsys.readouterr()
    assert json.loads(out) == config_schema()
    assert out.startswith('{\n  "$schema"')  # indented for people, too
    assert err == ""
