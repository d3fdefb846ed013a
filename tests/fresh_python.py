"""Code run in a fresh interpreter: what a sidecar process imports and sets up at its start is
what the test sees, not what this test process already loaded."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str) -> str:
    """`python -c code` with this interpreter; its stdout, stripped (a failure shows stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
