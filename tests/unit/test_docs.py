"""docs/configuration.md keeps in step with the parser's field tables.

Every field the parser knows has a row in one of the page's field tables (a table whose header
starts `| field |`), under its dotted path (`timeouts.connect`; inside a route, from the route:
`split.sticky.header`), and the row gives the field's default as a config file writes it; and
every row names a field the parser knows. A field added, renamed or dropped, or a default
changed, fails here until the page says so too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from proxy.core.config import CONFIG_SECTION, FieldSpec, SectionSpec

ROOT: Final = Path(__file__).resolve().parents[2]
PAGE: Final = ROOT / "docs" / "configuration.md"
_PATH_IN_CELL: Final = re.compile(r"`([a-z_][a-z0-9_.]*)`")


def fields(section: SectionSpec, prefix: str = "") -> Iterator[tuple[str, FieldSpec]]:
    """(dotted path, field) for every field; the items of a list (routes) start a new path."""
    for spec in section.fields:
        path = f"{prefix}{spec.name}"
        yield path, spec
        if isinstance(spec.kind, SectionSpec):
            yield from fields(spec.kind, "" if spec.many else f"{path}.")


def field_rows(text: str) -> dict[str, str]:
    """Every path in the first cell of a field table's rows, and its row."""
    rows: dict[str, str] = {}
    in_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
        elif line.startswith("| field |"):
            in_table = True
        elif in_table and not line.startswith("|---"):
            for path in _PATH_IN_CELL.findall(line.split("|")[1]):
                rows[path] = line
    return rows


def written(spec: FieldSpec) -> str:
    """A default as a config file writes it (durations with a unit, as the schema gives them)."""
    default = spec.default
    if spec.kind == "duration" and isinstance(default, float | int):
        return f"{default:g}s"
    return str(default)


KNOWN: Final = dict(fields(CONFIG_SECTION))


def test_the_walk_finds_nested_and_route_fields() -> None:
    assert {"listen", "timeouts.connect", "routes", "name", "split.sticky.header"} <= set(KNOWN)
    assert "routes.name" not in KNOWN


def test_field_rows_reads_only_field_tables() -> None:
    text = "| field | type |\n|---|---|\n| `a.b`, `c` | x |\n\n| fields | x |\n|---|---|\n| `d` |\n"
    assert set(field_rows(text)) == {"a.b", "c"}


@pytest.mark.parametrize("path", sorted(KNOWN))
def test_every_field_has_a_row_with_its_default(path: str) -> None:
    rows = field_rows(PAGE.read_text(encoding="utf-8"))
    assert path in rows, f"docs/configuration.md has no field-table row for `{path}`"
    spec = KNOWN[path]
    if spec.default is not None:
        assert f"`{written(spec)}`" in rows[path], f"`{path}`: its default is {written(spec)}"


def test_every_row_names_a_field_the_parser_knows() -> None:
    unknown = set(field_rows(PAGE.read_text(encoding="utf-8"))) - set(KNOWN)
    assert not unknown, f"docs/configuration.md documents fields the parser lacks: {unknown}"
