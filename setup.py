"""Build: the data plane's hot modules are compiled to C extensions with mypyc.

The same typed source runs interpreted when not compiled (`CANARY_PROXY_COMPILE=0`, or an
editable install before `make compile`); compiled, one core serves about 1.5x the requests
(benchmarks/README.md). Only the shell's per-request code is compiled: the pure core stays
interpreted so its branch coverage can be measured.
"""

from __future__ import annotations

import os

from setuptools import setup

# One list for both builds: `pip install .` (wheels, the container image) and `make compile`
# (in place, for tests and benchmarks of a checkout).
COMPILED_MODULES = [
    "proxy/server.py",
    "proxy/exchange.py",
    "proxy/upstream.py",
    "proxy/runtime.py",
    "proxy/controller.py",
    "proxy/metrics.py",
]


def _ext_modules() -> list[object]:
    if os.environ.get("CANARY_PROXY_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    # A dotted group name keeps mypyc's shared runtime library inside the package.
    return list(mypycify(COMPILED_MODULES, opt_level="3", group_name="proxy._compiled"))


setup(ext_modules=_ext_modules())
