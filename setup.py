"""The build's one step beyond pyproject.toml: the modules every query runs through are
compiled to C extensions with mypyc (from mypy, the type checker `make test` already runs),
from the same Python source. docs/architecture.md, "Compiled modules", says which, why and
what the code in them must not do; bench/NOTES.md has what it bought.

SIDECAR_BUILD_PURE=1 builds without compiling (no C compiler needed): the same behaviour on
the interpreter alone, about twice the CPU per cache miss. Not a DNS_SIDECAR_* name: the
sidecar refuses to start with an environment variable of that prefix it does not know.
"""

from __future__ import annotations

import os

from setuptools import setup

# The query path: wire format, cache, fast path, forwarding decisions, the resolver, the
# forwarder, the upstream transport and the UDP listener. Nothing that a sidecar without a
# discovery zone does not load, nothing with ctypes or threads.
NATIVE_MODULES = [
    "sidecar/core/bailiwick.py",
    "sidecar/core/cache.py",
    "sidecar/core/counters.py",
    "sidecar/core/fast_path.py",
    "sidecar/core/forwarding.py",
    "sidecar/core/routing.py",
    "sidecar/core/upstream_health.py",
    "sidecar/core/wire.py",
    "sidecar/forwarder.py",
    "sidecar/pipeline.py",
    "sidecar/server/datagram_batch.py",
    "sidecar/server/udp.py",
    "sidecar/server/upstream.py",
]


def native_extensions() -> list[object]:
    if os.environ.get("SIDECAR_BUILD_PURE") == "1":
        return []
    from mypyc.build import mypycify

    # One shared library inside the package (sidecar/native__mypyc...so), so that an
    # editable install finds it as it finds the modules.
    return list(
        mypycify(
            NATIVE_MODULES,
            opt_level="3",
            debug_level="0",
            strip_asserts=True,
            group_name="sidecar.native",
        )
    )


setup(ext_modules=native_extensions())
