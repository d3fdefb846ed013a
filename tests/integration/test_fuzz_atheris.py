"""The atheris harness (fuzz/fuzz_wire.py), run for a bounded time: coverage-guided fuzzing of
the wire reader in every CI run. `make fuzz` runs it longer, with a corpus kept in fuzz/corpus.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO_ROOT
from tests.processes import end

pytestmark = pytest.mark.integration

SECONDS = int(os.environ.get("FUZZ_SECONDS", "20"))
NODE_ID = "tests/integration/test_fuzz_atheris.py::test_atheris_finds_no_crash_in_the_wire_reader"
# The run tests/conftest.py started (the process, its work directory), in the session's stash.
FUZZING = pytest.StashKey[tuple[subprocess.Popen[bytes], Path]]()


def start_fuzzing(workdir: Path) -> subprocess.Popen[bytes] | None:
    """The harness running for SECONDS in `workdir` (its corpus, crashes and output there), or
    None without atheris. tests/conftest.py starts it when the session begins: it keeps one
    CPU busy, and the unit tests, which run first, use the other (~20 s off the suite)."""
    if importlib.util.find_spec("atheris") is None:
        return None
    with open(workdir / "fuzz.err", "wb") as err:
        return subprocess.Popen(
            [
                sys.executable,
                str(REPO_ROOT / "fuzz" / "fuzz_wire.py"),
                str(workdir / "corpus"),
                f"-max_total_time={SECONDS}",
                "-rss_limit_mb=1024",
                f"-artifact_prefix={workdir}/",
            ],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def test_atheris_finds_no_crash_in_the_wire_reader(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    pytest.importorskip("atheris", reason="atheris is in the test extra; pip install -e '.[test]'")
    started = request.session.stash.get(FUZZING, None)
    proc, workdir = started if started is not None else (start_fuzzing(tmp_path), tmp_path)
    assert proc is not None
    try:
        proc.wait(timeout=SECONDS + 120)
    finally:
        end(proc)
    stderr = (workdir / "fuzz.err").read_text(errors="replace")
    crashes = sorted(p.name for p in workdir.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, stderr[-5000:]
    assert "Done " in stderr  # libFuzzer's closing line: it ran
