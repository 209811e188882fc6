"""Slow: the cluster on the store for several machines, S3 (moto on loopback) + PostgreSQL
(initdb/pg_ctl in a temporary folder), 2 tiny replicas each with its own data folder."""

from __future__ import annotations

import json
import os

import pytest

from tests.store import backend_servers as servers

from .conftest import ray_cluster_of
from .test_ray_serve import on_both_replicas, upload

pytestmark = pytest.mark.slow
FACTORY = "tests.cluster.tiny_factory:tiny_app_on_configured_store"


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    from tests.api.tiny_server import tiny_settings

    from .conftest import ADMIN_KEY

    saved = {k: os.environ.get(k) for k in servers.S3_ENV}
    os.environ.update(servers.S3_ENV)  # Ray's workers inherit the driver's environment
    try:
        with servers.moto_server() as endpoint, servers.postgres_server() as pg:
            data = tmp_path_factory.mktemp("shared-cluster")
            settings = tiny_settings(
                data_dir=data,
                max_batch_size=4,
                api_keys=[f"admin:{ADMIN_KEY}"],
                store_blob_url=f"s3://{servers.new_bucket(endpoint)}/facet",
                store_s3_endpoint=endpoint,
                store_index_url=servers.new_database(pg),
            )
            with ray_cluster_of(data, settings, factory=FACTORY) as cluster:
                yield cluster
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_s3_and_postgres_shared_by_two_replicas(shared_cluster, make_adapter):
    c = shared_cluster
    body = {"prompt": "hello world", "max_new_tokens": 4, "temperature": 0.0, "adapter": "s3-a"}
    upload(c, "s3-a", make_adapter(3))
    first = on_both_replicas(c, "POST", "/generate", body)
    assert {json.loads(d)["adapter_version"] for _, d in first.values()} == {1}
    upload(c, "s3-a", make_adapter(4))
    second = on_both_replicas(c, "POST", "/generate", body)
    assert {json.loads(d)["adapter_version"] for _, d in second.values()} == {2}
    # each replica reads S3 through its own cache folder, under its own data folder
    slots = sorted(p.name for p in c.settings.data_dir.iterdir() if p.name.startswith("replica-"))
    assert slots == ["replica-0", "replica-1"], slots
    assert c.client.get("/adapters/s3-a/files/adapter_model.safetensors").content == make_adapter(4)[1]
