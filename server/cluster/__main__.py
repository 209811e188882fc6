"""``python -m server.cluster [--replicas N|auto] [--port P] [any server flag]`` (make serve-cluster).

Starts a local Ray instance (or joins ``RAY_ADDRESS``), deploys the ingress and the engine
replicas, and serves until interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import ray

from server.settings import add_cli_args, settings_from_cli

from .app import run
from .config import ClusterSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.cluster", add_help=False)
    parser.add_argument("--replicas", default=None, help="engine replicas, or 'auto'")
    parser.add_argument("--max-adapters-per-replica", type=int, default=None)
    parser.add_argument("--engine-cpus", type=float, default=None)
    parser.add_argument("--factory", default=None, help="'module:function' building the app")
    ours, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        full = argparse.ArgumentParser(prog="python -m server.cluster", parents=[parser])
        add_cli_args(full)
        full.print_help()
        return
    overrides = {k: v for k, v in vars(ours).items() if v is not None}
    if "replicas" in overrides and overrides["replicas"] != "auto":
        overrides["replicas"] = int(overrides["replicas"])
    cluster = ClusterSettings(**overrides)
    settings = settings_from_cli(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("RAY_ADDRESS"):  # join an existing cluster (ray start --head elsewhere)
        ray.init()
    else:  # a local instance, on loopback only
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        run(settings, cluster, blocking=True)
    except ValueError as exc:  # a configuration the cluster refuses (names the setting)
        raise SystemExit(f"facet cluster: {exc}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
