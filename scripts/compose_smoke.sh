#!/usr/bin/env bash
# docker compose, really run: start Docker if needed, build every image, bring the stack up, feed simulated
# traffic, check it end to end (scripts/compose_smoke_check.py), restart it with `down` + `up`, check again.
#
# Where Docker Hub cannot be reached (HSNN_SMOKE_IMAGES=local, the default here), the images compose names
# are built locally from a debootstrap'd Debian bookworm and tagged with the official names: Python 3.11,
# Redis and Prometheus from Debian packages, Kafka from Debian's Java 17 and the Kafka jars of Maven Central.
# Grafana has no such source and is left out. HSNN_SMOKE_IMAGES=official pulls the real images instead.
#
#   sudo bash scripts/compose_smoke.sh            # summary at the end and in $HSNN_SMOKE_DIR/summary.txt
#
# scripts/compose_smoke/override.yml tunes the trainer for a short run (tiny model, 30 s snapshots).
# Knobs: HSNN_SMOKE_DIR (work dir, default $TMPDIR/hsnn-smoke, else /var/tmp/hsnn-smoke), HSNN_SMOKE_BUILD=0 (reuse the built image), HSNN_SMOKE_TIMEOUT_S (wait for a promoted
# snapshot, default 1200), HSNN_SMOKE_KEEP=1 (leave the stack up), HSNN_TORCH_INDEX_URL (CPU-only torch).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${HSNN_SMOKE_DIR:-${TMPDIR:-/var/tmp}/hsnn-smoke}
IMAGES=${HSNN_SMOKE_IMAGES:-local}
TIMEOUT_S=${HSNN_SMOKE_TIMEOUT_S:-1200}
PROJECT=hsnn-smoke
API_PORT=18000
PROMETHEUS_PORT=19090
SERVICES=(kafka kafka-init redis trainer indexer retrieval_api prometheus feed)
mkdir -p "$WORK"
log() { echo "[compose-smoke $(date +%H:%M:%S)] $*" >&2; }

V1_FILE=.compose-smoke-v1.yml  # Debian's docker-compose 1.29 rejects the top-level `name:`; -p names the project
compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose -p "$PROJECT" -f docker-compose.yml -f scripts/compose_smoke/override.yml "$@"
    else
        [ -f "$V1_FILE" ] || sed '/^name: /d' docker-compose.yml >"$V1_FILE"
        docker-compose -p "$PROJECT" -f "$V1_FILE" -f scripts/compose_smoke/override.yml "$@"
    fi
}

ensure_docker() {
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
        || { ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; }; then
        log "installing docker.io, docker-compose, iptables, debootstrap (Debian)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose iptables debootstrap >&2
    fi
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (log: $WORK/dockerd.log)"
        nohup dockerd >"$WORK/dockerd.log" 2>&1 &
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null
    fi
}

image_of() {  # the image compose names for a service: image_of kafka -> apache/kafka:4.1.0
    awk -v svc="  $1:" '$0 == svc {found=1; next} found && /^    image:/ {print $2; exit}' docker-compose.yml
}

build_local_images() {
    if ! docker image inspect local/debian:bookworm >/dev/null 2>&1; then
        log "debootstrap Debian bookworm (minbase) -> local/debian:bookworm"
        [ -x "$WORK/rootfs/bin/sh" ] || debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >&2
        tar -C "$WORK/rootfs" -c . | docker import - local/debian:bookworm >&2
    fi
    local dir=scripts/compose_smoke
    log "local python:3.11 base, redis, prometheus"
    local python_context="$WORK/python-context"
    rm -rf "$python_context" && mkdir -p "$python_context"
    cp "$dir/python.Dockerfile" "$python_context/"
    cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$python_context/host-ca-certificates.crt"
    docker build -q -t local/python:3.11 -f "$python_context/python.Dockerfile" "$python_context" >&2
    docker build -q -t "$(image_of redis)" -f "$dir/redis.Dockerfile" "$dir" >&2
    docker build -q -t "$(image_of prometheus)" -f "$dir/prometheus.Dockerfile" "$dir" >&2
    log "kafka from Maven Central jars"
    bash devservers/install.sh >&2
    local context="$WORK/kafka-context" version
    rm -rf "$context" && mkdir -p "$context/libs"
    cp .devservers/kafka/libs/*.jar "$context/libs/"
    version=$(basename "$(ls "$context"/libs/kafka-clients-*.jar)" .jar); version=${version#kafka-clients-}
    curl -fsSL -o "$context/libs/kafka-tools-$version.jar" \
        "https://repo1.maven.org/maven2/org/apache/kafka/kafka-tools/$version/kafka-tools-$version.jar"
    cp "$dir/kafka.Dockerfile" "$dir/kafka-start.sh" "$context/"
    docker build -q -t "$(image_of kafka)" -f "$context/kafka.Dockerfile" "$context" >&2
}

up_and_check() {
    local phase=$1
    log "$phase: compose up ${SERVICES[*]}"
    compose up -d "${SERVICES[@]}" >&2
    PYTHONPATH="$PWD" .venv/bin/python scripts/compose_smoke_check.py --phase "$phase" --api "http://127.0.0.1:$API_PORT" \
        --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" --timeout-s "$TIMEOUT_S" --summary "$WORK/summary.txt"
}

ensure_docker
: >"$WORK/summary.txt"
trap 'compose logs --no-color >"$WORK/compose.log" 2>&1 || true; rm -f "$V1_FILE"' EXIT
export HSNN_API_ITEMS_TOKEN=${HSNN_API_ITEMS_TOKEN:-$(openssl rand -hex 16)}
export GRAFANA_ADMIN_PASSWORD=${GRAFANA_ADMIN_PASSWORD:-$(openssl rand -hex 16)}
export HSNN_PUBLISH_API=127.0.0.1:$API_PORT HSNN_PUBLISH_PROMETHEUS=127.0.0.1:$PROMETHEUS_PORT
export HSNN_FEED_RATE=${HSNN_FEED_RATE:-300}
build_args=()
if [ "$IMAGES" = local ]; then
    build_local_images
    build_args+=(--build-arg BASE_IMAGE=local/python:3.11)
fi
[ -n "${HSNN_TORCH_INDEX_URL:-}" ] && build_args+=(--build-arg "TORCH_INDEX_URL=$HSNN_TORCH_INDEX_URL")
if [ "${HSNN_SMOKE_BUILD:-1}" != 0 ]; then
    log "building hsnn-serve (log: $WORK/build.log)"
    started=$(date +%s)
    compose build "${build_args[@]}" trainer >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }
    echo "image build: $(( $(date +%s) - started ))s, $(docker image inspect -f '{{.Size}}' hsnn-serve:dev | numfmt --to=iec)" \
        | tee -a "$WORK/summary.txt" >&2
fi

up_and_check first
log "compose down (volumes kept), then up again"
compose down >&2
up_and_check restart
if [ "${HSNN_SMOKE_KEEP:-0}" != 1 ]; then
    compose logs --no-color >"$WORK/compose.log" 2>&1 || true
    compose down -v >&2
fi
log "summary ($WORK/summary.txt):"
cat "$WORK/summary.txt"
