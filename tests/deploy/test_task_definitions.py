"""The ECS task definitions (host mode, awsvpc/Fargate, and the bridge-mode daemon with a bridge
application), the services and the IAM policy.

Checked three ways: against the ECS API model that botocore ships (types, required and unknown
keys by ParamValidator, plus the enums it does not check), by registering them in moto, and by
our own rules for what makes the sidecar work (dnsServers, dependsOn HEALTHY, ranges ECS
enforces, nothing Fargate rejects, every DNS_SIDECAR_* variable accepted by the real config
loader). No network: moto intercepts the calls in-process and fake credentials are set.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.addresses import HostPort
from sidecar.config import ECS_METADATA_ENV, ECS_RESOLVER, load
from tests.deploy.helpers import (
    IAM_POLICY,
    REPO_ROOT,
    SERVICE_DAEMON,
    SERVICE_DEF,
    SIDECAR,
    TASK_DEF,
    TASK_DEF_AWSVPC,
    TASK_DEF_BRIDGE_APP,
    TASK_DEF_DAEMON,
    container,
    container_argv,
    environment,
    health_check_argv,
    load_json,
)

botocore_session = pytest.importorskip("botocore.session")
from botocore.model import Shape  # noqa: E402
from botocore.validate import ParamValidator  # noqa: E402

TASK_DEFS = {"host": TASK_DEF, "awsvpc": TASK_DEF_AWSVPC}
ECS_METADATA = "http://169.254.170.2/v4/0123456789abcdef"  # only read as "we are on ECS"


@pytest.fixture(scope="module")
def ecs_model() -> Any:
    return botocore_session.get_session().get_service_model("ecs")


@pytest.fixture(params=sorted(TASK_DEFS))
def task_def(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_json(TASK_DEFS[request.param])


def enum_errors(value: Any, shape: Shape, where: str = "") -> list[str]:
    """Values outside an enum of the model, which ParamValidator does not check."""
    errors: list[str] = []
    if shape.type_name == "structure" and isinstance(value, dict):
        for key, item in value.items():
            if key in shape.members:
                errors += enum_errors(item, shape.members[key], f"{where}.{key}")
    elif shape.type_name == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            errors += enum_errors(item, shape.member, f"{where}[{i}]")
    elif shape.type_name == "map" and isinstance(value, dict):
        for key, item in value.items():
            errors += enum_errors(item, shape.value, f"{where}[{key}]")
    elif shape.type_name == "string" and shape.enum and value not in shape.enum:
        errors.append(f"{where}: {value!r} not in {shape.enum}")
    return errors


def validate(model: Any, operation: str, params: dict[str, Any]) -> list[str]:
    shape = model.operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    problems = [report.generate_report()] if report.has_errors() else []
    return problems + enum_errors(params, shape)


# --- the API model -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(TASK_DEFS.values()), ids=sorted(TASK_DEFS))
def test_task_definition_matches_the_ecs_model(ecs_model: Any, path: Path) -> None:
    assert validate(ecs_model, "RegisterTaskDefinition", load_json(path)) == []


def test_service_matches_the_ecs_model(ecs_model: Any) -> None:
    assert validate(ecs_model, "CreateService", load_json(SERVICE_DEF)) == []


def test_the_enum_check_catches_what_ecs_rejects(ecs_model: Any) -> None:
    """distinctInstance is a service placement constraint, not one a task definition takes."""
    bad = load_json(TASK_DEF) | {"placementConstraints": [{"type": "distinctInstance"}]}
    shape = ecs_model.operation_model("RegisterTaskDefinition").input_shape
    assert not ParamValidator().validate(bad, shape).has_errors()  # botocore alone lets it by
    assert any("distinctInstance" in e for e in validate(ecs_model, "RegisterTaskDefinition", bad))


# --- moto ---------------------------------------------------------------------------------------


@pytest.fixture
def ecs_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(name, value)
    with moto.mock_aws():
        yield boto3.client("ecs", region_name="us-east-1")


@pytest.mark.parametrize("path", sorted(TASK_DEFS.values()), ids=sorted(TASK_DEFS))
def test_moto_registers_the_task_definition(ecs_client: Any, path: Path) -> None:
    params = load_json(path)
    registered = ecs_client.register_task_definition(**params)["taskDefinition"]
    assert registered["family"] == params["family"]
    assert registered["revision"] == 1
    assert registered["networkMode"] == params["networkMode"]
    names = [c["name"] for c in registered["containerDefinitions"]]
    assert names == [c["name"] for c in params["containerDefinitions"]]
    described = ecs_client.describe_task_definition(taskDefinition=params["family"])
    described_sidecar = container(described["taskDefinition"], SIDECAR)
    assert described_sidecar["healthCheck"] == container(params, SIDECAR)["healthCheck"]


def test_moto_creates_the_service(ecs_client: Any) -> None:
    ecs_client.create_cluster(clusterName="default")
    ecs_client.register_task_definition(**load_json(TASK_DEF))
    service = ecs_client.create_service(**load_json(SERVICE_DEF))["service"]
    assert service["serviceName"] == "app-with-dns-sidecar"
    assert service["taskDefinition"].endswith(":task-definition/app-with-dns-sidecar:1")
    assert service["launchType"] == "EC2"  # (moto does not echo placementConstraints back)


# --- what makes the sidecar work -----------------------------------------------------------------


def test_host_mode_wiring() -> None:
    task_def = load_json(TASK_DEF)
    assert task_def["networkMode"] == "host"
    assert task_def["requiresCompatibilities"] == ["EC2"]
    sidecar, app = container(task_def, SIDECAR), container(task_def, "app")
    # The application resolves through the sidecar: 127.0.0.1 is the instance's loopback in
    # host mode, shared by every container of the task, and the sidecar listens there.
    assert app["dnsServers"] == ["127.0.0.1"]
    assert environment(sidecar)["DNS_SIDECAR_LISTEN"] == "127.0.0.1:53"
    # ECS reserves host ports of host-mode tasks: a second copy cannot land on the instance.
    ports = {
        (p["containerPort"], p.get("hostPort"), p["protocol"]) for p in sidecar["portMappings"]
    }
    assert {(53, 53, "udp"), (53, 53, "tcp"), (9153, 9153, "tcp")} <= ports
    # One task per instance, enforced by the service (a task definition cannot say it).
    service = load_json(SERVICE_DEF)
    assert {"type": "distinctInstance"} in service["placementConstraints"]
    assert service["taskDefinition"] == task_def["family"]
    assert service["deploymentConfiguration"]["maximumPercent"] <= 100  # no spare port 53


def test_awsvpc_wiring() -> None:
    task_def = load_json(TASK_DEF_AWSVPC)
    assert task_def["networkMode"] == "awsvpc"
    sidecar, app = container(task_def, SIDECAR), container(task_def, "app")
    assert "dnsServers" not in app  # not valid on Fargate, not usable in awsvpc
    env = environment(sidecar)
    assert env["DNS_SIDECAR_MANAGE_RESOLV_CONF"] == "true"
    assert env["DNS_SIDECAR_LISTEN"] == "127.0.0.1:53"
    assert sidecar["user"] == "0"  # resolv.conf belongs to root
    assert sidecar.get("readonlyRootFilesystem") is not True  # resolv.conf must stay writable


@pytest.mark.parametrize("path", sorted(TASK_DEFS.values()), ids=sorted(TASK_DEFS))
def test_sidecar_is_essential_healthy_and_depended_on(path: Path) -> None:
    task_def = load_json(path)
    sidecar = container(task_def, SIDECAR)
    assert sidecar["essential"] is True
    assert health_check_argv(sidecar) == ["dns-sidecar", "healthcheck"]
    assert sidecar["healthCheck"]["command"][0] == "CMD"  # no shell needed in the image
    assert 2 <= sidecar["stopTimeout"] <= 120
    assert sidecar["logConfiguration"]["logDriver"] == "awslogs"
    assert {"awslogs-group", "awslogs-region", "awslogs-stream-prefix"} <= set(
        sidecar["logConfiguration"]["options"]
    )
    for other in task_def["containerDefinitions"]:
        if other["name"] != SIDECAR:
            assert {"containerName": SIDECAR, "condition": "HEALTHY"} in other["dependsOn"]


@pytest.mark.parametrize("path", sorted(TASK_DEFS.values()), ids=sorted(TASK_DEFS))
def test_health_check_values_are_in_ecs_ranges(path: Path) -> None:
    check = container(load_json(path), SIDECAR)["healthCheck"]
    assert 5 <= check["interval"] <= 300
    assert 2 <= check["timeout"] <= 60
    assert 1 <= check["retries"] <= 10
    assert 0 <= check["startPeriod"] <= 300
    # The check itself gives up after 2 s; ECS must not kill it before it can say why.
    assert check["timeout"] > 2


@pytest.mark.parametrize("path", sorted(TASK_DEFS.values()), ids=sorted(TASK_DEFS))
def test_prometheus_labels(path: Path) -> None:
    sidecar = container(load_json(path), SIDECAR)
    labels = sidecar["dockerLabels"]
    metrics = environment(sidecar)["DNS_SIDECAR_METRICS_LISTEN"]
    port = metrics.rsplit(":", 1)[1]
    assert labels["ECS_PROMETHEUS_EXPORTER_PORT"] == port
    assert labels["PROMETHEUS_EXPORTER_PORT"] == port
    assert labels["ECS_PROMETHEUS_METRICS_PATH"] == labels["PROMETHEUS_EXPORTER_PATH"] == "/metrics"
    assert labels["PROMETHEUS_EXPORTER_JOB_NAME"] == "dns-sidecar"
    assert ipaddress.ip_address(metrics.rsplit(":", 1)[0]).is_unspecified  # scraped from outside


@pytest.mark.parametrize("path", sorted(TASK_DEFS.values()), ids=sorted(TASK_DEFS))
def test_small_reservations(path: Path) -> None:
    sidecar = container(load_json(path), SIDECAR)
    assert sidecar["cpu"] <= 128
    assert sidecar["memoryReservation"] <= 128
    assert sidecar["memory"] <= 512


# Container fields that Fargate rejects (or that only exist for EC2), and the log drivers and
# capabilities it accepts.
FARGATE_INVALID_CONTAINER_KEYS = {
    "dnsServers",
    "dnsSearchDomains",
    "links",
    "hostname",
    "extraHosts",
    "privileged",
    "dockerSecurityOptions",
    "disableNetworking",
    "ulimits",  # only nofile is allowed; leave them out
}
FARGATE_INVALID_LINUX_KEYS = {"devices", "sharedMemorySize", "tmpfs", "maxSwap", "swappiness"}
FARGATE_LOG_DRIVERS = {"awslogs", "splunk", "awsfirelens"}
# Fargate task sizes: cpu -> allowed memory (MiB) for the smaller sizes a sidecar task uses.
FARGATE_SIZES = {
    "256": {512, 1024, 2048},
    "512": set(range(1024, 4097, 1024)),
    "1024": set(range(2048, 8193, 1024)),
    "2048": set(range(4096, 16385, 1024)),
}


def test_awsvpc_variant_is_fargate_compatible() -> None:
    task_def = load_json(TASK_DEF_AWSVPC)
    assert "FARGATE" in task_def["requiresCompatibilities"]
    assert task_def["networkMode"] == "awsvpc"
    assert "placementConstraints" not in task_def
    assert task_def.get("pidMode") in (None, "task")
    assert "ipcMode" not in task_def
    assert int(task_def["memory"]) in FARGATE_SIZES[task_def["cpu"]]
    assert sum(c.get("cpu", 0) for c in task_def["containerDefinitions"]) <= int(task_def["cpu"])
    limits = [
        c.get("memory", c.get("memoryReservation", 0)) for c in task_def["containerDefinitions"]
    ]
    assert sum(limits) <= int(task_def["memory"])
    for definition in task_def["containerDefinitions"]:
        assert not FARGATE_INVALID_CONTAINER_KEYS & set(definition), definition["name"]
        linux = definition.get("linuxParameters", {})
        assert not FARGATE_INVALID_LINUX_KEYS & set(linux), definition["name"]
        assert set(linux.get("capabilities", {}).get("add", [])) <= {"SYS_PTRACE"}
        assert definition["logConfiguration"]["logDriver"] in FARGATE_LOG_DRIVERS
        for mapping in definition.get("portMappings", []):
            assert mapping.get("hostPort", mapping["containerPort"]) == mapping["containerPort"]
        assert definition.get("stopTimeout", 30) <= 120
        assert definition.get("startTimeout", 0) <= 120


# --- the environment, through the real config loader -------------------------------------------


def load_sidecar_config(path: Path, tmp_path: Path) -> Any:
    """Load the sidecar container's command + environment as the process would on ECS."""
    sidecar = container(load_json(path), SIDECAR)
    argv = container_argv(sidecar)
    assert argv[:1] == ["dns-sidecar"]
    flags = argv[2:] if argv[1:2] == ["run"] else argv[1:]
    resolv = tmp_path / "resolv.conf"  # what an awsvpc task's resolv.conf names: the VPC resolver
    resolv.write_text("nameserver 10.0.0.2\nsearch ec2.internal\n")
    env = {**environment(sidecar), ECS_METADATA_ENV: ECS_METADATA}
    return load(flags, env, resolv_conf=str(resolv))


