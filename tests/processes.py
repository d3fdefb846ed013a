"""Ending the processes a test started, one way for all of them."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence


def end(proc: subprocess.Popen[bytes], sig: int | None = None, timeout: float = 10.0) -> bool:
    """End `proc` if it still runs: `sig` first and up to `timeout` seconds for it to exit
    (None: no signal, no wait), then SIGKILL. True when it ended without the kill."""
    if proc.poll() is not None:
        return True
    if sig is None:
        timeout = 0.0
    else:
        proc.send_signal(sig)
    return _waited(proc, timeout)


def end_all(
    procs: Sequence[subprocess.Popen[bytes]], sig: int, timeout: float = 10.0
) -> list[subprocess.Popen[bytes]]:
    """`end` for many at once: `sig` to every one still running, then each given up to
    `timeout` seconds to exit and killed if it has not; those killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    return [proc for proc in procs if not _waited(proc, timeout)]


def _waited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to `timeout` seconds for `proc` to exit, then kill it; True if it exited."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
