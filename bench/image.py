"""The sidecar installed as the image installs it, for the benchmark to run.

The Dockerfile builds a virtualenv from the pinned wheels of requirements.lock, installs the
project into it from a copy of `pyproject.toml`, `README.md`, `setup.py` and `sidecar/` (not
editable; the query path compiled with mypyc by the build tools of requirements-build.lock), and
removes pip and those tools. The development virtualenv (.venv) differs in what every start of
the interpreter pays: the editable install's finder and setuptools' distutils hook are `.pth`
files that site runs, importing pathlib, fnmatch and urllib.parse, which the sidecar does not
use: 4% more instructions to import the server (callgrind: 425.6 against 409.6 million), ~4
ms of a ~170 ms start to the first answer (median of 30 starts each, bench/NOTES.md,
2026-12-06). No deployed sidecar pays it.

The interpreter differs too. The image's (the official `python:3.11` image) is built with
profile-guided and link-time optimisation; so is Debian's `python3.11`, while a plain build
(pyenv's default, which this machine's `python3` and `.venv` are) runs the sidecar's Python
15-20% slower: `bench.miss_path` 28-29 against 19-26 us per miss, alternated, 2026-12-06. The
toys of `bench.ceiling` and `bench.ceiling_miss` run on it too, so a ceiling is measured on
the same interpreter as the sidecar beside it.

So the benchmark runs `dns-sidecar` from `.venv/bench-image`, made here the same way:
- on `OPTIMISED_PYTHON` when it is there with its venv module (Debian: python3.11-venv),
  else on this process's interpreter, said in the results (`BENCH_PYTHON` chooses another);
- built again only when requirements.lock or that interpreter changes (their SHA-256 kept in
  the venv);
- the project reinstalled from this tree at the start of every benchmark process, so the run
  measures the code it sits next to;
- built as the image is built: the tools of requirements-build.lock (setuptools, mypy for
  mypyc) installed for the build and removed after it; pip stays, for the next reinstall,
  and adds no `.pth` file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_VENV = REPO / ".venv" / "bench-image"
LOCK = REPO / "requirements.lock"
BUILD_LOCK = REPO / "requirements-build.lock"  # the Dockerfile's build-time tools
_STAMP = ".requirements-lock.sha256"
_PROJECT_FILES = ("pyproject.toml", "README.md", "setup.py")

# Built as the image's interpreter is (profile-guided, link-time optimised): see above.
OPTIMISED_PYTHON = Path("/usr/bin/python3.11")

_installed: list[Path] = []


def base_python() -> str:
    """The interpreter the image-like virtualenv is made with (see the module's docstring)."""
    chosen = os.environ.get("BENCH_PYTHON")
    if chosen:
        return chosen
    if OPTIMISED_PYTHON.exists():
        probe = subprocess.run(
            [str(OPTIMISED_PYTHON), "-c", "import ensurepip, venv"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return str(OPTIMISED_PYTHON)
    return getattr(sys, "_base_executable", sys.executable)


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


def _build_venv(digest: str, base: str) -> None:
    shutil.rmtree(IMAGE_VENV, ignore_errors=True)
    subprocess.run([base, "-m", "venv", str(IMAGE_VENV)], check=True)
    _pip("--no-deps", "--only-binary=:all:", "-r", str(LOCK))
    (IMAGE_VENV / _STAMP).write_text(digest + "\n")


def _install_project() -> None:
    """This tree's project, built from a copy of what the Dockerfile copies (no build
    directory or egg-info left in the tree) with the image's build tools, removed again."""
    _pip("--no-deps", "--only-binary=:all:", "-r", str(BUILD_LOCK))
    with tempfile.TemporaryDirectory(prefix="bench-image-src-") as tmp:
        src = Path(tmp)
        for name in _PROJECT_FILES:
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(
            REPO / "sidecar", src / "sidecar", ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
        _pip("--no-deps", "--no-build-isolation", "--force-reinstall", str(src))
    subprocess.run(
        [str(IMAGE_VENV / "bin" / "pip"), "uninstall", "--quiet", "--yes", "-r", str(BUILD_LOCK)],
        check=True,
    )


def image_bin() -> Path:
    """The bin directory of the image-like virtualenv, with this tree installed in it; made
    once per benchmark process."""
    if not _installed:
        base = base_python()
        digest = hashlib.sha256(LOCK.read_bytes() + os.fsencode(base)).hexdigest()
        if not _venv_current(digest):
            _build_venv(digest, base)
        _install_project()
        _installed.append(IMAGE_VENV / "bin")
    return _installed[0]


def image_python() -> Path:
    """The image-like virtualenv's interpreter (the toys beside the sidecar run on it)."""
    return image_bin() / "python"


def interpreter_line() -> str:
    """Which interpreter runs the sidecar, for the results: its version and whether it is
    the optimised build (see the module's docstring)."""
    exe = image_python()
    version = subprocess.run(
        [str(exe), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    base = base_python()
    kind = (
        "built with profile-guided and link-time optimisation, as the image's is"
        if base == str(OPTIMISED_PYTHON)
        else "a build of unknown optimisation, not necessarily the image's"
    )
    return f"CPython {version} ({base}: {kind})"
