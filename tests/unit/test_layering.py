"""The pure core never imports the shell's frameworks, directly or through another module.

Every module of `proxy/core/` (docs/architecture.md) stays free of asyncio, aiohttp,
prometheus_client and yaml (and of uvloop and httptools, the data plane's, and redis, the
fleet's), and of the shell's own packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGE: Final = "proxy"  # our own imports are followed; everything else is a leaf
FORBIDDEN: Final = frozenset(
    {"asyncio", "aiohttp", "prometheus_client", "yaml", "uvloop", "httptools", "redis"}
)
CORE: Final = "proxy.core"
REQUIRED_PURE: Final = ("proxy.core.config", "proxy.core.bucketing", "proxy.core.routing")


def package_modules(package: str) -> tuple[str, ...]:
    """Every module of a package of ours, found on disk: a new module is checked by being there."""
    folder = ROOT.joinpath(*package.split("."))
    modules = set()
    for path in folder.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return tuple(sorted(modules))


PURE_MODULES: Final = package_modules(CORE)

# A module's source and whether it is a package (its `__init__`), or None if it does not exist.
Loader = Callable[[str], tuple[str, bool] | None]


def load_from_tree(module: str) -> tuple[str, bool] | None:
    base = ROOT.joinpath(*module.split("."))
    for path, is_package in ((base.with_suffix(".py"), False), (base / "__init__.py", True)):
        if path.is_file():
            return path.read_text(encoding="utf-8"), is_package
    return None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    # `from . import x` inside a package's __init__ is relative to the package itself.
    package = parts if is_package else parts[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module name `source` may import, wherever the statement sits.

    Imports inside functions or `if TYPE_CHECKING:` count too: a pure module that needs a shell
    type has its layering backwards even if the import never runs.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            found.add(base)
            if base.partition(".")[0] == PACKAGE:
                # `from proxy import config` imports the submodule `proxy.config`.
                found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return found


def _with_parents(module: str) -> list[str]:
    # Importing `proxy.x` first runs `proxy/__init__.py`.
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def forbidden_imports(roots: Iterable[str], load: Loader) -> list[str]:
    """Each forbidden import reachable from `roots`, as `proxy.a -> proxy.b -> asyncio`."""
    problems: list[str] = []
    seen: set[str] = set()
    pending: list[tuple[str, tuple[str, ...]]] = [
        (name, (name,)) for root in roots for name in _with_parents(root)
    ]
    while pending:
        module, chain = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        loaded = load(module)
        if loaded is None:
            continue  # not a proxy module (a class imported by name) or not written yet
        source, is_package = loaded
        for name in sorted(imported_modules(source, module, is_package=is_package)):
            top = name.partition(".")[0]
            if top in FORBIDDEN:
                problems.append(" -> ".join((*chain, name)))
            elif top == PACKAGE:
                pending.extend((parent, (*chain, parent)) for parent in _with_parents(name))
    return sorted(problems)


def _fake_tree(modules: dict[str, str], packages: dict[str, str] | None = None) -> Loader:
    def load(module: str) -> tuple[str, bool] | None:
        if module in modules:
            return modules[module], False
        if packages and module in packages:
            return packages[module], True
        return None

    return load


def test_the_required_pure_modules_exist() -> None:
    assert [m for m in REQUIRED_PURE if load_from_tree(m) is None] == []


def test_no_pure_module_imports_a_shell_framework_directly_or_transitively() -> None:
    assert forbidden_imports(PURE_MODULES, load_from_tree) == []


def test_importing_the_pure_modules_loads_no_shell_framework() -> None:
    # Catches what the source walk cannot see, such as importlib calls.
    present = [m for m in PURE_MODULES if load_from_tree(m) is not None]
    script = (
        "import importlib, sys\n"
        f"for m in {present!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "statement",
    [
        "import asyncio",
        "import aiohttp.web",
        "from aiohttp import web",
        "import prometheus_client as prom",
        "from yaml import safe_load",
        "import uvloop",
        "from httptools import HttpRequestParser",
        "def f():\n    import asyncio",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio",
    ],
)
def test_the_checker_flags_a_direct_forbidden_import(statement: str) -> None:
    flagged = forbidden_imports(["proxy.fake"], _fake_tree({"proxy.fake": statement}))
    assert len(flagged) == 1
    assert flagged[0].startswith("proxy.fake -> ")
    assert flagged[0].rpartition(" -> ")[2].partition(".")[0] in FORBIDDEN


@pytest.mark.parametrize(
    "statement",
    [
        "from proxy import shell",
        "import proxy.shell",
        "from . import shell",
        "from .shell import X",
    ],
)
def test_the_checker_follows_proxy_imports_to_a_forbidden_one(statement: str) -> None:
    tree = _fake_tree({"proxy.core": statement, "proxy.shell": "import asyncio"})
    assert forbidden_imports(["proxy.core"], tree) == ["proxy.core -> proxy.shell -> asyncio"]


def test_the_checker_resolves_relative_imports_from_subpackages() -> None:
    tree = _fake_tree(
        {"proxy.core.rules": "from ..shell import X", "proxy.shell": "import yaml"},
        packages={"proxy.core": "from . import rules"},
    )
    assert forbidden_imports(["proxy.core"], tree) == [
        "proxy.core -> proxy.core.rules -> proxy.shell -> yaml"
    ]


def test_the_checker_flags_a_package_init_that_every_submodule_import_runs() -> None:
    tree = _fake_tree({"proxy.core": "X = 1"}, packages={"proxy": "from proxy.cli import main"})
    tree_cli = _fake_tree(
        {"proxy.core": "X = 1", "proxy.cli": "import aiohttp"},
        packages={"proxy": "from proxy.cli import main"},
    )
    assert forbidden_imports(["proxy.core"], tree) == []
    assert forbidden_imports(["proxy.core"], tree_cli) == ["proxy -> proxy.cli -> aiohttp"]


def test_the_checker_accepts_stdlib_and_allowed_imports() -> None:
    tree = _fake_tree(
        {
            "proxy.core": "import mmh3\nfrom dataclasses import dataclass\nfrom proxy import other",
            "proxy.other": "from __future__ import annotations\nimport asyncio_helpers_not",
        }
    )
    assert forbidden_imports(["proxy.core", "proxy.missing"], tree) == []


# Which of our packages each package may import: the core nothing but itself, the data plane
# the core, the control plane both; the entry points at `proxy/` itself anything.
LAYERS: Final = {
    "proxy.core": frozenset({"proxy.core"}),
    "proxy.dataplane": frozenset({"proxy.core", "proxy.dataplane"}),
    "proxy.control": frozenset({"proxy.core", "proxy.dataplane", "proxy.control"}),
}


def all_modules() -> tuple[str, ...]:
    top = tuple(f"{PACKAGE}.{path.stem}" for path in ROOT.joinpath(PACKAGE).glob("*.py"))
    return tuple(sorted({*top, *(m for layer in LAYERS for m in package_modules(layer))}))


def our_imports(module: str, load: Loader) -> set[str]:
    """The modules of ours that `module` imports (a name imported from a module counts as
    that module)."""
    loaded = load(module)
    if loaded is None:
        return set()
    source, is_package = loaded
    found = set()
    for imported in imported_modules(source, module, is_package=is_package):
        name = imported
        while name.partition(".")[0] == PACKAGE and load(name) is None and "." in name:
            name = name.rpartition(".")[0]  # `from proxy.core.config import Route`
        if name.partition(".")[0] == PACKAGE and load(name) is not None and name != module:
            found.add(name)
    return found


def layer_violations(modules: Iterable[str], load: Loader) -> list[str]:
    problems = []
    for module in modules:
        layer = next((layer for layer in LAYERS if module.startswith(layer + ".")), None)
        if layer is None:
            continue
        for name in sorted(our_imports(module, load)):
            target = next((t for t in LAYERS if name == t or name.startswith(t + ".")), name)
            if target != PACKAGE and target not in LAYERS[layer]:
                problems.append(f"{module} -> {name}")
    return problems


def import_cycles(modules: Iterable[str], load: Loader) -> list[list[str]]:
    """Every import circle among `modules`, each as the path that closes it (Tarjan's strongly
    connected components, so one circle through many modules is reported once)."""
    graph = {m: sorted(our_imports(m, load)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_each_package_imports_only_the_layers_below_it() -> None:
    assert layer_violations(all_modules(), load_from_tree) == []


def test_no_import_circle_in_the_package() -> None:
    # Imports under TYPE_CHECKING or inside functions count: a circle is a design knot even
    # when Python can load it.
    assert import_cycles(all_modules(), load_from_tree) == []


def test_the_layer_check_flags_the_data_plane_importing_the_control_plane() -> None:
    tree = _fake_tree(
        {
            "proxy.dataplane.server": "from proxy.control.holder import RuntimeHolder",
            "proxy.control.holder": "from proxy.dataplane.runtime import Runtime",
            "proxy.dataplane.runtime": "from proxy.core.config import Config",
            "proxy.core.config": "X = 1",
        }
    )
    modules = ["proxy.dataplane.server", "proxy.control.holder", "proxy.dataplane.runtime"]
    assert layer_violations(modules, tree) == ["proxy.dataplane.server -> proxy.control.holder"]


def test_the_cycle_check_finds_a_circle_through_type_checking_imports() -> None:
    tree = _fake_tree(
        {
            "proxy.dataplane.server": "from proxy.dataplane.exchange import Exchange",
            "proxy.dataplane.exchange": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from proxy.dataplane.server import ClientConnection"
            ),
            "proxy.dataplane.runtime": "from proxy.dataplane.exchange import Exchange",
        }
    )
    modules = ["proxy.dataplane.server", "proxy.dataplane.exchange", "proxy.dataplane.runtime"]
    assert import_cycles(modules, tree) == [["proxy.dataplane.exchange", "proxy.dataplane.server"]]
