"""Fixtures shared by every test directory."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import native
from tests.fakes.nsd import free_port as _free_port
from tests.fakes.nsd import loopback_host


@pytest.fixture
def free_port() -> Callable[..., int]:
    """The helper free_port(host="127.0.0.1") -> a port free on `host` for both UDP and TCP.

    (Binds port 0 over UDP, then the same port over TCP, and releases both.)
    """
    return _free_port


@pytest.fixture
def loopback() -> Callable[[], str]:
    """Hands out distinct IPv4 loopback addresses (127.0.9.x) for servers a test starts."""
    return lambda: loopback_host(9)


def pytest_configure(config: pytest.Config) -> None:
    """Stop at once when a compiled module (`make native`) is older than its source: it
    would be what the tests import, not the code beside it."""
    stale = native.stale_modules()
    if stale:
        pytest.exit(
            f"compiled modules older than their source: {', '.join(stale)}; run `make native`",
            returncode=2,
        )


def pytest_report_header() -> str:
    built = native.compiled_modules()
    if not built:
        return "sidecar: pure Python (no compiled module: `make native` compiles them)"
    return f"sidecar: {len(built)} modules compiled with mypyc (setup.py)"


def pytest_collection_finish(session: pytest.Session) -> None:
    """The atheris run (tests/integration/test_fuzz_atheris.py), started now when it is to
    run: CPU-bound in a process of its own for 20 s, it uses the CPU the unit tests leave
    idle, and its test collects it."""
    from tests.integration import test_fuzz_atheris as fuzz

    if not any(item.nodeid == fuzz.NODE_ID for item in session.items):
        return
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    proc = fuzz.start_fuzzing(workdir)
    if proc is not None:
        session.stash[fuzz.FUZZING] = (proc, workdir)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.integration import test_fuzz_atheris as fuzz

    started = session.stash.get(fuzz.FUZZING, None)
    if started is not None:
        proc, workdir = started
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
