"""Settings of the Ray Serve application (``FACET_CLUSTER_*``), next to the server's ``Settings``.

The server's own settings (``FACET_*``, ``server/settings.py``) are read once by the driver and
handed to every engine replica as data, so all replicas run the same configuration whatever
environment their worker processes see. These are the cluster's additions: how many engine
replicas, how many adapters each keeps in its multiplexing LRU, and which factory builds the app.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_FACTORY = "server.cluster.factories:facet_app"
# The multiplex id every fine-tune and training-file request carries: they all land on the one
# replica that holds it (the job runner there trains; its adapters go to the shared store).
JOBS_MODEL_ID = "facet-jobs"
# Requests a replica takes beyond its batch: adapter uploads, listings, metrics, job polls.
CONTROL_HEADROOM = 4


class ClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACET_CLUSTER_", extra="forbid")

    replicas: int | Literal["auto"] = Field(
        2, description="engine replicas (each one base model + engine), or 'auto' (autoscaling)"
    )
    min_replicas: int = Field(1, ge=1, description="with replicas=auto: the autoscaler's floor")
    max_replicas: int = Field(4, ge=1, description="with replicas=auto: the autoscaler's ceiling")
    max_adapters_per_replica: int = Field(
        16, ge=2, description="multiplexing LRU per replica: adapter versions a replica keeps affinity for"
    )
    engine_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each engine replica")
    factory: str = Field(
        DEFAULT_FACTORY, description="'module:function' building the Facet ASGI app from Settings"
    )
    app_name: str = Field("facet", description="Ray Serve application name")

    @field_validator("replicas")
    @classmethod
    def _positive(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("replicas must be >= 1 or 'auto'")
        return value


def import_factory(spec: str) -> Callable[[Any], Any]:
    """``'package.module:function'`` -> the function (a replica builds its app with it)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must look like 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def deployment_options(cluster: ClusterSettings, max_batch_size: int) -> dict:
    """Ray Serve options of the engine deployment.

    ``max_ongoing_requests`` is the engine's batch plus a little room for control requests: a
    replica whose batch is full refuses more generations, and Ray's router sends them to another
    replica (or queues them) instead of piling them into this engine's waiting queue."""
    options: dict = {
        "max_ongoing_requests": max_batch_size + CONTROL_HEADROOM,
        "ray_actor_options": {"num_cpus": cluster.engine_cpus},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 30,
    }
    if cluster.replicas == "auto":
        if cluster.min_replicas > cluster.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        options["autoscaling_config"] = {
            "min_replicas": cluster.min_replicas,
            "max_replicas": cluster.max_replicas,
            # scale out when replicas average more than half a batch in flight
            "target_ongoing_requests": max(1, max_batch_size // 2),
            "upscale_delay_s": 10,
            "downscale_delay_s": 120,
        }
    else:
        options["num_replicas"] = cluster.replicas
    return options
