"""What a serving sidecar loads and keeps: modules only some paths need are imported on those
paths, and the parent of `--workers N` becomes a bare interpreter once the workers are forked.

No memory thresholds here (they depend on the machine); the import sets are what moves them.
"""

from __future__ import annotations

import functools
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar import supervisor
from tests.integration.conftest import clean_env
from tests.processes import end

ROOT = Path(__file__).resolve().parents[1]


def _modules(*python: str, code: str) -> set[str]:
    done = subprocess.run(
        [*python, "-c", code + "\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    return set(done.stdout.split())


def test_serving_from_flags_imports_no_config_file_or_error_helpers() -> None:
    loaded = _modules(
        sys.executable,
        code="import sys\n"
        "from sidecar.config import load\n"
        "load(['--listen', '127.0.0.1:5353', '--upstream', '127.0.0.1:5354'], {})\n"
        "import sidecar.app",
    )
    assert "sidecar.app" in loaded
    # tomllib: a config file; difflib: a misspelt key; boto3: Cloud Map; the other commands.
    unwanted = {"tomllib", "difflib", "boto3", "botocore", "sidecar.healthcheck", "sidecar.status"}
    assert not loaded & unwanted


def test_serving_leaves_out_unused_standard_modules_and_hashes_still_work() -> None:
    loaded = _modules(
        sys.executable,
        code="import sys\n"
        "from sidecar import cli\n"
        "cli._leave_out_unused_modules()\n"
        "import sidecar.app\n"
        "import hashlib, hmac, secrets\n"
        "import botocore.auth  # Cloud Map's request signing, when configured\n"
        "mac = hmac.new(b'key', b'message', hashlib.sha256).hexdigest()\n"
        "assert mac.startswith('6e9ef29b75fffc5b'), mac\n"
        "assert len(secrets.token_bytes(8)) == 8\n"
        "for name in [k for k, v in sys.modules.items() if v is None]:\n"
        "    del sys.modules[name]",
    )
    assert "sidecar.app" in loaded and "botocore.auth" in loaded
    assert not loaded & {"bz2", "_bz2", "lzma", "_lzma", "_hashlib"}


def test_the_lean_parent_imports_only_small_modules() -> None:
    loaded = _modules(
        sys.executable,
        "-I",
        "-S",
        code=f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport sidecar.supervisor",
    )
    assert "sidecar.supervisor" in loaded
    heavy = {"typing", "logging", "asyncio", "uvloop", "prometheus_client", "sidecar.config"}
    assert not loaded & heavy


def test_lean_command_needs_an_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    command = supervisor.lean_command([11, 12], "json", "info")
    assert command is not None
    assert command[1:3] == ["-I", "-S"]
    assert Path(command[3]) == Path(supervisor.__file__).resolve()
    assert command[-5:] == [str(ROOT), "json", "info", "11", "12"]
    monkeypatch.setattr(sys, "executable", "")
    assert supervisor.lean_command([11, 12], "json", "info") is None  # then it supervises as is


def _tcp_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ready(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.integration
def test_the_parent_of_workers_becomes_lean_and_still_stops_them(
    loopback: Callable[[], str], free_port: Callable[..., int], tmp_path: Path
) -> None:
    host = loopback()
    port = free_port(host)
    metrics = free_port(host)
    while not _tcp_free(host, metrics + 1):  # worker 1's HTTP port
        metrics = free_port(host)
    unused = free_port(host)  # nothing answers there: the loop probe simply times out
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "sidecar", "--listen", f"{host}:{port}",
                "--upstream", f"{host}:{unused}", "--metrics-listen", f"{host}:{metrics}",
                "--workers", "2", "--drain-seconds", "0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=clean_env(),
            cwd=ROOT,
        )  # fmt: skip
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    try:
        assert _wait(lambda: b"supervisor.py" in cmdline.read_bytes(), 20.0)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2
        for i in range(2):  # each worker has its handlers in place once it is ready
            assert _wait(functools.partial(_ready, f"http://{host}:{metrics + i}/ready"), 20.0)
        proc.send_signal(signal.SIGTERM)  # passed on to both workers, which drain and stop
        assert proc.wait(timeout=15) == 0
    finally:
        end(proc)
    text = log.read_text()
    assert text.count("stopped") >= 2, text
    assert "a worker failed" not in text, text
