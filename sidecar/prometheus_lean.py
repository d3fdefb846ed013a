"""prometheus_client without its own HTTP servers: ~3 MB less RSS in every task.

A saving of memory, fenced here. Importing prometheus_client imports its exposition module,
which imports http.server, urllib.request and wsgiref.simple_server (and with them http.client,
email, html, socketserver, ...) for its built-in HTTP servers and push-gateway client: ~3 MB of
RSS measured, a tenth of the sidecar's idle RSS. The sidecar serves /metrics itself
(server/http.py) with `generate_latest`, and never uses those.

Invariants:
- prometheus_client is imported only here (an import-linter contract in pyproject.toml), and
  the rest of the sidecar takes its names from this module.
- While prometheus_client is first imported, placeholder modules stand in for those three (with
  placeholder classes and functions of the names it imports), and are taken out of
  sys.modules right after, so any later import of them gets the real modules.
- So prometheus_client's start_http_server, start_wsgi_server, make_wsgi_app, MetricsHandler,
  push_to_gateway and the like do not work in this process; nothing here calls them.
- If one of those modules was imported before (e.g. by a test), nothing is replaced.
"""

from __future__ import annotations

import sys
import types

PLACEHOLDERS = {
    "http.server": ("BaseHTTPRequestHandler",),
    "urllib.request": (
        "BaseHandler", "build_opener", "HTTPHandler", "HTTPRedirectHandler", "HTTPSHandler",
        "Request",
    ),
    "wsgiref.simple_server": ("make_server", "WSGIRequestHandler", "WSGIServer"),
}  # fmt: skip


class _Unavailable:
    """Stands for a class or function of a module the sidecar does not load."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        raise RuntimeError("prometheus_client's HTTP servers are not loaded in the sidecar")


def _placeholder(name: str, names: tuple[str, ...]) -> types.ModuleType:
    module = types.ModuleType(name, "placeholder: see sidecar/prometheus_lean.py")
    for attribute in names:
        setattr(module, attribute, type(attribute, (_Unavailable,), {}))
    return module


def _import_without_servers() -> None:
    stand_ins = {
        name: _placeholder(name, names)
        for name, names in PLACEHOLDERS.items()
        if name not in sys.modules
    }
    if "prometheus_client" in sys.modules:
        return
    sys.modules.update(stand_ins)
    try:
        import prometheus_client  # noqa: F401
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


_import_without_servers()

from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (  # noqa: E402
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector  # noqa: E402

__all__ = [
    "CONTENT_TYPE_LATEST",
    "Collector",
    "CollectorRegistry",
    "CounterMetricFamily",
    "GaugeMetricFamily",
    "HistogramMetricFamily",
    "Metric",
    "ProcessCollector",
    "generate_latest",
]
