"""A real Prometheus scrapes a real uvicorn tiny server every second; its HTTP API sees the counts.

Needs the ``prometheus`` binary (Debian package ``prometheus``; ``make test`` installs it where
``apt-get`` is available). Skipped with the reason when it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.api.processes import free_port, server_thread

ADMIN = "prometheus-scrape-key"
PROMETHEUS = shutil.which("prometheus") or next(
    (p for p in ("/usr/bin/prometheus", "/usr/local/bin/prometheus") if Path(p).is_file()), None
)


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    if PROMETHEUS is None:
        pytest.skip(
            "the 'prometheus' binary is not installed (Debian: apt-get install prometheus; "
            "`make test` installs it where apt-get is available)"
        )
    return PROMETHEUS


def _query(url: str, promql: str) -> list[dict]:
    response = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_request_counts(prometheus_bin, make_app, tmp_path):
    app = make_app(api_keys=[f"admin:{ADMIN}"])
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with server_thread(app) as facet:
        target = facet.removeprefix("http://")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "facet",
                    "authorization": {"type": "Bearer", "credentials": ADMIN},
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    prometheus_bin,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=out,
            )
        try:
            k = 3
            for _ in range(k):
                body = {"prompt": "t1 t2", "max_new_tokens": 2}
                assert httpx.post(facet + "/generate", json=body, headers=auth, timeout=30).status_code == 200
            assert httpx.post(facet + "/generate", json={"prompt": "t1"}).status_code == 401

            promql = 'facet_requests_total{job="facet",route="/generate",method="POST",status="200"}'
            deadline = time.monotonic() + 40
            result: list[dict] = []
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-4000:]
                try:
                    result = _query(url, promql)
                    if result and float(result[0]["value"][1]) == k:
                        break
                except httpx.TransportError:
                    pass  # still starting
                time.sleep(0.5)
            assert result and float(result[0]["value"][1]) == k, (result, log.read_text()[-4000:])
            assert float(_query(url, 'up{job="facet"}')[0]["value"][1]) == 1
            unauthorized = _query(url, 'facet_requests_total{route="/generate",status="401"}')
            assert float(unauthorized[0]["value"][1]) == 1
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
