"""Run inside fresh namespaces by tests/deploy/test_resolv_conf.py (never on its own):

    unshare --net [--mount --propagation private] -- python -m tests.deploy.netns_scenario MODE ...

The network namespace has only its own loopback, so the sidecar can listen on 127.0.0.1:53 (as
in a task) without touching the host's port 53, and nothing sent in it can leave. In mode
`mount` a scratch file is bind-mounted over /etc/resolv.conf in a private mount namespace, as
Docker bind-mounts the task's resolv.conf into each container; the real /etc/resolv.conf of this
machine is never written.

It starts a scripted upstream on 127.0.0.2:53 (the "VPC resolver" named by the scratch file),
then the sidecar with the awsvpc task definition's command and environment, runs the task's
health check, resolves a name through glibc, stops the sidecar with SIGTERM and prints what it
saw as one JSON object on stdout. The test makes the assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.deploy.helpers import (
    SIDECAR,
    TASK_DEF_AWSVPC,
    container,
    container_argv,
    environment,
    health_check_argv,
    load_json,
    process_env,
    run_health_check,
    running,
)
from tests.fakes.scripted_upstream import Answer, ScriptedUpstream

UPSTREAM_HOST = "127.0.0.2"
APP_ADDRESS = "127.0.0.7"  # on loopback: the discovery zone probes it (refused, fails open)


def glibc_lookup(name: str, env: dict[str, str]) -> str:
    """getaddrinfo() in a fresh process: glibc reads /etc/resolv.conf as an application would."""
    code = (
        "import socket, sys\n"
        "try:\n"
        "    infos = socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET, socket.SOCK_STREAM)\n"
        "    print(infos[0][4][0])\n"
        "except socket.gaierror as e:\n"
        "    print('error:', e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, name],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return (proc.stdout + proc.stderr).strip()


def main(mode: str, scratch: str, workdir: str) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = "/etc/resolv.conf" if mode == "mount" else scratch
    if mode == "mount":
        subprocess.run(["mount", "--bind", scratch, "/etc/resolv.conf"], check=True)
    seen: dict[str, Any] = {"mode": mode, "resolv": resolv}
    seen["before"] = Path(resolv).read_text()
    seen["inode_before"] = os.stat(resolv).st_ino

    sidecar = container(load_json(TASK_DEF_AWSVPC), SIDECAR)
    task_env = environment(sidecar)
    # The zones' upstream is the VPC resolver's address: point it at the scripted upstream too
    # (the namespace has no route to it anyway, but nothing is ever sent off loopback).
    zones = [p.split("=", 1)[0] for p in task_env.get("DNS_SIDECAR_ZONES", "").split(";") if p]
    task_env["DNS_SIDECAR_ZONES"] = ";".join(f"{zone}={UPSTREAM_HOST}" for zone in zones)
    if mode != "mount":
        task_env["DNS_SIDECAR_RESOLV_CONF_PATH"] = scratch
    env = process_env(task_env)
    seen["env_overrides"] = sorted(set(task_env.items()) - set(environment(sidecar).items()))

    with ScriptedUpstream(host=UPSTREAM_HOST, port=53) as upstream:
        upstream.set("app.local.", Answer((f"A {APP_ADDRESS}",), ttl=60))
        argv = container_argv(sidecar)
        with running(argv, env, Path(workdir) / "sidecar.log") as proc:
            check = sidecar["healthCheck"]
            started = time.monotonic()
            healthy = None
            while time.monotonic() - started < check["startPeriod"]:
                result = run_health_check(health_check_argv(sidecar), env, check["timeout"])
                if result.returncode == 0:
                    healthy = result
                    break
                time.sleep(0.2)
            seen["healthy_after"] = time.monotonic() - started if healthy else None
            seen["health_output"] = healthy.output if healthy else None
            time.sleep(0.2)  # the rewrite follows the listeners by microseconds; be generous
            seen["during"] = Path(resolv).read_text()
            seen["scratch_during"] = Path(scratch).read_text()
            seen["inode_during"] = os.stat(resolv).st_ino
            if mode == "mount":
                seen["lookup"] = glibc_lookup("app", env)
                seen["upstream_saw_app"] = upstream.count("app.local.")
            proc.proc.send_signal(15)
            seen["exit_code"] = proc.proc.wait(timeout=20)
        seen["log"] = proc.log()
    seen["after"] = Path(resolv).read_text()
    seen["inode_after"] = os.stat(resolv).st_ino
    return seen


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