def test_every_variable_is_accepted(tmp_path: Path) -> None:
    for path in TASK_DEFS.values():
        names = environment(container(load_json(path), SIDECAR))
        assert all(name.startswith("DNS_SIDECAR_") for name in names), names
        load_sidecar_config(path, tmp_path)  # an unknown or bad variable raises ConfigError


def test_host_mode_configuration(tmp_path: Path) -> None:
    config = load_sidecar_config(TASK_DEF, tmp_path)
    assert config.listen == (HostPort("127.0.0.1", 53),)
    assert config.upstreams == (HostPort(ECS_RESOLVER, 53),)
    assert config.upstream_source == "configured"
    assert [(z.name, z.upstreams) for z in config.zones] == [
        ("local", (HostPort(ECS_RESOLVER, 53),))
    ]
    assert config.metrics_listen == HostPort("0.0.0.0", 9153)
    assert config.manage_resolv_conf is False


def test_awsvpc_configuration(tmp_path: Path) -> None:
    config = load_sidecar_config(TASK_DEF_AWSVPC, tmp_path)
    assert config.manage_resolv_conf is True
    assert config.upstreams == (HostPort("10.0.0.2", 53),)  # taken from the task's resolv.conf
    assert config.upstream_source == "resolv.conf"
    assert [z.name for z in config.zones] == ["local"]


