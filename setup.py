"""Build: the data plane's hot modules are compiled to C extensions with mypyc.

The same typed source runs interpreted when not compiled (`CANARY_PROXY_COMPILE=0`, or an
editable install before `make compile`); compiled, one core serves about 1.5x the requests
(benchmarks/README.md). Only the data plane (`proxy/dataplane/`, the per-request code) is
compiled: the pure core stays interpreted so its branch coverage can be measured.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

# The rule, for both builds (`pip install .` for wheels and the container image, `make compile`
# in place for tests and benchmarks): every module of the data plane package is compiled.
COMPILED_PACKAGE = "proxy/dataplane"


def compiled_modules() -> list[str]:
    return sorted(
        str(path) for path in Path(COMPILED_PACKAGE).glob("*.py") if path.name != "__init__.py"
    )


def _ext_modules() -> list[object]:
    if os.environ.get("CANARY_PROXY_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    # A dotted group name keeps mypyc's shared runtime library inside the package.
    return list(mypycify(compiled_modules(), opt_level="3", group_name="proxy._compiled"))


setup(ext_modules=_ext_modules())
