"""The sidecar installed as the image installs it, for the benchmark to run.

The Dockerfile builds a virtualenv from the pinned wheels of requirements.lock, installs the
project into it from a copy of `pyproject.toml`, `README.md` and `sidecar/` (not editable), and
removes pip and setuptools. The development virtualenv (.venv) differs in what every start of
the interpreter pays: the editable install's finder and setuptools' distutils hook are `.pth`
files that site runs, importing pathlib, fnmatch and urllib.parse, which the sidecar does not
use: 4% more instructions to import the server (callgrind: 425.6 against 409.6 million), ~4
ms of a ~170 ms start to the first answer (median of 30 starts each, bench/NOTES.md,
2026-12-06). No deployed sidecar pays it.

So the benchmark runs `dns-sidecar` from `.venv/bench-image`, made here the same way:
- built again only when requirements.lock changes (its SHA-256 kept in the venv);
- the project reinstalled from this tree at the start of every benchmark process, so the run
  measures the code it sits next to;
- no setuptools left in it (the Dockerfile pins the one it builds with and removes it); pip
  stays, for the next reinstall, and adds no `.pth` file.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_VENV = REPO / ".venv" / "bench-image"
LOCK = REPO / "requirements.lock"
SETUPTOOLS = "setuptools==80.9.0"  # the Dockerfile's build-time pin
_STAMP = ".requirements-lock.sha256"
_PROJECT_FILES = ("pyproject.toml", "README.md")

_installed: list[Path] = []


def _pip(*args: str) -> None:
    subprocess.run(
        [
            str(IMAGE_VENV / "bin" / "pip"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *args,
        ],
        check=True,
    )


def _venv_current(digest: str) -> bool:
    stamp = IMAGE_VENV / _STAMP
    return stamp.is_file() and stamp.read_text().strip() == digest


def _build_venv(digest: str) -> None:
    shutil.rmtree(IMAGE_VENV, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(IMAGE_VENV)], check=True)
    _pip("--no-deps", "--only-binary=:all:", "-r", str(LOCK))
    (IMAGE_VENV / _STAMP).write_text(digest + "\n")


def _install_project() -> None:
    """This tree's project, built from a copy of what the Dockerfile copies (no build
    directory or egg-info left in the tree), then setuptools removed again."""
    _pip("--no-deps", SETUPTOOLS)
    with tempfile.TemporaryDirectory(prefix="bench-image-src-") as tmp:
        src = Path(tmp)
        for name in _PROJECT_FILES:
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(
            REPO / "sidecar", src / "sidecar", ignore=shutil.ignore_patterns("__pycache__")
        )
        _pip("--no-deps", "--no-build-isolation", "--force-reinstall", str(src))
    subprocess.run(
        [str(IMAGE_VENV / "bin" / "pip"), "uninstall", "--quiet", "--yes", "setuptools"],
        check=True,
    )


def image_bin() -> Path:
    """The bin directory of the image-like virtualenv, with this tree installed in it; made
    once per benchmark process."""
    if not _installed:
        digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()
        if not _venv_current(digest):
            _build_venv(digest)
        _install_project()
        _installed.append(IMAGE_VENV / "bin")
    return _installed[0]