def test_dockerfile_cmd_is_accepted() -> None:
    argv = container_argv({})  # the image's own ENTRYPOINT + CMD
    config = load(argv[1:], {ECS_METADATA_ENV: ECS_METADATA})
    assert config.listen == (HostPort("127.0.0.1", 53),)
    assert config.metrics_listen == HostPort("0.0.0.0", 9153)


# --- IAM and Prometheus ------------------------------------------------------------------------


def test_iam_policy_allows_discover_instances() -> None:
    policy = load_json(IAM_POLICY)
    assert policy["Version"] == "2012-10-17"
    actions = {a for s in policy["Statement"] if s["Effect"] == "Allow" for a in s["Action"]}
    assert "servicediscovery:DiscoverInstances" in actions
    # Read-only discovery and nothing else.
    assert all(a.startswith("servicediscovery:Discover") for a in actions)


SCRAPE = REPO_ROOT / "config" / "prometheus-scrape.yml"


def test_prometheus_scrape_example() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(SCRAPE.read_text())
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    assert jobs["dns-sidecar"]["metrics_path"] == "/metrics"


def commented_option_b() -> str:
    """The host-mode EC2 discovery job, which the example carries commented out."""
    lines = SCRAPE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - job_name:"))
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append("  " + line[len("  # ") :])
    return "scrape_configs:\n" + "\n".join(block) + "\n"


