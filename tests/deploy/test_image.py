"""The image built from the real Dockerfile and run for real: deploy/test-image.sh (`make image-test`).

Marked slow (a build and several container starts take many minutes; `make test` stays
docker-free). It runs where a Docker daemon answers or one can be started (root with dockerd
installed, or the tools installable with apt) and skips, saying why, otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "test-image.sh"

# Every check the script must report, each with "ok".
CHECKS = [
    "/ready 200 after the first start",
    "runs as uid 10001 (non-root)",
    "read-only root filesystem, /data a volume",
    "HEALTHCHECK healthy",
    "/generate answers Paris",
    "adapter upload (201) and generation with it",
    "adapter survives docker restart",
    "adapter survives docker kill -s KILL",
    "Prometheus scrapes /metrics with the metrics_token secret",
    "docker stop drains an in-flight stream, exit code 0",
    "compose config validates",
    "compose: /ready 200",
    "compose: /generate answers Paris (infer key from the secret)",
]


def _why_no_docker() -> str | None:
    """None when the script can reach or start a daemon here, else the reason it cannot."""
    docker = shutil.which("docker")
    if docker:
        answer = subprocess.run([docker, "info"], capture_output=True, timeout=30)
        if answer.returncode == 0:
            return None
    if os.geteuid() != 0:
        return "no Docker daemon answers and starting one needs root"
    if not shutil.which("dockerd") and not shutil.which("apt-get"):
        return "no dockerd and no apt-get to install docker.io"
    return None


@pytest.mark.slow
def test_image_builds_runs_and_composes():
    reason = _why_no_docker()
    if reason:
        pytest.skip(reason)
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=3600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for name in CHECKS:
        assert re.search(rf"check: {re.escape(name)}: ok$", output, re.M), (name, output[-6000:])
    assert "FAIL" not in output
