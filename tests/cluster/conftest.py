"""One Ray instance per test module: 2 CPUs, loopback, temporary folders, 2 tiny-model replicas.

Ray and Serve start once (~10-20 s) and are shut down at the end of the module; every test in a
module shares the deployment, so tests use their own adapter ids.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the cluster extra (ray[serve]) is not installed")

from ray import serve  # noqa: E402

from server.cluster.app import engine_handle, run  # noqa: E402
from server.cluster.config import ClusterSettings  # noqa: E402
from server.engine.loader import wrap_model  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.api.conftest import adapter_files  # noqa: E402
from tests.api.tiny_server import BASE_NAME, TARGETS, tiny_settings  # noqa: E402
from tests.cluster.tiny_factory import HOLD_FILE_ENV, STEP_DELAY_ENV  # noqa: E402
from tests.conftest import make_tiny_llama, make_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FACTORY = "tests.cluster.tiny_factory:tiny_app"

# The tiny cluster runs with API keys: the clients send the admin one unless a test says otherwise.
ADMIN_KEY, INFER_KEY = "cluster-admin-key", "cluster-infer-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Cluster:
    url: str
    settings: Settings
    cluster: ClusterSettings
    client: httpx.Client
    hold_file: Path  # exists: a replica holds a stream's steps until it is cancelled (tiny_factory)

    @property
    def engine(self):
        return engine_handle(self.cluster)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(data_dir: Path, settings: Settings | None = None, **cluster_overrides):
    """Deploy the application on the running Ray instance: (settings, cluster settings)."""
    if settings is None:
        keys = [f"admin:{ADMIN_KEY}", f"infer:{INFER_KEY}"]
        # per-key quotas high enough that one key can saturate a replica (quotas are per replica)
        settings = tiny_settings(data_dir=data_dir, max_batch_size=4, api_keys=keys, key_max_concurrent=32)
    settings = settings.model_copy(update={"port": free_port()})
    cluster = ClusterSettings(
        **{"replicas": 2, "max_adapters_per_replica": 3, "factory": FACTORY, **cluster_overrides}
    )
    run(settings, cluster)
    return settings, cluster


@contextmanager
def ray_cluster_of(
    data_dir: Path, settings: Settings | None = None, **cluster_overrides
) -> Iterator[Cluster]:
    """Ray on 2 CPUs and loopback, temporary folders, the application deployed; all stopped after."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must be
    hold_file = data_dir / "hold-streams"  # created by a test, read by the replicas (tiny_factory)
    # the workers import tests.cluster; each engine step of the tiny replicas takes >= 10 ms
    env_vars = {"PYTHONPATH": str(REPO), STEP_DELAY_ENV: "0.01", HOLD_FILE_ENV: str(hold_file)}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=ray_tmp,
        runtime_env={"env_vars": env_vars},
        logging_level="warning",
    )
    try:
        settings, cluster = start_cluster(data_dir, settings, **cluster_overrides)
        url = f"http://127.0.0.1:{settings.port}"
        headers = ADMIN if settings.api_keys else None
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            yield Cluster(url, settings, cluster, client, hold_file)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[Cluster]:
    """2 tiny-model replicas, a 3-id multiplexing LRU each."""
    with ray_cluster_of(tmp_path_factory.mktemp("cluster-data")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tiny_base():
    return wrap_model(BASE_NAME, make_tiny_llama(), make_tokenizer(), TARGETS)


@pytest.fixture
def make_adapter(tiny_base, tmp_path):
    def make(seed: int) -> tuple[bytes, bytes]:
        return adapter_files(tiny_base, "lora", tmp_path / f"a{seed}", seed=seed)

    return make
