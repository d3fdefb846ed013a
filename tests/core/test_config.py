"""The configuration: defaults, the three layers, validation and upstream defaulting."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from sidecar import config as cfg
from sidecar.addresses import HostPort, parse_hostport
from sidecar.config import GROUPS, Config, Zone, load, load_file
from sidecar.config.settings import TABLES
from sidecar.core.cache import CacheSettings
from sidecar.errors import ConfigError

RESOLV = "nameserver 10.9.9.9\n"


def make(
    tmp_path: Path,
    toml: str | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
    resolv: str = RESOLV,
) -> Config:
    """Load with an optional config file, an explicit environment and a private resolv.conf."""
    resolv_path = tmp_path / "resolv.conf"
    resolv_path.write_text(resolv)
    args = list(argv)
    if toml is not None:
        path = tmp_path / "sidecar.toml"
        path.write_text(textwrap.dedent(toml))
        args = ["--config", str(path), *args]
    return load(args, dict(env or {}), resolv_conf=str(resolv_path))


def hp(text: str) -> HostPort:
    return parse_hostport(text, 53, "test")


# ---------------------------------------------------------------------------------------------
# The model and the table


def test_defaults(tmp_path: Path) -> None:
    config = make(tmp_path)
    assert config == Config(
        listen=(HostPort("127.0.0.1", 53),),
        upstreams=(HostPort("10.9.9.9", 53),),
        upstream_source="resolv.conf",
        zones=(),
        cache=CacheSettings(),
        resolv_conf_path=str(tmp_path / "resolv.conf"),  # the file it was given
    )
    assert config.cache == CacheSettings(100_000, 0, 86_400, 60, 5)
    assert (config.attempt_timeout, config.query_timeout) == (1.0, 4.0)
    assert (config.tcp.idle_timeout, config.tcp.max_connections) == (10.0, 256)
    assert (config.log_format, config.log_level) == ("json", "info")


def test_table_defaults_agree_with_the_dataclasses() -> None:
    for s in cfg.SETTINGS:
        group, _, name = s.key.rpartition(".")
        if s.key in cfg.ZONE_OPTION_SETTINGS:
            continue  # folded into Config.zones
        owner = GROUPS[group] if group else Config
        (found,) = [f for f in dataclasses.fields(owner) if f.name == name]
        if found.default is not dataclasses.MISSING:
            assert s.default == found.default, s.key
    covered = {
        s.key for s in cfg.SETTINGS if "." not in s.key and s.key not in cfg.ZONE_OPTION_SETTINGS
    }
    assert {f.name for f in dataclasses.fields(Config)} == covered | set(GROUPS) | {
        "upstream_source"
    }
    assert GROUPS["cache"] is CacheSettings
    assert set(GROUPS) == TABLES  # every [table] of the file is a group of the model
    for group, settings_type in GROUPS.items():
        keys = {s.key[len(group) + 1 :] for s in cfg.SETTINGS if s.key.startswith(group + ".")}
        assert {f.name for f in dataclasses.fields(settings_type)} == keys, group
        (on_config,) = [f for f in dataclasses.fields(Config) if f.name == group]
        assert on_config.default_factory is settings_type, group  # type: ignore[comparison-overlap]


def test_env_names_are_the_documented_ones() -> None:
    documented = {
        "DNS_SIDECAR_CONFIG",
        "DNS_SIDECAR_LISTEN",
        "DNS_SIDECAR_UPSTREAMS",
        "DNS_SIDECAR_ZONES",
        "DNS_SIDECAR_CACHE_MAX_ENTRIES",
        "DNS_SIDECAR_CACHE_MIN_TTL",
        "DNS_SIDECAR_CACHE_MAX_TTL",
        "DNS_SIDECAR_CACHE_MAX_NEGATIVE_TTL",
        "DNS_SIDECAR_CACHE_SERVFAIL_TTL",
        "DNS_SIDECAR_ATTEMPT_TIMEOUT",
        "DNS_SIDECAR_QUERY_TIMEOUT",
        "DNS_SIDECAR_TCP_IDLE_TIMEOUT",
        "DNS_SIDECAR_TCP_MAX_CONNECTIONS",
        "DNS_SIDECAR_LOG_FORMAT",
        "DNS_SIDECAR_LOG_LEVEL",
        "DNS_SIDECAR_CACHE_PREFETCH_PERCENT",
        "DNS_SIDECAR_CACHE_MAX_STALE",
        "DNS_SIDECAR_CACHE_STALE_ANSWER_AFTER",
        "DNS_SIDECAR_CACHE_STALE_TTL",
        "DNS_SIDECAR_UPSTREAM_POLICY",
        "DNS_SIDECAR_UPSTREAM_MAX_FAILS",
        "DNS_SIDECAR_UPSTREAM_PROBE_NAME",
        "DNS_SIDECAR_UPSTREAM_PROBE_INTERVAL",
        "DNS_SIDECAR_UPSTREAM_MAX_INFLIGHT",
        "DNS_SIDECAR_UPSTREAM_MAX_PACKETS_PER_SECOND",
        "DNS_SIDECAR_MAX_PENDING",
        "DNS_SIDECAR_DRAIN_SECONDS",
        "DNS_SIDECAR_METRICS_LISTEN",
        "DNS_SIDECAR_WORKERS",
        "DNS_SIDECAR_ALLOW",
        "DNS_SIDECAR_RATE_LIMIT",
        "DNS_SIDECAR_ANSWER_ORDER",
        "DNS_SIDECAR_TCP_MESSAGE_TIMEOUT",
        "DNS_SIDECAR_CACHE_MAX_BYTES",
        "DNS_SIDECAR_HEALTH_CHECKS",
        "DNS_SIDECAR_MAX_ANSWERS",
        "DNS_SIDECAR_CLOUDMAP",
        "DNS_SIDECAR_SYNTHESIZE_A",
        "DNS_SIDECAR_DISCOVERY_PROBE_INTERVAL",
        "DNS_SIDECAR_DISCOVERY_PROBE_TIMEOUT",
        "DNS_SIDECAR_DISCOVERY_RISE",
        "DNS_SIDECAR_DISCOVERY_FALL",
        "DNS_SIDECAR_DISCOVERY_FORGET_AFTER",
        "DNS_SIDECAR_DISCOVERY_ANSWER_TTL",
        "DNS_SIDECAR_DISCOVERY_MAX_PROBES",
        "DNS_SIDECAR_DISCOVERY_MAX_ENDPOINTS",
        "DNS_SIDECAR_DISCOVERY_CLOUDMAP_INTERVAL",
        "DNS_SIDECAR_DISCOVERY_PASSIVE_HEALTH",
        "DNS_SIDECAR_DISCOVERY_PASSIVE_INTERVAL",
        "DNS_SIDECAR_DISCOVERY_PASSIVE_CONNECT_TIMEOUT",
        "DNS_SIDECAR_DISCOVERY_NEGATIVE_TTL",
        "DNS_SIDECAR_DISCOVERY_SLOW_START",
        "DNS_SIDECAR_DISCOVERY_ZONE_AFFINITY",
        "DNS_SIDECAR_DISCOVERY_MAX_PROBES_PER_SECOND",
        "DNS_SIDECAR_LOG_QUERIES",
        "DNS_SIDECAR_UDP_READER_THREAD",
        "DNS_SIDECAR_MANAGE_RESOLV_CONF",
        "DNS_SIDECAR_RESOLV_CONF_PATH",
    }
    assert documented == cfg.KNOWN_ENV


def test_every_setting_is_documented_and_in_the_example() -> None:
    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "configuration.md").read_text()
    example = (root / "config" / "sidecar.example.toml").read_text()
    for s in cfg.SETTINGS:
        assert s.env in docs and s.flag in docs and f"`{s.key}`" in docs, s.key
        assert f"{s.key.rpartition('.')[2]} = " in example or s.key == "zones", s.key


def test_describe_is_json() -> None:
    config = Config(
        listen=(HostPort("::1", 5353),),
        upstreams=(HostPort("10.0.0.2", 53),),
        upstream_source="configured",
        zones=(Zone("local", (HostPort("10.0.0.3", 53),)),),
        cache=CacheSettings(),
    )
    summary = json.loads(json.dumps(config.describe()))
    assert summary["listen"] == ["[::1]:5353"]
    assert summary["upstreams"] == ["10.0.0.2:53"]
    assert summary["upstream_source"] == "configured"
    assert summary["zones"] == {"local": {"upstreams": ["10.0.0.3:53"]}}
    assert summary["tcp"] == {"idle_timeout": 10.0, "max_connections": 256, "message_timeout": 2.0}
    assert summary["upstream"]["policy"] == "sequential"
    assert summary["discovery"]["answer_ttl"] == 5
    assert summary["cache"]["max_ttl"] == 86_400
    assert summary["metrics_listen"] == "127.0.0.1:9153"
    assert summary["workers"] == 1


# ---------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("1.2.3.4", "1.2.3.4", 53, "1.2.3.4:53"),
        ("1.2.3.4:5353", "1.2.3.4", 5353, "1.2.3.4:5353"),
        (" 10.0.0.2 ", "10.0.0.2", 53, "10.0.0.2:53"),
        ("::1", "::1", 53, "[::1]:53"),
        ("[::1]", "::1", 53, "[::1]:53"),
        ("[::1]:5300", "::1", 5300, "[::1]:5300"),
        ("[FD00:0::2]:1", "fd00::2", 1, "[fd00::2]:1"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1", 53, "[2001:db8::1]:53"),
        ("1.2.3.4:65535", "1.2.3.4", 65535, "1.2.3.4:65535"),
    ],
)
def test_parse_hostport(text: str, host: str, port: int, shown: str) -> None:
    parsed = parse_hostport(text, 53, "k")
    assert parsed == HostPort(host, port)
    assert str(parsed) == shown


@pytest.mark.parametrize(
    "text",
    [
        "",
        "999.1.1.1",
        "dns.example.com",
        "localhost:53",
        "1.2.3.4:0",
        "1.2.3.4:70000",
        "1.2.3.4:",
        "1.2.3.4:x",
        "1.2.3.4:+53",
        "[1.2.3.4]:53",
        "[::1",
        "[::1]53",
        "::1:53x",
        "1.2.3",
    ],
)
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_hostport(text, 53, "listen")
    assert caught.value.key == "listen"
    assert caught.value.value == text
    assert str(caught.value).startswith(f"config error: listen = {text!r}: ")


# ---------------------------------------------------------------------------------------------
# Sources and precedence

FILE = """
    listen = ["127.0.0.1:5300"]
    upstreams = ["10.0.0.1"]
    log_level = "warning"

    [zones.local]
    upstreams = ["10.0.0.2", "10.0.0.3:5353"]

    [zones."Svc.Example.COM."]
    upstreams = ["fd00::5"]

    [cache]
    max_ttl = 300

    [tcp]
    idle_timeout = 3
    max_connections = 10
