"""prometheus_client loaded without its HTTP servers (sidecar/prometheus_lean.py's invariants),
each case in a fresh interpreter: what a sidecar process imports is what is checked."""

from __future__ import annotations

import pytest

from tests.fresh_python import run_python as run

SERVER_MODULES = ("http.server", "urllib.request", "wsgiref.simple_server")


def test_the_sidecar_loads_none_of_the_server_modules_and_still_exposes_metrics() -> None:
    out = run(
        "import sys\n"
        "import sidecar.app\n"
        "from sidecar.prometheus_lean import CollectorRegistry, generate_latest\n"
        "from prometheus_client import Counter\n"
        "registry = CollectorRegistry()\n"
        "Counter('lean_total', 'a test', registry=registry).inc()\n"
        f"print([m in sys.modules for m in {SERVER_MODULES!r}])\n"
        "print(generate_latest(registry).decode().count('lean_total 1.0'))\n"
    )
    assert out.splitlines() == ["[False, False, False]", "1"]


def test_a_later_import_gets_the_real_modules() -> None:
    out = run(
        "import sidecar.prometheus_lean, http.server, urllib.request, wsgiref.simple_server\n"
        "print(http.server.BaseHTTPRequestHandler.__module__, urllib.request.Request.__module__,"
        " wsgiref.simple_server.WSGIServer.__module__)\n"
    )
    assert out == "http.server urllib.request wsgiref.simple_server"


def test_prometheus_clients_own_servers_say_why_they_do_not_work() -> None:
    out = run(
        "import sidecar.prometheus_lean, prometheus_client\n"
        "try:\n"
        "    prometheus_client.start_http_server(0, addr='127.0.0.1')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    assert "not loaded in the sidecar" in out


@pytest.mark.parametrize("first", SERVER_MODULES)
def test_modules_loaded_before_are_left_alone(first: str) -> None:
    out = run(
        f"import {first}, sys\n"
        f"real = sys.modules[{first!r}]\n"
        "import sidecar.prometheus_lean\n"
        f"print(sys.modules[{first!r}] is real)\n"
    )
    assert out == "True"


def test_the_server_imports_the_exposition_at_the_first_scrape_not_at_start() -> None:
    out = run(
        "import sys\n"
        "import sidecar.cli, sidecar.app\n"
        "from sidecar.server.http import HttpListener\n"
        "print('prometheus_client' in sys.modules, 'sidecar.metrics' in sys.modules)\n"
        "made = []\n"
        "def make_registry():\n"
        "    from sidecar.prometheus_lean import CollectorRegistry\n"
        "    from prometheus_client import Counter\n"
        "    made.append(CollectorRegistry())\n"
        "    Counter('lazy_total', 'a test', registry=made[-1]).inc()\n"
        "    return made[-1]\n"
        "http = HttpListener(make_registry, lambda: (True, ''), lambda: {})\n"
        "print(http.respond(b'GET /health HTTP/1.1').status, len(made))\n"
        "for _ in range(2):\n"
        "    page = http.respond(b'GET /metrics HTTP/1.1')\n"
        "    print(page.status, page.body.decode().count('lazy_total 1.0'), len(made))\n"
    )
    assert out.splitlines() == ["False False", "200 0", "200 1 1", "200 1 1"]
