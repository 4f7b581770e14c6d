"""Shell around the pure config parser: reads the file, decodes YAML or JSON, reports problems."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable
from typing import Final

import yaml

from proxy.core.config import Config, ConfigError, ConfigProblem, parse_config

JSON_MEDIA_TYPE: Final = "application/json"


def load_config_file(path: str) -> Config:
    """The config in the YAML file at `path`; relative paths in it resolve against its folder."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise _error(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise _error(f"cannot read {path}: not UTF-8 text") from exc
    return parse_config_text(text, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_config_text(
    text: str, *, base_dir: str, content_type: str = "application/yaml"
) -> Config:
    """The config in `text`: JSON for `application/json` (parameters ignored), else YAML."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    data = _decode_json(text) if media_type == JSON_MEDIA_TYPE else _decode_yaml(text)
    return parse_config(data, base_dir=base_dir)


def format_problems(problems: Iterable[ConfigProblem]) -> str:
    """One line per problem, `path: message`, as `check` prints them."""
    return "\n".join(str(problem) for problem in problems)


def _decode_yaml(text: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        raise _error(f"invalid YAML{where}: {_yaml_reason(exc)}") from exc
    except yaml.YAMLError as exc:
        raise _error(f"invalid YAML: {exc}") from exc


def _yaml_reason(exc: yaml.MarkedYAMLError) -> str:
    # The composer splits one sentence: "expected a single document" + "but found another".
    if exc.context and exc.context.startswith("expected"):
        return f"{exc.context} {exc.problem}"
    return str(exc.problem or exc.context)


def _decode_json(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc


def _error(message: str) -> ConfigError:
    return ConfigError((ConfigProblem(path="", message=message),))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping instead of keeping the last one.

    YAML 1.2 §3.2.1.1 requires keys to be unique; PyYAML silently lets the later value win,
    which hides a typo'd second `weight:` from the operator.
    """

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Hashable, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
