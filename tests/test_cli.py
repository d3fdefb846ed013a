"""The console entry point: check-config, --version, --help and the run command's config part."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar import __version__
from sidecar.addresses import HostPort
from sidecar.cli import main
from sidecar.config import Config
from tests.fresh_python import run_python

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "sidecar.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DNS_SIDECAR_* or ECS variables leak in from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("DNS_SIDECAR_") or name == "ECS_CONTAINER_METADATA_URI_V4":
            monkeypatch.delenv(name)


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Replace sidecar.app with a stub whose run() records its config and returns 0."""
    seen: list[Config] = []

    def run(config: Config, reload: Callable[[], Config]) -> int:
        seen.append(config)
        seen.append(reload())  # SIGHUP reads the same sources again
        return 0

    module = types.ModuleType("sidecar.app")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sidecar.app", module)
    return seen


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    return str(path)


def test_check_config_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, 'listen = ["127.0.0.1:5353"]\nupstreams = ["10.0.0.2"]\n')
    assert main(["check-config", path]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"ok: {path}")
    assert out.count("\n") == 1
    assert "10.0.0.2:53" in out
    assert err == ""


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('upstreams = ["10.0.0.2"]\n[cache]\nmax_ttll = 5\n', "cache.max_ttll"),
        ('upstreams = ["10.0.0.2"]\n[cache]\nmin_ttl = -1\n', "cache.min_ttl"),
        ('upstreams = ["999.1.1.1"]\n', "upstreams"),
        ("listen = [\n", "config"),  # not TOML
    ],
)
def test_check_config_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    assert main(["check-config", write(tmp_path, text)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"config error: {key} = ")


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.toml")
    assert main(["check-config", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: config = {missing!r}: cannot read")
    assert err.count("\n") == 1


def test_check_config_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 2
    assert "FILE" in capsys.readouterr().err


def test_example_file_passes_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {EXAMPLE}")
    assert "(configured)" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dns-sidecar {__version__}"


def test_help_lists_flags_and_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--listen", "--upstream", "--zone", "DNS_SIDECAR_CACHE_MAX_TTL", "check-config"):
        assert text in out


def test_run_passes_the_config_to_the_app(
    fake_app: list[Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DNS_SIDECAR_LOG_LEVEL", "debug")
    assert main(["--listen", "127.0.0.1:5353", "--upstream", "10.0.0.2"]) == 0
    assert main(["run", "--listen", "[::1]:5353", "--upstream", "10.0.0.3"]) == 0
    first, first_reloaded, second, _ = fake_app
    assert first_reloaded == first
    assert first.listen == (HostPort("127.0.0.1", 5353),)
    assert first.log_level == "debug"
    assert second.upstreams == (HostPort("10.0.0.3", 53),)


def test_run_returns_the_app_exit_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = types.ModuleType("sidecar.app")
    module.run = lambda config, reload: 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sidecar.app", module)
    monkeypatch.setenv("DNS_SIDECAR_CONFIG", write(tmp_path, 'upstreams = ["10.0.0.2"]\n'))
    assert main([]) == 7


@pytest.mark.parametrize(
    ("argv", "env", "key"),
    [
        (["--listen", "bad"], {}, "--listen"),
        (["run", "--max-ttl", "-5", "--upstream", "10.0.0.2"], {}, "--max-ttl"),
        (["--upstream", "10.0.0.2"], {"DNS_SIDECAR_LISTN": "127.0.0.1"}, "DNS_SIDECAR_LISTN"),
        (["--upstream", "127.0.0.1"], {}, "--upstream"),  # our own listen address: a loop
    ],
)
def test_run_config_errors_exit_2_before_the_app(
    fake_app: list[Config],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    key: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {key} = ")
    assert err.count("\n") == 1
    assert fake_app == []


def test_unknown_flag_exits_2(fake_app: list[Config], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err
    assert fake_app == []


def test_the_flags_parser_asks_no_terminal_size_and_help_wraps_at_columns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = (
        "import sys\n"
        "from sidecar.config import build_arg_parser, load\n"
        "build_arg_parser(); load(['--listen', '127.0.0.1:5353'], {})\n"
        "print('shutil' in sys.modules, 'bz2' in sys.modules, 'lzma' in sys.modules)\n"
    )
    assert run_python(code).split() == ["False", "False", "False"]
    for columns in ("60", "120"):
        monkeypatch.setenv("COLUMNS", columns)
        assert main(["--help"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(map(len, lines[:-6])) <= int(columns) - 2  # the flags, wrapped
    assert max(map(len, lines)) > 60  # and wider when COLUMNS says so
