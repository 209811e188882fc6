"""The Facet application for a Ray Serve config file (``serveConfigV2`` of a KubeRay RayService).

``python -m server.cluster`` deploys from a driver process; a Serve config instead names an
import path that Serve calls with the config's ``args``:

.. code-block:: yaml

    applications:
      - name: facet
        route_prefix: /
        import_path: server.cluster.builder:app
        args: {engine_gpus: 1}

Settings come from the environment of the process Serve builds the application in (the head
node's ``FACET_*`` and ``FACET_CLUSTER_*`` variables, e.g. from a ConfigMap), as
``python -m server.cluster`` reads them, and reach every replica as data. ``args`` add what
only a config file needs:

* ``engine_gpus``: GPUs Ray reserves for each engine replica (default 0). Ray hides the GPUs from
  an actor that reserves none, so on GPU nodes give 1 (or a fraction to share one device).

An argument this builder does not know is refused (``ValueError`` naming it), never ignored.
"""

from __future__ import annotations

from typing import Any

from server.settings import Settings

from .app import check_shared_store, replica_settings
from .config import ClusterSettings, deployment_options
from .engine import FacetEngine
from .ingress import build_ingress

ARGS = frozenset({"engine_gpus"})


def engine_options(cluster: ClusterSettings, max_batch_size: int, engine_gpus: float) -> dict:
    """``deployment_options`` plus the GPUs each engine replica reserves."""
    options = deployment_options(cluster, max_batch_size)
    if engine_gpus:
        options["ray_actor_options"] = {**options["ray_actor_options"], "num_gpus": engine_gpus}
    return options


def app(args: dict[str, Any] | None = None):
    """Serve's application builder: ingress -> engine deployment, from the environment's settings."""
    args = dict(args or {})
    unknown = sorted(set(args) - ARGS)
    if unknown:
        raise ValueError(f"args.{unknown[0]}: not an argument of {__name__}:app (known: {sorted(ARGS)})")
    gpus = args.get("engine_gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus < 0:
        raise ValueError("args.engine_gpus: must be a number >= 0")
    settings, cluster = Settings(), ClusterSettings()
    check_shared_store(settings, cluster)
    settings = replica_settings(settings)
    engine = FacetEngine.options(**engine_options(cluster, settings.max_batch_size, gpus)).bind(
        settings.model_dump(mode="json"), cluster.factory, cluster.max_adapters_per_replica
    )
    return build_ingress(settings).bind(engine)
