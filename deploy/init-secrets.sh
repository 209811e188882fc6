#!/bin/sh
# Create deploy/secrets/{api_keys,metrics_token} once: an admin key (also used by Prometheus to
# scrape /metrics) and an infer key, and deploy/.env from .env.example, with the `cluster`
# profile's store credentials (CLUSTER_*: PostgreSQL's password, MinIO's keys) appended.
# Existing files and values are left alone.
set -eu
cd "$(dirname "$0")/secrets"
chmod 700 .  # the directory keeps other host users out
umask 022  # the containers run as other users (facet, nobody) and must read the files
token() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
if [ ! -f api_keys ]; then
    admin=$(token)
    printf 'admin:%s\ninfer:%s\n' "$admin" "$(token)" > api_keys
    printf '%s' "$admin" > metrics_token
    echo "wrote deploy/secrets/api_keys and deploy/secrets/metrics_token"
else
    echo "deploy/secrets/api_keys exists; nothing to do"
fi
# The compose file's env_file: settings (FACET_*), all commented out in .env.example.
if [ ! -f ../.env ]; then
    cp ../.env.example ../.env
    echo "wrote deploy/.env (from .env.example)"
fi
# The `cluster` profile's credentials: compose substitutes them from .env (PostgreSQL, MinIO,
# and PGPASSWORD / AWS_* of the Ray nodes).
for name in CLUSTER_PG_PASSWORD CLUSTER_S3_ACCESS_KEY CLUSTER_S3_SECRET_KEY; do
    if ! grep -q "^$name=" ../.env; then
        printf '%s=%s\n' "$name" "$(token)" >> ../.env
        echo "appended $name to deploy/.env"
    fi
done
