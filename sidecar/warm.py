"""`python -m sidecar.warm`: import every module a running sidecar imports, and nothing else.

Run where the interpreter may write its bytecode cache (the image build, as root; the benchmark
before it measures) with the PYTHONOPTIMIZE the sidecar will run with, so that the .pyc files
for that optimization level exist. Without them every start of the sidecar compiles those
modules again: slower, and the compiler's memory shows in the idle RSS.
"""

from __future__ import annotations

import importlib
import importlib.util

SERVING = (
    "sidecar.launch",
    "sidecar.cli",
    "sidecar.app",
    "sidecar.supervisor",
    "sidecar.healthcheck",
    "sidecar.status",
    "sidecar.metrics",  # imported at the first /metrics request (server/http.py)
    "sidecar.discovery_wiring",  # with the first discovery zone (Config.discovery_zones)
    "dnslib",  # imported when the first discovery answer is shaped
)


def main() -> int:
    for name in SERVING:
        importlib.import_module(name)
    if importlib.util.find_spec("boto3") is not None:  # Cloud Map, when installed
        importlib.import_module("boto3")
        importlib.import_module("sidecar.discovery.cloudmap")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
