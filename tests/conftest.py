"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

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
