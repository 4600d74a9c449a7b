"""docker-compose.yml, correct by construction though no Docker engine runs here: checked for what `docker compose
up` needs and for what it must not do. Also the image it builds (ops/Dockerfile, .dockerignore)."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from typing import Any

import yaml

from core.cli import build_parser
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
IMAGE = "cleanledger:local"
ONE_SHOT = {"migrate"}  # runs to completion: no healthcheck, no restart


def ours() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in SERVICES.items() if service.get("image") == IMAGE}


def test_every_process_of_the_procfile_has_its_service() -> None:
    procfile = [line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if re.match(r"^\w+:", line)]
    modules = {re.search(r"-m ([\w.]+)", command).group(1) for _, command in procfile if " -m " in command}  # type: ignore[union-attr]
    commands = {" ".join(service["command"]) for service in ours().values()}
    for module in modules:
        assert any(f"-m {module}" in command for command in commands), module
    assert {"postgres", "redis", "rabbitmq", "mongo", "nginx"} <= set(SERVICES)


def test_no_host_network_and_only_nginx_publishes_a_port() -> None:
    for name, service in SERVICES.items():
        assert "network_mode" not in service, name
        assert "container_name" not in service, name  # a fixed name would forbid --scale
    assert [name for name, service in SERVICES.items() if service.get("ports")] == ["nginx"]
    assert SERVICES["nginx"]["ports"] == ["127.0.0.1:8080:8080"]


def test_one_image_built_once_and_run_as_every_process() -> None:
    built = [name for name, service in SERVICES.items() if "build" in service]
    assert built == ["migrate"]
    assert SERVICES["migrate"]["build"]["dockerfile"] == "ops/Dockerfile"
    assert len(ours()) >= 7
    for name, service in ours().items():
        if name not in ONE_SHOT:
            assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name


def test_every_long_running_service_restarts_and_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            continue
        assert service.get("restart") == "unless-stopped", name
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", name
    for name, service in SERVICES.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in SERVICES, (name, dependency)
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert condition == {"condition": expected}, (name, dependency)


def test_a_process_s_healthcheck_asks_the_port_its_command_serves() -> None:
    for name, service in ours().items():
        if name in ONE_SHOT:
            continue
        command, probe = service["command"], " ".join(service["healthcheck"]["test"])
        port = command[command.index("--metrics-port" if "--metrics-port" in command else "--port") + 1]
        assert f"127.0.0.1:{port}/" in probe, name


def test_the_stores_keep_their_data_in_named_volumes() -> None:
    for name, path in {
        "postgres": "/var/lib/postgresql/data",
        "mongo": "/data/db",
        "rabbitmq": "/var/lib/rabbitmq",
    }.items():
        [volume] = SERVICES[name]["volumes"]
        named, mounted = volume.split(":", 1)
        assert mounted == path and named in COMPOSE["volumes"], name


def test_environment_names_are_settings_and_commands_exist() -> None:
    fields = {f"CLEANLEDGER_{field.upper()}" for field in Settings.model_fields}
    [subparsers] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    subcommands = set(subparsers.choices)
    for name, service in ours().items():
        for variable in service["environment"]:
            assert variable in fields, (name, variable)
        Settings.from_env(**{k.removeprefix("CLEANLEDGER_").lower(): v for k, v in service["environment"].items()})
        command = service["command"]
        if command[0] == "cleanledger":
            assert command[1] in subcommands, name
        else:
            assert command[:2] == ["python", "-m"] and importlib.util.find_spec(command[2]) is not None, name


def test_rabbitmq_is_a_supported_release_and_every_image_is_pinned_to_a_major() -> None:
    assert re.fullmatch(r"rabbitmq:4\.\d+", SERVICES["rabbitmq"]["image"])  # 3.x is out of community support
    for name, service in SERVICES.items():
        assert ":" in service["image"] and not service["image"].endswith(":latest"), name


def test_the_nginx_config_it_rewrites_still_has_what_it_rewrites() -> None:
    nginx = (ROOT / "nginx.conf").read_text()
    script = " ".join(SERVICES["nginx"]["command"])
    assert "listen 127.0.0.1:8080;" in nginx and "s/listen 127.0.0.1:8080;/listen 8080;/" in script
    assert "server 127.0.0.1:8081 max_fails" in nginx and "server ingress:8081 max_fails" in script
    assert len(re.findall(r"server 127\.0\.0\.1:808[23] max_fails", nginx)) == 2  # the lines it deletes
    assert len(re.findall(r"server 127\.0\.0\.1:\d+ max_fails", nginx)) == 3  # and nothing else is left


def test_the_image_installs_from_the_lock_and_runs_as_no_root() -> None:
    dockerfile = (ROOT / "ops/Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var"} <= ignored
    lock = (ROOT / "requirements.lock").read_text()
    pins = re.findall(r"^([a-z0-9_.-]+)==\S+ \\$", lock, re.MULTILINE)
    assert pins and all(f"{pin}==" in lock for pin in pins)
    assert lock.count("--hash=sha256:") >= len(pins)  # every pin carries its hashes
