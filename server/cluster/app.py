"""Bind the ingress and the engine deployment into one Ray Serve application and run it.

Replicas need one store they all see (docs/scale-out.md): on one machine the default embedded
store (``<data_dir>/adapters``, SQLite + local files) is shared by the replica processes; across
machines use PostgreSQL + S3 (``FACET_STORE_INDEX_URL``, ``FACET_STORE_BLOB_URL``).
"""

from __future__ import annotations

import logging

from ray import serve

from server.settings import Settings

from .config import ClusterSettings, deployment_options
from .engine import FacetEngine
from .ingress import build_ingress

log = logging.getLogger("facet.cluster")

# Orphan-blob grace when several processes share local files: a replica that (re)starts runs the
# GC, which must not take another replica's put that has published its blobs but not yet
# committed its row (a put takes well under a second between the two on local disk).
SHARED_LOCAL_GRACE_S = 60.0


def replica_settings(settings: Settings) -> Settings:
    """``settings`` as every replica gets them: paths made absolute (Ray's worker processes need
    not share the driver's working directory), and a GC grace period on a shared local store."""
    update: dict = {"data_dir": settings.data_dir.resolve()}
    for name in ("models_dir", "kernels_dir", "api_keys_file"):
        value = getattr(settings, name)
        if value is not None:
            update[name] = value.resolve()
    if settings.store_orphan_grace_s is None and settings.store_blob_url == "file":
        update["store_orphan_grace_s"] = SHARED_LOCAL_GRACE_S
    return settings.model_copy(update=update)


def check_shared_store(settings: Settings, cluster: ClusterSettings) -> None:
    """Refuse a store the replicas cannot share: S3 blobs with the SQLite index would put one
    index file and one read-through cache folder under every replica's one ``data_dir``."""
    several = cluster.replicas == "auto" or cluster.replicas > 1
    if several and settings.store_blob_url.startswith("s3://") and settings.store_index_url == "sqlite":
        raise ValueError(
            "store_index_url: with store_blob_url on S3 and several replicas, the index must be "
            "PostgreSQL (postgresql://...), or keep both embedded (file + sqlite) on one machine"
        )


def build_app(settings: Settings, cluster: ClusterSettings):
    """The bound application: ingress -> engine deployment."""
    check_shared_store(settings, cluster)
    settings = replica_settings(settings)
    engine = FacetEngine.options(**deployment_options(cluster, settings.max_batch_size)).bind(
        settings.model_dump(mode="json"), cluster.factory, cluster.max_adapters_per_replica
    )
    return build_ingress(settings).bind(engine)


def run(settings: Settings, cluster: ClusterSettings, *, blocking: bool = False):
    """Start Serve's HTTP proxy on ``settings.host:settings.port`` and deploy; returns the ingress
    handle (``blocking``: serve until interrupted)."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    handle = serve.run(
        build_app(settings, cluster), name=cluster.app_name, route_prefix="/", blocking=blocking
    )
    log.info(
        "Facet cluster on http://%s:%d (%s engine replicas)", settings.host, settings.port, cluster.replicas
    )
    return handle


def engine_handle(cluster: ClusterSettings):
    """A handle on the engine deployment (tests and tools call ``describe`` through it)."""
    return serve.get_deployment_handle("FacetEngine", app_name=cluster.app_name)
