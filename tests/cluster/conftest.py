"""One Ray instance per test module: 2 CPUs, loopback, temporary folders, 2 tiny-model replicas.

Ray and Serve start once (~10-20 s) and are shut down at the end of the module; every test in a
module shares the deployment, so tests use their own adapter ids.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the cluster extra (ray[serve]) is not installed")

from ray import serve  # noqa: E402

from server.cluster.app import engine_handle, run  # noqa: E402
from server.cluster.config import ClusterSettings  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.api.tiny_server import tiny_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FACTORY = "tests.cluster.tiny_factory:tiny_app"


@dataclass
class Cluster:
    url: str
    settings: Settings
    cluster: ClusterSettings
    client: httpx.Client

    @property
    def engine(self):
        return engine_handle(self.cluster)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(data_dir: Path, **cluster_overrides) -> tuple[Settings, ClusterSettings]:
    settings = tiny_settings(data_dir=data_dir, port=free_port(), max_batch_size=4)
    cluster = ClusterSettings(
        **{"replicas": 2, "max_adapters_per_replica": 3, "factory": FACTORY, **cluster_overrides}
    )
    run(settings, cluster)
    return settings, cluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[Cluster]:
    data = tmp_path_factory.mktemp("cluster-data")
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must be
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=ray_tmp,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},  # the workers import tests.cluster
        logging_level="warning",
    )
    try:
        settings, cluster = start_cluster(data)
        url = f"http://127.0.0.1:{settings.port}"
        with httpx.Client(base_url=url, timeout=60) as client:
            yield Cluster(url, settings, cluster, client)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
