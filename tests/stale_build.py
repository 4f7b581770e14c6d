"""A pytest plugin (pyproject's `-p stale_build`) that refuses to test stale compiled modules.

After editing a module that `make compile` built, its old extension would shadow the new source
and the tests would pass or fail for the old code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"


def stale_extensions(package: Path) -> list[str]:
    """Modules whose compiled extension is older than their source."""
    stale = []
    for extension in sorted(package.rglob("*.so")):
        source = extension.parent / (extension.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > extension.stat().st_mtime:
            stale.append(str(source.relative_to(package.parent)))
    return stale


def pytest_configure(config: pytest.Config) -> None:
    del config
    stale = stale_extensions(PACKAGE)
    if stale:
        pytest.exit(
            f"compiled modules older than their source: {', '.join(stale)}; run `make compile`",
            returncode=2,
        )