"""


def test_file_values(tmp_path: Path) -> None:
    config = make(tmp_path, FILE)
    assert config.listen == (HostPort("127.0.0.1", 5300),)
    assert config.upstreams == (HostPort("10.0.0.1", 53),)
    assert config.upstream_source == "configured"
    assert config.log_level == "warning"
    assert config.zones == (
        Zone("local", (HostPort("10.0.0.2", 53), HostPort("10.0.0.3", 5353))),
        Zone("svc.example.com", (HostPort("fd00::5", 53),)),
    )
    assert config.cache == CacheSettings(max_ttl=300)
    assert config.tcp.idle_timeout == 3.0 and isinstance(config.tcp.idle_timeout, float)
    assert config.tcp.max_connections == 10


def test_env_values(tmp_path: Path) -> None:
    env = {
        "DNS_SIDECAR_LISTEN": "127.0.0.1:5300, [::1]:5300",
        "DNS_SIDECAR_UPSTREAMS": "10.0.0.1,10.0.0.2:5353",
        "DNS_SIDECAR_ZONES": "local=10.0.0.2:53,10.0.0.3;corp.example.=10.1.0.2;",
        "DNS_SIDECAR_CACHE_MAX_ENTRIES": "50",
        "DNS_SIDECAR_CACHE_MIN_TTL": "5",
        "DNS_SIDECAR_CACHE_MAX_TTL": "600",
        "DNS_SIDECAR_CACHE_MAX_NEGATIVE_TTL": "10",
        "DNS_SIDECAR_CACHE_SERVFAIL_TTL": "0",
        "DNS_SIDECAR_ATTEMPT_TIMEOUT": "0.5",
        "DNS_SIDECAR_QUERY_TIMEOUT": "2",
        "DNS_SIDECAR_TCP_IDLE_TIMEOUT": "1.5",
        "DNS_SIDECAR_TCP_MAX_CONNECTIONS": "8",
        "DNS_SIDECAR_LOG_FORMAT": "TEXT",
        "DNS_SIDECAR_LOG_LEVEL": "debug",
        "PATH": "/usr/bin",  # other variables are none of our business
    }
    config = make(tmp_path, env=env)
    assert config.listen == (HostPort("127.0.0.1", 5300), HostPort("::1", 5300))
    assert config.upstreams == (HostPort("10.0.0.1", 53), HostPort("10.0.0.2", 5353))
    assert config.zones == (
        Zone("local", (HostPort("10.0.0.2", 53), HostPort("10.0.0.3", 53))),
        Zone("corp.example", (HostPort("10.1.0.2", 53),)),
    )
    assert config.cache == CacheSettings(50, 5, 600, 10, 0)
    assert (config.attempt_timeout, config.query_timeout) == (0.5, 2.0)
    assert (config.tcp.idle_timeout, config.tcp.max_connections) == (1.5, 8)
    assert (config.log_format, config.log_level) == ("text", "debug")


def test_cli_values(tmp_path: Path) -> None:
    argv = [
        "--listen", "127.0.0.1:5300", "--listen", "[::1]:5300",
        "--upstream", "10.0.0.1", "--upstream", "10.0.0.2:5353",
        "--zone", "local=10.0.0.2", "--zone", "Corp.Example=10.1.0.2,10.1.0.3",
        "--cache-max-entries", "50", "--min-ttl", "5", "--max-ttl", "600",
        "--max-negative-ttl", "10", "--servfail-ttl", "300",
        "--attempt-timeout", "0.5", "--query-timeout", "2",
        "--tcp-idle-timeout", "1.5", "--tcp-max-connections", "8",
        "--log-format", "text", "--log-level", "error",
    ]  # fmt: skip
    config = make(tmp_path, argv=argv)
    assert config.listen == (HostPort("127.0.0.1", 5300), HostPort("::1", 5300))
    assert config.upstreams == (HostPort("10.0.0.1", 53), HostPort("10.0.0.2", 5353))
    assert config.zones == (
        Zone("local", (HostPort("10.0.0.2", 53),)),
        Zone("corp.example", (HostPort("10.1.0.2", 53), HostPort("10.1.0.3", 53))),
    )
    assert config.cache == CacheSettings(50, 5, 600, 10, 300)
    assert (config.attempt_timeout, config.query_timeout) == (0.5, 2.0)
    assert (config.tcp.idle_timeout, config.tcp.max_connections) == (1.5, 8)
    assert (config.log_format, config.log_level) == ("text", "error")


@pytest.mark.parametrize(
    ("use_file", "env", "argv", "expected"),
    [
        (False, {}, [], 86_400),
        (True, {}, [], 300),
        (True, {"DNS_SIDECAR_CACHE_MAX_TTL": "400"}, [], 400),
        (True, {"DNS_SIDECAR_CACHE_MAX_TTL": "400"}, ["--max-ttl", "500"], 500),
        (False, {"DNS_SIDECAR_CACHE_MAX_TTL": "400"}, ["--max-ttl", "500"], 500),
        (True, {}, ["--max-ttl", "500"], 500),
        (True, {"DNS_SIDECAR_CACHE_MAX_TTL": ""}, [], 300),  # empty = unset
    ],
)
def test_precedence_of_a_scalar(
    tmp_path: Path, use_file: bool, env: dict[str, str], argv: list[str], expected: int
) -> None:
    config = make(tmp_path, "[cache]\nmax_ttl = 300\n" if use_file else None, env, argv)
    assert config.cache.max_ttl == expected


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        ({}, [], ["10.0.0.1:53", "10.0.0.2:53"]),
        ({"DNS_SIDECAR_UPSTREAMS": "10.0.0.3"}, [], ["10.0.0.3:53"]),
        ({"DNS_SIDECAR_UPSTREAMS": "10.0.0.3"}, ["--upstream", "10.0.0.4:5"], ["10.0.0.4:5"]),
        ({}, ["--upstream", "10.0.0.4", "--upstream", "10.0.0.5"], ["10.0.0.4:53", "10.0.0.5:53"]),
    ],
)
def test_precedence_of_a_list_replaces(
    tmp_path: Path, env: dict[str, str], argv: list[str], expected: list[str]
) -> None:
    config = make(tmp_path, 'upstreams = ["10.0.0.1", "10.0.0.2"]\n', env, argv)
    assert [str(u) for u in config.upstreams] == expected
    assert config.upstream_source == "configured"


def test_config_file_from_env_and_cli(tmp_path: Path) -> None:
    env_file = tmp_path / "env.toml"
    env_file.write_text('log_level = "debug"\n')
    cli_file = tmp_path / "cli.toml"
    cli_file.write_text('log_level = "error"\n')
    env = {"DNS_SIDECAR_CONFIG": str(env_file)}
    assert make(tmp_path, env=env).log_level == "debug"
    assert make(tmp_path, env=env, argv=["--config", str(cli_file)]).log_level == "error"


def test_zones_merge_by_name(tmp_path: Path) -> None:
    toml = """
        [zones.a]
        upstreams = ["10.0.0.1"]
        [zones.b]
        upstreams = ["10.0.0.2"]
        [zones.c]
        upstreams = ["10.0.0.3"]
    """
    env = {"DNS_SIDECAR_ZONES": "b=10.0.1.2;d=10.0.1.4"}
    argv = ["--zone", "C.=10.0.2.3", "--zone", "e=10.0.2.5"]
    config = make(tmp_path, toml, env, argv)
    assert {z.name: [str(u) for u in z.upstreams] for z in config.zones} == {
        "a": ["10.0.0.1:53"],
        "b": ["10.0.1.2:53"],
        "c": ["10.0.2.3:53"],
        "d": ["10.0.1.4:53"],
        "e": ["10.0.2.5:53"],
    }


# ---------------------------------------------------------------------------------------------
# Validation: each failure is a ConfigError that names the key as the operator wrote it

BAD = [
    # (id, toml file, env, argv, key named)
    ("unknown file key", "lissen = []", {}, [], "lissen"),
    ("nested unknown key", "[cache]\nmax_ttll = 5", {}, [], "cache.max_ttll"),
    ("unknown zone key", "[zones.local]\nupstreams = ['10.0.0.2']\nhealth = 1", {}, [],
     "zones.local.health"),
    ("unquoted dotted zone", "[zones.svc.example]\nupstreams = ['10.0.0.2']", {}, [],
     "zones.svc.example"),
    ("zone without upstreams", "[zones.local]", {}, [], "zones.local.upstreams"),
    ("zone with empty upstreams", "[zones.local]\nupstreams = []", {}, [],
     "zones.local.upstreams"),
    ("zone not a table", "zones = 5", {}, [], "zones"),
    ("zone name in file", "[zones.'a..b']\nupstreams = ['10.0.0.2']", {}, [], 'zones."a..b"'),
    ("root zone in file", "[zones.'.']\nupstreams = ['10.0.0.2']", {}, [], 'zones."."'),
    ("same zone twice in file",
     "[zones.local]\nupstreams = ['10.0.0.2']\n[zones.'LOCAL.']\nupstreams = ['10.0.0.3']",
     {}, [], 'zones."LOCAL."'),
    ("cache not a table", "cache = 5", {}, [], "cache"),
    ("unknown env var", None, {"DNS_SIDECAR_CACHE_MAXTTL": "5"}, [], "DNS_SIDECAR_CACHE_MAXTTL"),
    ("unknown empty env var", None, {"DNS_SIDECAR_FOO": ""}, [], "DNS_SIDECAR_FOO"),
    ("bad address in file", "listen = ['999.1.1.1']", {}, [], "listen"),
    ("bad address in env", None, {"DNS_SIDECAR_UPSTREAMS": "999.1.1.1"}, [],
     "DNS_SIDECAR_UPSTREAMS"),
    ("bad address on cli", None, {}, ["--upstream", "999.1.1.1"], "--upstream"),
    ("hostname not allowed", "upstreams = ['dns.google']", {}, [], "upstreams"),
    ("port 0", None, {}, ["--listen", "127.0.0.1:0"], "--listen"),
    ("port 70000", None, {"DNS_SIDECAR_LISTEN": "127.0.0.1:70000"}, [], "DNS_SIDECAR_LISTEN"),
    ("listen not a list", "listen = '127.0.0.1'", {}, [], "listen"),
    ("listen list of ints", "listen = [53]", {}, [], "listen"),
    ("empty listen", "listen = []", {}, [], "listen"),
    ("empty env list", None, {"DNS_SIDECAR_UPSTREAMS": " , "}, [], "DNS_SIDECAR_UPSTREAMS"),
    ("duplicate listen", None, {}, ["--listen", "127.0.0.1", "--listen", "127.0.0.1:53"],
     "--listen"),
    ("unspecified upstream", "upstreams = ['0.0.0.0']", {}, [], "upstreams"),
    ("negative min_ttl file", "[cache]\nmin_ttl = -1", {}, [], "cache.min_ttl"),
    ("negative min_ttl env", None, {"DNS_SIDECAR_CACHE_MIN_TTL": "-1"}, [],
     "DNS_SIDECAR_CACHE_MIN_TTL"),
    ("negative min_ttl cli", None, {}, ["--min-ttl", "-1"], "--min-ttl"),
    ("max_ttl 0", "[cache]\nmax_ttl = 0", {}, [], "cache.max_ttl"),
    ("max_ttl < min_ttl", "[cache]\nmin_ttl = 60\nmax_ttl = 30", {}, [], "cache.max_ttl"),
    ("max_ttl < min_ttl across layers", "[cache]\nmax_ttl = 30", {}, ["--min-ttl", "60"],
     "cache.max_ttl"),
    ("max_ttl < min_ttl on cli", None, {}, ["--max-ttl", "30", "--min-ttl", "60"], "--max-ttl"),
    ("servfail_ttl 301", "[cache]\nservfail_ttl = 301", {}, [], "cache.servfail_ttl"),
    ("servfail_ttl -1", None, {}, ["--servfail-ttl", "-1"], "--servfail-ttl"),
    ("max_entries 0", None, {}, ["--cache-max-entries", "0"], "--cache-max-entries"),
    ("bool for int", "[cache]\nmax_entries = true", {}, [], "cache.max_entries"),
    ("string for int", "[cache]\nmax_entries = '5'", {}, [], "cache.max_entries"),
    ("float for int", "[tcp]\nmax_connections = 2.5", {}, [], "tcp.max_connections"),
    ("float text for int", None, {"DNS_SIDECAR_CACHE_MAX_TTL": "1.5"}, [],
     "DNS_SIDECAR_CACHE_MAX_TTL"),
    ("word for int", None, {}, ["--max-ttl", "lots"], "--max-ttl"),
    ("bool for float", "attempt_timeout = false", {}, [], "attempt_timeout"),
    ("string for float", "attempt_timeout = '1'", {}, [], "attempt_timeout"),
    ("nan timeout", None, {"DNS_SIDECAR_ATTEMPT_TIMEOUT": "nan"}, [],
     "DNS_SIDECAR_ATTEMPT_TIMEOUT"),
    ("timeout too small", None, {}, ["--attempt-timeout", "0.01"], "--attempt-timeout"),
    ("tcp_max_connections 0", None, {}, ["--tcp-max-connections", "0"], "--tcp-max-connections"),
    ("query_timeout < attempt_timeout", "attempt_timeout = 2.0\nquery_timeout = 1.0", {}, [],
     "query_timeout"),
    ("query_timeout < attempt_timeout via env", None,
     {"DNS_SIDECAR_ATTEMPT_TIMEOUT": "5"}, [], "query_timeout"),
    ("bad log format", None, {}, ["--log-format", "xml"], "--log-format"),
    ("bad log level", "log_level = 'verbose'", {}, [], "log_level"),
    ("log level not a string", "log_level = 1", {}, [], "log_level"),
    ("bad zone name", None, {"DNS_SIDECAR_ZONES": "bad_zone!=10.0.0.2"}, [], "DNS_SIDECAR_ZONES"),
    ("zone label too long", None, {}, ["--zone", "a" * 64 + ".com=10.0.0.2"], "--zone"),
    ("zone name too long", None, {}, ["--zone", ".".join(["a" * 60] * 5) + "=10.0.0.2"],
     "--zone"),
    ("root zone", None, {}, ["--zone", ".=10.0.0.2"], "--zone"),
    ("zone without =", None, {"DNS_SIDECAR_ZONES": "local"}, [], "DNS_SIDECAR_ZONES"),
    ("zone without upstreams", None, {}, ["--zone", "local="], "--zone"),
    ("zone twice in one layer", None, {}, ["--zone", "a=10.0.0.2", "--zone", "A.=10.0.0.3"],
     "--zone"),
    ("upstream == listen", "listen = ['127.0.0.1:53']\nupstreams = ['127.0.0.1']", {}, [],
     "upstreams"),
    ("upstream == listen via cli", None, {},
     ["--listen", "[::1]:5353", "--upstream", "[::1]:5353"], "--upstream"),
    ("zone upstream == listen", "[zones.local]\nupstreams = ['127.0.0.1:53']", {}, [],
     "zones.local.upstreams"),
    ("zone upstream == listen via env", None, {"DNS_SIDECAR_ZONES": "local=127.0.0.1"}, [],
     "DNS_SIDECAR_ZONES"),
    ("loopback upstream == wildcard listen", None, {},
     ["--listen", "0.0.0.0:53", "--upstream", "127.0.0.1"], "--upstream"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("toml", "env", "argv", "key"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_validation_errors_name_the_key(
    tmp_path: Path, toml: str | None, env: dict[str, str], argv: list[str], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make(tmp_path, toml, env, argv)
    assert caught.value.key == key
    message = str(caught.value)
    assert message.startswith(f"config error: {key} = ")
    assert "\n" not in message


def test_error_messages_say_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean max_ttl\?"):
        make(tmp_path, "[cache]\nmax_ttll = 5")
    with pytest.raises(ConfigError, match="did you mean DNS_SIDECAR_CACHE_MAX_TTL"):
        make(tmp_path, env={"DNS_SIDECAR_CACHE_MAX_TTLL": "5"})
    with pytest.raises(ConfigError, match="quote zone names"):
        make(tmp_path, "[zones.svc.example]\nupstreams = ['10.0.0.2']")
    with pytest.raises(ConfigError, match="would loop"):
        make(tmp_path, argv=["--upstream", "127.0.0.1"])
    with pytest.raises(ConfigError, match=r"must be >= min_ttl \(60, from --min-ttl\)"):
        make(tmp_path, "[cache]\nmax_ttl = 30", argv=["--min-ttl", "60"])
    with pytest.raises(ConfigError, match=r"0\.\.300 \(0 turns it off\)"):
        make(tmp_path, argv=["--servfail-ttl", "301"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--listen", "0.0.0.0:53", "--upstream", "10.0.0.2"], "10.0.0.2:53"),  # remote is fine
        (["--listen", "127.0.0.1:5353", "--upstream", "127.0.0.1"], "127.0.0.1:53"),
        (["--listen", "[::1]:53", "--upstream", "127.0.0.1"], "127.0.0.1:53"),
    ],
)
def test_upstreams_that_are_not_loops(tmp_path: Path, argv: list[str], expected: str) -> None:
    assert [str(u) for u in make(tmp_path, argv=argv).upstreams] == [expected]


@pytest.mark.parametrize(("servfail_ttl", "ok"), [(0, True), (1, True), (300, True), (301, False)])
def test_servfail_ttl_range(tmp_path: Path, servfail_ttl: int, ok: bool) -> None:
    argv = ["--servfail-ttl", str(servfail_ttl)]
    if ok:
        assert make(tmp_path, argv=argv).cache.servfail_ttl == servfail_ttl
    else:
        with pytest.raises(ConfigError):
            make(tmp_path, argv=argv)


def test_unknown_flag_is_an_argparse_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        make(tmp_path, argv=["--max-ttll", "5"])
    assert caught.value.code == 2


def test_config_file_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as caught:
        load_file(missing)
    assert (caught.value.key, caught.value.value) == ("config", missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("listen = [\n")
    with pytest.raises(ConfigError) as caught:
        load_file(str(broken))
    assert (caught.value.key, caught.value.value) == ("config", str(broken))
    assert "not valid TOML" in caught.value.allowed and "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Upstream defaulting


@pytest.mark.parametrize(
    ("resolv", "argv", "expected"),
    [
        ("nameserver 10.0.0.2\nnameserver 10.0.0.3\n", [], "10.0.0.2:53"),
        ("# nameserver 10.0.0.1\n; nameserver 10.0.0.4\nsearch x\nnameserver 10.0.0.2\n", [],
         "10.0.0.2:53"),
        ("nameserver 127.0.0.1\nnameserver 10.0.0.2\n", [], "10.0.0.2:53"),  # ours: skipped
        ("nameserver 127.0.0.1\n", ["--listen", "127.0.0.1:5353"], "127.0.0.1:53"),  # other port
        ("nameserver 127.0.0.53\n", [], "127.0.0.53:53"),  # systemd-resolved is not us
        ("nameserver 10.0.0.2\nnameserver 10.0.0.3\n", ["--listen", "10.0.0.2"], "10.0.0.3:53"),
        ("nameserver 10.0.0.2\nnameserver fd00::3\n", ["--listen", "0.0.0.0:53"], None),
        ("nameserver 10.0.0.2\nnameserver fd00::3\n", ["--listen", "0.0.0.0:5353"],
         "10.0.0.2:53"),
        ("nameserver fd00::2\n", [], "[fd00::2]:53"),
        ("nameserver ::1\nnameserver 10.0.0.2\n", ["--listen", "[::1]"], "10.0.0.2:53"),
        ("nameserver not-an-ip\nnameserver\nnameserver 10.0.0.2\n", [], "10.0.0.2:53"),
        ("", [], None),
        ("nameserver 127.0.0.1\n", [], None),
    ],
)  # fmt: skip
def test_upstreams_from_resolv_conf(
    tmp_path: Path, resolv: str, argv: list[str], expected: str | None
) -> None:
    if expected is None:
        with pytest.raises(ConfigError) as caught:
            make(tmp_path, argv=argv, resolv=resolv)
        assert caught.value.key == "upstreams"
        assert "resolv.conf" in caught.value.allowed
    else:
        config = make(tmp_path, argv=argv, resolv=resolv)
        assert [str(u) for u in config.upstreams] == [expected]
        assert config.upstream_source == "resolv.conf"


def test_missing_resolv_conf_is_no_nameserver(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no usable nameserver"):
        load([], {}, resolv_conf=str(tmp_path / "nope"))


def test_ecs_resolver_on_ecs(tmp_path: Path) -> None:
    env = {"ECS_CONTAINER_METADATA_URI_V4": "http://169.254.170.2/v4/abc"}
    config = make(tmp_path, env=env, resolv="")
    assert config.upstreams == (HostPort("169.254.169.253", 53),)
    assert config.upstream_source == "ecs"
    configured = make(tmp_path, env={**env, "DNS_SIDECAR_UPSTREAMS": "10.0.0.2"})
    assert configured.upstream_source == "configured"


def test_load_file_uses_env_only_for_defaulting(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text("[cache]\nmax_ttl = 30\n")
    env = {"ECS_CONTAINER_METADATA_URI_V4": "http://x", "DNS_SIDECAR_CACHE_MAX_TTL": "99"}
    config = load_file(str(path), env=env)
    assert config.upstream_source == "ecs"
    assert config.cache.max_ttl == 30


def test_discovery_zones_from_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'upstreams = ["10.0.0.2"]\n'
        "[zones.local]\n"
        'health_check = "http:8080/health"\n'
        "max_answers = 2\n"
        'cloudmap = {namespace = "local"}\n'
        '[zones."corp.example"]\n'
        'upstreams = ["10.1.0.2"]\n'
    )
    config = cfg.load(
        ["--config", str(path), "--health-check", "svc.test=tcp:81", "--max-answers", "local=1"],
        {},
    )
    zones = {zone.name: zone for zone in config.zones}
    local = zones["local"]
    assert local.upstreams == ()  # the default upstreams
    assert local.health_check == cfg.HealthCheck("http", 8080, "/health")
    assert local.max_answers == 1  # the flag wins over the file
    assert local.cloudmap_namespace == "local"
    assert zones["svc.test"].health_check == cfg.HealthCheck("tcp", 81, "/")
    assert zones["corp.example"].health_check is None
    assert {zone.name for zone in config.discovery_zones()} == {"local", "svc.test"}
    assert cfg.load(["--upstream", "10.0.0.2"], {}).discovery_zones() == ()


def test_discovery_settings_from_env() -> None:
    env = {
        "DNS_SIDECAR_UPSTREAMS": "10.0.0.2",
        "DNS_SIDECAR_HEALTH_CHECKS": "local=tcp:80;svc.test=http:8080/ready",
        "DNS_SIDECAR_MAX_ANSWERS": "local=1",
        "DNS_SIDECAR_DISCOVERY_ANSWER_TTL": "3",
    }
    config = cfg.load([], env)
    zones = {zone.name: zone for zone in config.zones}
    assert str(zones["local"].health_check) == "tcp:80"
    assert str(zones["svc.test"].health_check) == "http:8080/ready"
    assert zones["local"].max_answers == 1
    assert config.discovery.answer_ttl == 3


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--health-check", "local=udp:53"], "--health-check"),
        (["--health-check", "local=tcp:0"], "--health-check"),
        (["--health-check", "local=tcp:80/x"], "--health-check"),
        (["--health-check", "local"], "--health-check"),
        (["--max-answers", "local=0"], "--max-answers"),
        (["--max-answers", "local=1"], "--max-answers"),  # not a discovery zone
        (["--cloudmap", "local=local"], "--cloudmap"),  # not a discovery zone
        (["--synthesize-a", "local=true"], "--synthesize-a"),  # not a discovery zone
        (["--health-check", "local=tcp:80", "--synthesize-a", "local=maybe"], "--synthesize-a"),
    ],
)
def test_bad_discovery_settings(argv: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        cfg.load(["--upstream", "10.0.0.2", *argv], {})
    assert str(caught.value).startswith(f"config error: {key} = ")


def test_zone_table_needs_upstreams_or_a_health_check(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('upstreams = ["10.0.0.2"]\n[zones.local]\nmax_answers = 1\n')
    with pytest.raises(ConfigError, match=r"zones.local.upstreams"):
        cfg.load(["--config", str(path)], {})


def test_answer_order_globally_and_per_zone(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'upstreams = ["10.0.0.2"]\nanswer_order = "upstream"\n'
        '[zones.corp]\nupstreams = ["10.1.0.2"]\nanswer_order = "rotate"\n'
    )
    config = cfg.load(["--config", str(path)], {})
    assert config.answer_order == "upstream"
    assert [zone.answer_order for zone in config.zones] == ["rotate"]
    assert cfg.load(["--config", str(path), "--answer-order", "rotate"], {}).answer_order == (
        "rotate"
    )
    env = {"DNS_SIDECAR_UPSTREAMS": "10.0.0.2", "DNS_SIDECAR_ANSWER_ORDER": "upstream"}
    assert cfg.load([], env).answer_order == "upstream"
    assert cfg.load(["--upstream", "10.0.0.2"], {}).answer_order == "rotate"  # the default


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ('answer_order = "random"\n', "answer_order"),
        ('[zones.corp]\nupstreams = ["10.1.0.2"]\nanswer_order = "random"\n', "zones.corp"),
    ],
)
def test_a_bad_answer_order_names_key_value_and_choices(
    tmp_path: Path, where: str, key: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('upstreams = ["10.0.0.2"]\n' + where)
    with pytest.raises(ConfigError) as caught:
        cfg.load(["--config", str(path)], {})
    text = str(caught.value)
    assert key in text and "random" in text and "rotate" in text and "upstream" in text, text


def test_a_bad_answer_order_flag_or_variable_names_them() -> None:
    with pytest.raises(ConfigError, match=r"DNS_SIDECAR_ANSWER_ORDER.*sorted.*rotate"):
        cfg.load(["--upstream", "10.0.0.2"], {"DNS_SIDECAR_ANSWER_ORDER": "sorted"})
