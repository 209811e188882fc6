#!/usr/bin/env bash
# Build the CPU image from the real Dockerfile and check it running, then the Compose service.
#
#   deploy/test-image.sh          (make image-test; as root where tools must be installed)
#
# Uses the Docker daemon that answers (DOCKER_HOST); otherwise starts its own dockerd (vfs, a
# private data root and socket under $FACET_IMAGE_WORK) and stops it by its pid at the end.
# The base image is BASE_IMAGE when given, else a local Debian made once with debootstrap (the
# host's release, its CA bundle and pip's cert setting, so the build reaches the registries the
# host reaches) and reused. torch comes from the PyTorch index when it answers, else from the
# wheel pip resolves on this machine (linked into deploy/wheels/). Everything listens on
# 127.0.0.1; every wait is bounded; containers, network, volumes and Prometheus are removed at
# the end. Each check prints "ok" or "FAIL"; the exit status is the number of failures (capped).
#
# Settings: FACET_IMAGE_WORK (default /var/tmp/facet-image-test), FACET_IMAGE_CONTEXT (worktree:
# the checkout as it is, the default; head: a `git archive HEAD` export), BASE_IMAGE, PORT
# (18000), READY_TIMEOUT (900 s), BUILD=0 (reuse an existing facet:cpu).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${FACET_IMAGE_WORK:-/var/tmp/facet-image-test}
CONTEXT_MODE=${FACET_IMAGE_CONTEXT:-worktree}
PORT=${PORT:-18000}
COMPOSE_PORT=$((PORT + 1))
PROM_PORT=$((PORT + 2))
READY_TIMEOUT=${READY_TIMEOUT:-900}
TORCH_VERSION=2.13.0
IMAGE=facet:cpu
NAME=facet-image-test
PROJECT=facet-image-test
DOCKER=docker
[ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker # Debian's docker.io CLI matches its daemon
FAILS=0
DOCKERD_PID=
PROM_PID=
export DOCKER_BUILDKIT=0

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
check() { # check NAME COMMAND...: run it, print ok/FAIL
    if "${@:2}"; then log "check: $1: ok"; else log "check: $1: FAIL"; FAILS=$((FAILS + 1)); fi
}
die() { log "FATAL: $*"; exit 100; }

# --------------------------------------------------------------------------------- tools, daemon

install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v prometheus >/dev/null || missing+=(prometheus)
    [ ${#missing[@]} = 0 ] && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "missing: ${missing[*]} (install them or run as root)"
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install failed"
}

start_daemon() {
    if timeout 10 $DOCKER info >/dev/null 2>&1; then
        log "using the Docker daemon at ${DOCKER_HOST:-the default socket}"
        return
    fi
    [ "$(id -u)" = 0 ] || die "no Docker daemon answers and only root can start one"
    mkdir -p "$WORK"
    export DOCKER_HOST="unix://$WORK/docker.sock"
    dockerd --storage-driver=vfs --data-root "$WORK/root" --exec-root "$WORK/exec" \
        --host "$DOCKER_HOST" --pidfile "$WORK/docker.pid" >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        timeout 5 $DOCKER info >/dev/null 2>&1 && { log "started dockerd (pid $DOCKERD_PID, $DOCKER_HOST)"; return; }
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    tail -5 "$WORK/dockerd.log"
    die "dockerd did not answer within 60 s"
}

cleanup() {
    set +e
    [ -n "$PROM_PID" ] && kill "$PROM_PID" 2>/dev/null && wait "$PROM_PID" 2>/dev/null
    if timeout 10 $DOCKER info >/dev/null 2>&1; then
        compose down -v --timeout 10 >/dev/null 2>&1
        $DOCKER rm -f "$NAME" >/dev/null 2>&1
        $DOCKER volume rm "$NAME-data" >/dev/null 2>&1
        $DOCKER network rm "$NAME-net" >/dev/null 2>&1
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
        log "stopped dockerd (pid $DOCKERD_PID)"
    fi
}

# ----------------------------------------------------------------------------------------- build

base_image() {
    if [ -n "${BASE_IMAGE:-}" ]; then echo "$BASE_IMAGE"; return; fi
    local release
    release=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    local image="facet-base:$release"
    if ! $DOCKER image inspect "$image" >/dev/null 2>&1; then
        log "making $image with debootstrap (minbase)" >&2
        local rootfs="$WORK/rootfs-$release"
        rm -rf "$rootfs"
        nice -n 10 debootstrap --variant=minbase "$release" "$rootfs" >"$WORK/debootstrap.log" 2>&1 ||
            die "debootstrap failed (see $WORK/debootstrap.log)"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        # trust what the host trusts (an intercepting proxy's CA too); pip reads its own setting
        mkdir -p "$rootfs/etc/ssl"
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/host-ca-bundle.crt"
        printf '[global]\ncert = /etc/ssl/host-ca-bundle.crt\n' >"$rootfs/etc/pip.conf"
        tar -C "$rootfs" -c . | $DOCKER import -c 'CMD ["/bin/bash"]' - "$image" >/dev/null || die "docker import failed"
        rm -rf "$rootfs"
    fi
    echo "$image"
}

torch_source() { # "index" when the PyTorch index answers, else "wheels" (a local wheel linked in)
    if timeout 15 curl -sf -o /dev/null https://download.pytorch.org/whl/cpu/torch/; then echo index; return; fi
    local wheels="$1/deploy/wheels"
    if ! ls "$wheels"/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
        python3 -m pip download -q --no-deps "torch==$TORCH_VERSION" -d "$wheels" >&2 ||
            die "no PyTorch index and pip cannot resolve torch==$TORCH_VERSION here"
    fi
    echo wheels
}

build_context() { # the folder docker build is given
    if [ "$CONTEXT_MODE" = head ]; then
        local dir="$WORK/context"
        rm -rf "$dir" && mkdir -p "$dir"
        git -C "$ROOT" archive HEAD | tar -x -C "$dir"
        cp -l "$ROOT"/deploy/wheels/*.whl "$dir/deploy/wheels/" 2>/dev/null ||
            cp "$ROOT"/deploy/wheels/*.whl "$dir/deploy/wheels/" 2>/dev/null
        echo "$dir"
    else
        echo "$ROOT"
    fi
}

build_image() {
    local base context source start old
    if [ "${BUILD:-1}" = 0 ] && $DOCKER image inspect "$IMAGE" >/dev/null 2>&1; then
        log "BUILD=0: using the existing $IMAGE"
        return
    fi
    base=$(base_image) || exit 100
    context=$(build_context)
    source=$(torch_source "$context") || exit 100
    log "building $IMAGE from $context/Dockerfile (BASE_IMAGE=$base, TORCH_SOURCE=$source)"
    start=$(date +%s)
    old=$($DOCKER image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null)
    nice -n 10 $DOCKER build --build-arg BASE_IMAGE="$base" --build-arg DEVICE=cpu \
        --build-arg TORCH_SOURCE="$source" -f "$context/Dockerfile" -t "$IMAGE" "$context" >"$WORK/build.log" 2>&1 ||
        { tail -20 "$WORK/build.log"; die "docker build failed (see $WORK/build.log)"; }
    log "measure: build: $(($(date +%s) - start)) s ($(grep -c 'Using cache' "$WORK/build.log") steps cached)"
    # the replaced image's own layers (vfs keeps full copies); the build cache stays
    [ -n "$old" ] && [ "$old" != "$($DOCKER image inspect -f '{{.Id}}' "$IMAGE")" ] && $DOCKER rmi "$old" >/dev/null 2>&1
    return 0
}

# -------------------------------------------------------------------------------------- checking

compose() { COMPOSE_HTTP_TIMEOUT=600 PUBLISH_PORT="127.0.0.1:$COMPOSE_PORT" docker-compose -p "$PROJECT" -f "$ROOT/deploy/docker-compose.yml" --profile cpu "$@"; }

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@"; }

wait_ready() { # wait_ready URL CONTAINER: seconds until /ready is 200 (empty when it never was)
    local start now
    start=$(date +%s.%N)
    while true; do
        [ "$(http_code "$1/ready")" = 200 ] && break
        [ "$($DOCKER inspect -f '{{.State.Running}}' "$2" 2>/dev/null)" = true ] || { $DOCKER logs --tail 20 "$2"; return 1; }
        now=$(date +%s)
        [ $((now - ${start%.*})) -lt "$READY_TIMEOUT" ] || { $DOCKER logs --tail 20 "$2"; return 1; }
        sleep 0.5
    done
    now=$(date +%s.%N)
    awk -v a="$start" -v b="$now" 'BEGIN { printf "%.1f\n", b - a }'
}

wait_healthy() { # the HEALTHCHECK (every 15 s) reports healthy within 120 s
    for _ in $(seq 120); do
        [ "$($DOCKER inspect -f '{{.State.Health.Status}}' "$1")" = healthy ] && return 0
        sleep 1
    done
    return 1
}

run_container() {
    $DOCKER run -d --name "$NAME" --network "$NAME-net" --read-only --tmpfs /tmp \
        --security-opt no-new-privileges:true -v "$NAME-data:/data" \
        -v "$ROOT/deploy/secrets/api_keys:/run/secrets/facet_api_keys:ro" \
        -e FACET_API_KEYS_FILE=/run/secrets/facet_api_keys -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null
}

is_user() { [ "$($DOCKER exec "$NAME" id -u)" = 10001 ] && [ "$($DOCKER inspect -f '{{.Config.User}}' "$NAME")" = 10001:10001 ]; }
is_read_only() {
    [ "$($DOCKER inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$NAME")" = true ] &&
        ! $DOCKER exec "$NAME" touch /opt/venv/x 2>/dev/null &&
        $DOCKER exec "$NAME" sh -c 'touch /data/.w && rm /data/.w' &&
        [ "$($DOCKER inspect -f '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Type}}{{end}}{{end}}' "$NAME")" = volume ]
}
answers_paris() { # greedy, the real SmolLM2
    local text
    text=$(python3 "$ROOT/deploy/image_client.py" generate "$1" "$INFER" \
        '{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_new_tokens":16}') || return 1
    log "  /generate: $text"
    [[ $text == *Paris* ]]
}
adapter_text() {
    python3 "$ROOT/deploy/image_client.py" generate "$1" "$INFER" \
        '{"prompt":"The capital of France is","adapter":"image-lora","max_new_tokens":8}'
}
upload_adapter() {
    python3 "$ROOT/deploy/image_client.py" lora "$WORK/image-lora" --seed 17 &&
        [ "$(http_code -H "authorization: Bearer $ADMIN" "$1/adapters" -F adapter_id=image-lora \
            -F config=@"$WORK/image-lora/adapter_config.json" -F weights=@"$WORK/image-lora/adapter_model.safetensors")" = 201 ] &&
        ADAPTER_TEXT=$(adapter_text "$1") && log "  with image-lora: $ADAPTER_TEXT"
}
adapter_survives() { # stored (GET 200) and greedy generation with it unchanged
    [ "$(http_code -H "authorization: Bearer $ADMIN" "$1/adapters/image-lora")" = 200 ] &&
        [ "$(adapter_text "$1")" = "$ADAPTER_TEXT" ]
}
prometheus_scrapes() { # the host's prometheus scrapes /metrics with the metrics_token secret
    local dir="$WORK/prometheus"
    rm -rf "$dir" && mkdir -p "$dir"
    sed -e "s#/run/secrets/metrics_token#$ROOT/deploy/secrets/metrics_token#" \
        -e "s#facet-server:8000#127.0.0.1:$PORT#" -e "s#localhost:9090#127.0.0.1:$PROM_PORT#" \
        "$ROOT/deploy/prometheus/prometheus.yml" >"$dir/prometheus.yml"
    prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
        --web.listen-address="127.0.0.1:$PROM_PORT" >"$dir/log" 2>&1 &
    PROM_PID=$!
    local query="http://127.0.0.1:$PROM_PORT/api/v1/query?query=facet_ready%7Bjob%3D%22facet%22%7D"
    for _ in $(seq 60); do
        if curl -s --max-time 5 "$query" | grep -q '"value":\[[0-9.]*,"1"\]'; then
            kill "$PROM_PID" && wait "$PROM_PID" 2>/dev/null
            PROM_PID=
            return 0
        fi
        sleep 1
    done
    curl -s --max-time 5 "http://127.0.0.1:$PROM_PORT/api/v1/targets" | head -c 600
    return 1
}

stop_drains() { # a stream in flight when docker stop lands goes on to its done event; exit code 0
    local out="$WORK/stream.txt" client stopper at_stop code drained
    rm -f "$out"
    python3 "$ROOT/deploy/image_client.py" stream "$1" "$INFER" "$out" \
        '{"prompt":"Once upon a time, in a land far away,","max_new_tokens":64}' &
    client=$!
    for _ in $(seq 300); do grep -q '^event: token' "$out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^event: token' "$out" 2>/dev/null || { kill "$client"; return 1; }
    $DOCKER stop -t 45 "$NAME" >/dev/null &
    stopper=$!
    at_stop=$(grep -c '^event: token' "$out")
    timeout 60 tail --pid="$client" -f /dev/null
    wait "$client"
    wait "$stopper"
    code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$NAME")
    drained=$($DOCKER logs "$NAME" 2>&1 | grep -o 'draining [0-9]* request(s)' | tail -1)
    log "  stream: $at_stop token(s) when docker stop began, $(grep -c '^event: token' "$out") in all," \
        "done event: $(grep -c '^event: done' "$out"), server log: '$drained', exit code $code"
    grep -q '^event: done' "$out" && [ -n "$drained" ] && [ "$drained" != "draining 0 request(s)" ] && [ "$code" = 0 ]
}

compose_checks() {
    check "compose config validates" compose config -q
    compose up -d --no-build facet-cpu >"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log"; }
    local cid url="http://127.0.0.1:$COMPOSE_PORT" took
    cid=$(compose ps -q facet-cpu)
    [ -n "$cid" ] || { check "compose up facet-cpu" false; return; }
    check "compose: image $IMAGE" [ "$($DOCKER inspect -f '{{.Config.Image}}' "$cid")" = "$IMAGE" ]
    local mounts
    mounts=$($DOCKER inspect -f '{{.HostConfig.ReadonlyRootfs}}{{range .Mounts}} {{.Destination}}{{end}}' "$cid")
    log "  compose container: read-only, mounts: $mounts"
    check "compose: read-only root, /data volume, api_keys secret" \
        [ "$(echo "$mounts" | tr ' ' '\n' | sort | tr '\n' ' ')" = "/data /run/secrets/facet_api_keys true " ]
    check "compose: stop grace period 45 s" [ "$($DOCKER inspect -f '{{.Config.StopTimeout}}' "$cid")" = 45 ]
    took=$(wait_ready "$url" "$cid") && log "measure: compose first start to /ready: $took s"
    check "compose: /ready 200" [ -n "$took" ]
    check "compose: /generate without a key is 401" [ "$(http_code -X POST "$url/generate")" = 401 ]
    check "compose: /generate answers Paris (infer key from the secret)" answers_paris "$url"
    check "compose: down" compose down -v --timeout 45
}

main() {
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    install_tools
    mkdir -p "$WORK"
    start_daemon
    build_image
    log "measure: image size unpacked: $($DOCKER image inspect -f '{{.Size}}' "$IMAGE") bytes"
    log "measure: image size compressed (docker save | gzip): $($DOCKER save "$IMAGE" | gzip | wc -c) bytes"
    "$ROOT/deploy/init-secrets.sh" >/dev/null
    ADMIN=$(cat "$ROOT/deploy/secrets/metrics_token")
    INFER=$(sed -n 's/^infer://p' "$ROOT/deploy/secrets/api_keys" | head -1)
    [ -n "$INFER" ] || INFER=$ADMIN

    $DOCKER rm -f "$NAME" >/dev/null 2>&1
    $DOCKER volume rm "$NAME-data" >/dev/null 2>&1
    $DOCKER network rm "$NAME-net" >/dev/null 2>&1
    $DOCKER network create "$NAME-net" >/dev/null || die "docker network create failed"
    run_container || die "docker run failed"
    local url="http://127.0.0.1:$PORT" took
    took=$(wait_ready "$url" "$NAME") && log "measure: first start to /ready (model conversion, kernel build): $took s"
    check "/ready 200 after the first start" [ -n "$took" ]
    [ -n "$took" ] || exit 100
    check "runs as uid 10001 (non-root)" is_user
    check "read-only root filesystem, /data a volume" is_read_only
    check "HEALTHCHECK healthy" wait_healthy "$NAME"
    check "/generate answers Paris" answers_paris "$url"
    check "adapter upload (201) and generation with it" upload_adapter "$url"

    $DOCKER restart "$NAME" >/dev/null
    took=$(wait_ready "$url" "$NAME") && log "measure: restart to /ready (cache hit): $took s"
    check "/ready 200 after docker restart" [ -n "$took" ]
    check "adapter survives docker restart" adapter_survives "$url"

    $DOCKER kill -s KILL "$NAME" >/dev/null && $DOCKER start "$NAME" >/dev/null
    took=$(wait_ready "$url" "$NAME") && log "measure: kill -9 + start to /ready: $took s"
    check "/ready 200 after docker kill -s KILL + start" [ -n "$took" ]
    check "adapter survives docker kill -s KILL" adapter_survives "$url"

    check "Prometheus scrapes /metrics with the metrics_token secret" prometheus_scrapes
    check "docker stop drains an in-flight stream, exit code 0" stop_drains "$url"
    $DOCKER rm -f "$NAME" >/dev/null

    compose_checks
    log "result: $FAILS check(s) failed"
    exit $((FAILS > 99 ? 99 : FAILS))
}

main "$@"
