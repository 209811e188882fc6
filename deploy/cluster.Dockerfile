# Facet cluster image: the server image plus Ray Serve and the shared-store clients, for the
# Compose `cluster` profile (deploy/docker-compose.yml) and the KubeRay RayService (deploy/k8s/).
#
#   docker compose -p facet --profile cpu build facet-cpu          # facet:cpu first
#   docker build -f deploy/cluster.Dockerfile -t facet-cluster:cpu .
#   docker build -f deploy/cluster.Dockerfile --build-arg FACET_IMAGE=facet:cuda -t facet-cluster:cuda .
#
# The pins are pyproject.toml's (the `cluster` extra and the store backends of the dev extras);
# tests/deploy/test_compose_cluster.py fails when they drift. wget: KubeRay's probes run it.
ARG FACET_IMAGE=facet:cpu
FROM ${FACET_IMAGE}
USER root
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir "ray[serve]==2.60.0" "boto3==1.44.8" "psycopg[binary]==3.3.9"
# Ray keeps its session files and logs under /tmp/ray: a tmpfs when the root filesystem is read-only.
USER 10001:10001