@pytest.mark.integration
def test_promtool_accepts_the_scrape_examples(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    option_b = tmp_path / "option-b.yml"
    option_b.write_text(commented_option_b())
    for path in (SCRAPE, option_b):
        proc = subprocess.run(
            [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout + proc.stderr


def test_json_files_are_formatted_as_json() -> None:
    for path in [TASK_DEF, TASK_DEF_AWSVPC, SERVICE_DEF, IAM_POLICY, *BRIDGE_MODE.values()]:
        json.loads(path.read_text())


# --- bridge mode: the per-instance daemon ------------------------------------------------------

BRIDGE_MODE = {
    "daemon": TASK_DEF_DAEMON,
    "bridge-app": TASK_DEF_BRIDGE_APP,
    "daemon-service": SERVICE_DAEMON,
}
DOCKER0 = "172.17.0.1"  # the docker0 bridge's address on the instance: bridge tasks' gateway


@pytest.mark.parametrize("name", ["daemon", "bridge-app"])
def test_bridge_mode_task_definitions_match_the_ecs_model_and_register(
    ecs_model: Any, ecs_client: Any, name: str
) -> None:
    params = load_json(BRIDGE_MODE[name])
    assert validate(ecs_model, "RegisterTaskDefinition", params) == []
    registered = ecs_client.register_task_definition(**params)["taskDefinition"]
    assert registered["networkMode"] == params["networkMode"]


def test_the_daemon_service_matches_the_ecs_model_and_is_created(
    ecs_model: Any, ecs_client: Any
) -> None:
    params = load_json(SERVICE_DAEMON)
    assert validate(ecs_model, "CreateService", params) == []
    ecs_client.create_cluster(clusterName="default")
    ecs_client.register_task_definition(**load_json(TASK_DEF_DAEMON))
    service = ecs_client.create_service(**params)["service"]
    assert service["schedulingStrategy"] == "DAEMON"


def test_bridge_mode_wiring(tmp_path: Path) -> None:
    daemon_def, app_def = load_json(TASK_DEF_DAEMON), load_json(TASK_DEF_BRIDGE_APP)
    service = load_json(SERVICE_DAEMON)
    # One sidecar per instance, on the instance's own network: a DAEMON service of a host-mode
    # task, no desired count, and no second copy waiting for port 53 during a deployment.
    assert daemon_def["networkMode"] == "host" and daemon_def["requiresCompatibilities"] == ["EC2"]
    assert service["schedulingStrategy"] == "DAEMON" and "desiredCount" not in service
    assert service["taskDefinition"] == daemon_def["family"]
    assert service["deploymentConfiguration"]["maximumPercent"] <= 100
    [sidecar] = daemon_def["containerDefinitions"]
    assert sidecar["name"] == SIDECAR and sidecar["essential"]
    # Bridge containers resolve through the docker0 gateway address, where the daemon listens
    # (and on 127.0.0.1, for the instance itself), and their network is allowed.
    app = container(app_def, "app")
    assert app_def["networkMode"] == "bridge" and app["dnsServers"] == [DOCKER0]
    config = load_sidecar_config(TASK_DEF_DAEMON, tmp_path)
    assert set(config.listen) == {HostPort(DOCKER0, 53), HostPort("127.0.0.1", 53)}
    bridge = ipaddress.ip_network("172.17.0.0/16")
    assert any(bridge.subnet_of(net) for net in config.allow if net.version == 4)
    assert config.upstreams == (HostPort(ECS_RESOLVER, 53),)
    # The instance's one packet budget towards the VPC resolver, below its 1024 per second.
    assert 0 < config.upstream.max_packets_per_second < 1024
