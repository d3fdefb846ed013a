"""Ending the processes a test started, one way for all of them."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


def end(proc: subprocess.Popen[bytes], sig: int | None = None, timeout: float = 10.0) -> bool:
    """`end_all` for one process: True when it ended without the kill."""
    return not end_all([proc], sig, timeout)


def end_all(
    procs: Sequence[subprocess.Popen[bytes]], sig: int | None, timeout: float = 10.0
) -> list[subprocess.Popen[bytes]]:
    """End every one of `procs` still running: `sig` to each, then each given up to `timeout`
    seconds to exit (None: no signal, no wait), then SIGKILL; those killed."""
    running = [proc for proc in procs if proc.poll() is None]
    if sig is None:
        timeout = 0.0
    else:
        for proc in running:
            proc.send_signal(sig)
    return [proc for proc in running if not _waited(proc, timeout)]


def _waited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to `timeout` seconds for `proc` to exit, then kill it; True if it exited."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
