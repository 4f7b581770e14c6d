"""JSON Schema (draft 2020-12) of the config file, for editors that validate and complete it.

Built from the parser's own field tables (`proxy.config.CONFIG_SECTION`), so the schema knows
exactly the fields the parser knows, which of them are required, and their defaults; where the
parser checks a value with a regular expression, the schema reuses that expression.

The schema never rejects a config the parser accepts, so it is looser where JSON Schema cannot
say what the parser checks: rollout steps ascending, a weight equal to the first step, unique
route names, at most two decimals in a percentage, port ranges, IPv6 and DNS label validity.
The exceptions are inputs nobody writes: ones Python normalises before the parser checks them
(leading spaces and embedded tabs or newlines in an upstream URL, which `urlsplit` drops; the
Kelvin sign, which lower-cases to `k`), and, in an editor's JavaScript regex engine, `\\d` only
takes ASCII digits where Python's `re` takes any script's.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final, TypeAlias, get_args

from proxy.core.config import (
    ADDRESS,
    CLUSTER_NAME,
    CONFIG_SECTION,
    DURATION,
    ENV_NAME,
    MAX_WORKERS,
    PLAIN_PATH,
    REPLICA,
    ROUTE_NAME,
    TOKEN,
    FieldSpec,
    SectionSpec,
    ValueKind,
)
from proxy.core.vocabulary import GuardAction

JSON: TypeAlias = dict[str, Any]

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID: Final = "https://canary-proxy.dev/schema/proxy.json"


def _anchored(regex: re.Pattern[str]) -> str:
    """A parser regex (used with fullmatch) as a JSON Schema pattern, which may match anywhere.

    Named groups are Python syntax (JavaScript spells them differently): they become plain groups.
    """
    return "^(?:" + re.sub(r"\(\?P<\w+>", "(?:", regex.pattern) + ")$"


# The parser lower-cases these two before checking them, so their patterns take either case.
_MATCH_HOST_PATTERN: Final = (
    r"^(?:\[[0-9A-Fa-f:.]+\](?::\d{1,5})?"  # [ipv6], optionally with a port
    r"|[A-Za-z0-9_.-]+(?::\d{1,5})?"  # a name or IPv4 address, optionally with a port
    r"|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[^%]+)?)$"  # a bare IPv6 literal
)
_UPSTREAM_PATTERN: Final = (
    r"^[Hh][Tt][Tt][Pp]://"
    r"(?:\[[^\]/?#@]+\]|[A-Za-z0-9_.-]+)"  # [ipv6] or a host name
    r"(?::[0-9]*)?/?\??#?$"  # a port; no path, query or fragment
)
_NON_BLANK: Final = {"type": "string", "pattern": r"\S"}

_LEAVES: Final[Mapping[ValueKind, JSON]] = {
    "address": {"type": "string", "pattern": _anchored(ADDRESS)},
    "path": _NON_BLANK,
    "text": _NON_BLANK,
    "env_name": {"type": "string", "pattern": _anchored(ENV_NAME)},
    "duration": {
        "type": ["string", "number"],
        "pattern": _anchored(DURATION),
        "not": {"type": "string", "pattern": r"^[0.]+(?:ms|s|m|h)$"},  # zero
        "exclusiveMinimum": 0,
    },
    "integer": {"type": "integer"},  # the field adds its minimum
    "route_name": {"type": "string", "pattern": _anchored(ROUTE_NAME)},
    "host": {"type": "string", "pattern": _MATCH_HOST_PATTERN},
    "path_prefix": {"type": "string", "pattern": _anchored(PLAIN_PATH)},
    "upstream": {"type": "string", "pattern": _UPSTREAM_PATTERN},
    "percentage": {"type": "number", "minimum": 0, "maximum": 100},
    "step": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
    "ratio": {"type": "number", "minimum": 0, "maximum": 1},
    "header_name": {"type": "string", "pattern": _anchored(TOKEN)},
    "cookie_name": {"type": "string", "pattern": _anchored(TOKEN)},
    "guard_action": {"enum": list(get_args(GuardAction))},
    # `minimum` constrains only numbers and `pattern` only strings: an integer >= 1, or auto.
    "workers": {
        "type": ["integer", "string"],
        "minimum": 1,
        "maximum": MAX_WORKERS,
        "pattern": "^auto$",
    },
    "redis_url": {"type": "string", "pattern": "^(?:rediss?|unix)://."},
    "cluster_name": {"type": "string", "pattern": _anchored(CLUSTER_NAME)},
    "replica": {"type": "string", "pattern": _anchored(REPLICA)},
}

_NOT_NULL: Final = {"not": {"type": "null"}}
# Rules across the fields of one section, as far as JSON Schema can state them.
_SECTION_RULES: Final[Mapping[str, JSON]] = {
    "admin": {
        "$comment": "token_env and token_file exclude each other",
        "not": {
            "type": "object",
            "required": ["token_env", "token_file"],
            "properties": {"token_env": _NOT_NULL, "token_file": _NOT_NULL},
        },
    },
    "route": {
        "$comment": "without a canary the weight stays 0, and there is no rollout or guard",
        "if": {"properties": {"canary": {"type": "null"}}},  # also true when canary is absent
        "then": {
            "properties": {
                "split": {"properties": {"weight": {"enum": [0, None]}}},
                "rollout": {"type": "null"},
                "guard": {"type": "null"},
            }
        },
    },
}


def config_schema() -> JSON:
    """The JSON Schema of the config file, as a new JSON-ready dict."""
    schema = {
        "$schema": DIALECT,
        "$id": SCHEMA_ID,
        "title": "canary-proxy config",
        "description": "The canary-proxy config file; check it with `canary-proxy check`.",
        "type": "object",
        **_object(CONFIG_SECTION),
        "$defs": {spec.name: _object(spec) for spec in _nested(CONFIG_SECTION)},
    }
    return copy.deepcopy(schema)  # the parts shared between fields, too, are the caller's


def _nested(section: SectionSpec) -> Iterator[SectionSpec]:
    for field in section.fields:
        if isinstance(field.kind, SectionSpec):
            yield field.kind
            yield from _nested(field.kind)


def _object(section: SectionSpec) -> JSON:
    """A section's fields; where it is used says whether it is an object, or also null."""
    schema: JSON = {
        "properties": {field.name: _property(field) for field in section.fields},
        "additionalProperties": False,
    }
    required = [field.name for field in section.fields if field.required]
    if required:
        schema["required"] = required
    return {**schema, **_SECTION_RULES.get(section.name, {})}


def _property(field: FieldSpec) -> JSON:
    kind = field.kind
    value: JSON = (
        {"$ref": f"#/$defs/{kind.name}", "type": "object"}
        if isinstance(kind, SectionSpec)
        else {**_LEAVES[kind]}
    )
    if kind == "integer":
        value["minimum"] = field.minimum
    if field.many:
        value = {"type": "array", "minItems": 1, "items": value}
    if not field.required:
        value = _or_null(value)
    notes: JSON = {"description": field.description}
    if field.default is not None:
        # Durations are seconds in the model; the file writes them with a unit.
        notes["default"] = f"{field.default:g}s" if kind == "duration" else field.default
    return {**notes, **value}


def _or_null(schema: JSON) -> JSON:
    """An explicit null reads as an absent field."""
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": [*types, "null"]}
