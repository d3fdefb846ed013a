"""The atheris harness (fuzz/fuzz_wire.py), run for a bounded time: coverage-guided fuzzing of
the wire reader in every CI run. `make fuzz` runs it longer, with a corpus kept in fuzz/corpus.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

SECONDS = int(os.environ.get("FUZZ_SECONDS", "20"))


def test_atheris_finds_no_crash_in_the_wire_reader(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is in the test extra; pip install -e '.[test]'")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "fuzz" / "fuzz_wire.py"),
            str(tmp_path / "corpus"),
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        check=False,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, proc.stderr[-5000:]
    assert "Done " in proc.stderr  # libFuzzer's closing line: it ran
