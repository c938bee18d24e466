"""docker-compose.yml: valid against the compose JSON schema, and shaped as the design asks.

No Docker engine is needed: check-jsonschema carries the compose-spec schema (no network).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
FAIRWAY_SERVICES = {"gateway", "scorer", "scheduler", "cpu-worker", "gpu-worker"}


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def test_compose_file_matches_the_compose_schema() -> None:
    result = validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_file(tmp_path: Path, compose: dict[str, Any]) -> None:
    """The validator is not vacuous: a wrong depends_on condition fails it."""
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["gateway"]["depends_on"]["redis"]["condition"] = "when_it_feels_like_it"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert validate(path).returncode != 0


def test_service_set(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == FAIRWAY_SERVICES | {"rabbitmq", "redis"}


def test_infrastructure_has_healthchecks_credentials_and_no_ports(
    services: dict[str, dict[str, Any]],
) -> None:
    rabbit, redis = services["rabbitmq"], services["redis"]
    for infra in (rabbit, redis):
        assert infra["healthcheck"]["test"], infra
        assert "ports" not in infra
    assert rabbit["image"].startswith("rabbitmq:3.13")
    assert rabbit["environment"]["RABBITMQ_DEFAULT_USER"]
    assert rabbit["environment"]["RABBITMQ_DEFAULT_PASS"].startswith("${RABBITMQ_PASSWORD")
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD")


def test_only_the_gateway_publishes_a_port(services: dict[str, dict[str, Any]]) -> None:
    assert [name for name, svc in services.items() if svc.get("ports")] == ["gateway"]
    assert all(str(port).endswith(":8000") for port in services["gateway"]["ports"])
    assert all("expose" not in svc or name == "gateway" for name, svc in services.items())


def test_gateway_healthcheck_probes_health(services: dict[str, dict[str, Any]]) -> None:
    test = " ".join(services["gateway"]["healthcheck"]["test"])
    assert "/health" in test


@pytest.mark.parametrize("name", sorted(FAIRWAY_SERVICES))
def test_fairway_services_share_the_build_and_wait_for_healthy_infra(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    svc = services[name]
    assert svc["build"]["context"] == "."
    assert svc["build"]["dockerfile"] == "Dockerfile"
    assert (ROOT / svc["build"]["dockerfile"]).is_file()
    assert svc["command"] == ["fairway", name]
    assert svc["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    env = svc["environment"]
    # Credentials in both URLs: neither server accepts anonymous clients.
    assert re.match(r"amqp://[^:@/]+:[^@/]+@rabbitmq:5672/", env["FAIRWAY_AMQP_URL"])
    assert re.match(r"redis://:[^@/]+@redis:6379/\d+", env["FAIRWAY_REDIS_URL"])
    assert all(key.startswith("FAIRWAY_") for key in env)


def test_amqp_user_of_the_gateway_is_trusted_by_the_scorer(
    services: dict[str, dict[str, Any]],
) -> None:
    user = services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]
    trusted = services["scorer"]["environment"]["FAIRWAY_TRUSTED_AMQP_USERS"].split(",")
    assert user in trusted
    assert f"amqp://{user}:" in services["gateway"]["environment"]["FAIRWAY_AMQP_URL"]


def test_gpu_worker_is_a_profile_with_a_device_reservation(
    services: dict[str, dict[str, Any]],
) -> None:
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["FAIRWAY_DEVICE"].startswith("cuda")
    assert gpu["environment"]["FAIRWAY_POOL"] == "gpu"
    assert services["cpu-worker"]["environment"]["FAIRWAY_POOL"] == "cpu"
    assert all("profiles" not in svc for name, svc in services.items() if name != "gpu-worker")


def test_compose_commands_are_cli_services() -> None:
    from services.cli import SERVICES

    assert set(SERVICES) == FAIRWAY_SERVICES


def test_dockerfile_and_context() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.MULTILINE)
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".env", "tests"} <= ignored


@pytest.mark.parametrize("name", ["cpu-worker", "gpu-worker"])
def test_workers_get_longer_than_their_drain_before_a_sigkill(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    """Compose SIGKILLs after ``stop_grace_period`` (10 s by default): a worker must have
    time to drain its running requests and hand back the rest."""
    grace = services[name]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) >= Settings().worker_drain_s + 5
