"""Shared by the deployment tests: the task definitions, the image's entry point, and running
the sidecar and its health check the way ECS would (as processes, with the task's environment).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.processes import end

REPO_ROOT = Path(__file__).resolve().parents[2]
TASK_DEF = REPO_ROOT / "ecs-task-def.json"
TASK_DEF_AWSVPC = REPO_ROOT / "config" / "ecs-task-def-awsvpc.json"
SERVICE_DEF = REPO_ROOT / "config" / "ecs-service.json"
# Bridge mode: one sidecar per instance (a DAEMON service), the tasks' containers point at it.
TASK_DEF_DAEMON = REPO_ROOT / "config" / "ecs-task-def-daemon.json"
SERVICE_DAEMON = REPO_ROOT / "config" / "ecs-service-daemon.json"
TASK_DEF_BRIDGE_APP = REPO_ROOT / "config" / "ecs-task-def-bridge-app.json"
IAM_POLICY = REPO_ROOT / "config" / "iam-task-role-policy.json"
DOCKERFILE = REPO_ROOT / "Dockerfile"
SIDECAR = "dns-sidecar"  # the container name in both task definitions

# Where the console script `dns-sidecar` of this checkout lives (the image puts its virtualenv's
# bin/ first on PATH the same way).
VENV_BIN = Path(sys.executable).parent
# An address nothing listens on: a loopback address of its own, on a port nobody uses. A UDP
# query to it is answered by an ICMP port-unreachable at once, so the sidecar sees its upstream
# as down (refused), never a real resolver.
UNREACHABLE = "127.0.0.254:5399"


def load_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def container(task_def: Mapping[str, Any], name: str) -> dict[str, Any]:
    for definition in task_def["containerDefinitions"]:
        if definition["name"] == name:
            found: dict[str, Any] = definition
            return found
    raise KeyError(name)


def environment(definition: Mapping[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in definition.get("environment", [])}


def dockerfile_json_instruction(instruction: str) -> list[str]:
    """The JSON (exec-form) argument of the last ENTRYPOINT / CMD of the Dockerfile."""
    found: list[str] | None = None
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(instruction + " "):
            found = json.loads(line[len(instruction) + 1 :])
    assert found is not None, f"no {instruction} in the Dockerfile"
    return found


def container_argv(definition: Mapping[str, Any]) -> list[str]:
    """What the container runs: the image's ENTRYPOINT + the task's command (else the CMD)."""
    entrypoint = definition.get("entryPoint") or dockerfile_json_instruction("ENTRYPOINT")
    command = definition.get("command") or dockerfile_json_instruction("CMD")
    return [*entrypoint, *command]


def health_check_argv(definition: Mapping[str, Any]) -> list[str]:
    """The container healthCheck command as a process argv (CMD form, or CMD-SHELL via sh)."""
    kind, *rest = definition["healthCheck"]["command"]
    if kind == "CMD":
        return list(rest)
    assert kind == "CMD-SHELL", kind
    return ["/bin/sh", "-c", " ".join(rest)]


def process_env(task_env: Mapping[str, str]) -> dict[str, str]:
    """A clean process environment: PATH with our virtualenv first, plus the task's variables.

    Nothing else from the machine running the tests leaks in (no DNS_SIDECAR_*, no
    ECS_CONTAINER_METADATA_URI_V4).
    """
    return {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **task_env}


@dataclass
class HealthResult:
    returncode: int
    output: str
    seconds: float


def run_health_check(argv: list[str], env: Mapping[str, str], timeout: float) -> HealthResult:
    """Run a health check command as Docker does: a process, killed after `timeout` seconds."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return HealthResult(-1, "timed out", time.monotonic() - started)
    return HealthResult(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running(argv: list[str], env: Mapping[str, str], log_path: Path) -> Iterator[Running]:
    """Start `argv`; at the end SIGTERM it (as ECS stops a container) and wait for the exit."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO_ROOT
        )
    run = Running(proc, log_path)
    try:
        yield run
    finally:
        end(proc, signal.SIGTERM, timeout=20)


def describe(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def is_root() -> bool:
    return os.geteuid() == 0
