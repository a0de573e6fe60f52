#!/usr/bin/env bash
# Install the real servers used by integration tests and the demo:
#   * Redis  - Debian's redis-server package (system service left stopped)
#   * Kafka  - broker jars from Maven Central into .devservers/kafka/libs
# Idempotent: each step is skipped when its result is already present, so CI
# and developers can run it unconditionally.
#
# Env vars:
#   HSNN_DEVSERVERS_HOME  install root (default: <repo>/.devservers)
#   HSNN_KAFKA_VERSION    kafka_2.13 version to fetch (default: the POM's, 4.4.0)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
home="${HSNN_DEVSERVERS_HOME:-$repo/.devservers}"
libs="$home/kafka/libs"
pom="$here/kafka-pom.xml"
kafka_version="${HSNN_KAFKA_VERSION:-}"

log() { printf '[devservers] %s\n' "$*" >&2; }

# Run as root directly, otherwise through sudo when it exists.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else log "need root for: $*"; return 1
    fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"
}

# ---------------------------------------------------------------- Redis ----
install_redis() {
    if command -v redis-server >/dev/null 2>&1; then
        log "redis-server present: $(redis-server --version | head -n1)"
        return
    fi
    log "installing redis-server via apt"
    # Block service start-up during the install with a temporary policy-rc.d
    # (only if none exists): tests start their own redis on a free port.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy" \
            && added_policy=1
    fi
    local rc=0
    apt_install redis-server || rc=$?
    if [ "$added_policy" -eq 1 ]; then as_root rm -f "$policy" || true; fi
    [ "$rc" -eq 0 ] || return "$rc"
    # Belt and braces for systemd hosts: make sure the packaged service is off.
    if command -v systemctl >/dev/null 2>&1; then
        as_root systemctl stop redis-server >/dev/null 2>&1 || true
        as_root systemctl disable redis-server >/dev/null 2>&1 || true
    fi
    if command -v service >/dev/null 2>&1; then
        as_root service redis-server stop >/dev/null 2>&1 || true
    fi
    log "installed $(redis-server --version | head -n1)"
}

# ---------------------------------------------------------------- Kafka ----
install_java_maven() {
    local missing=()
    command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
    command -v mvn >/dev/null 2>&1 || missing+=(maven)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]} via apt"
        apt_install "${missing[@]}"
    fi
}

install_kafka() {
    # The marker records what was fetched; a changed POM or version refetches.
    local stamp
    stamp="$(cat "$pom" <(printf 'version=%s\n' "$kafka_version") | sha256sum | cut -d' ' -f1)"
    if [ -f "$libs/.installed" ] && [ "$(head -n1 "$libs/.installed")" = "$stamp" ]; then
        log "kafka libs present: $libs ($(sed -n 2p "$libs/.installed"))"
        return
    fi
    install_java_maven
    log "fetching kafka jars from Maven Central into $libs"
    local tmp="$libs.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    local args=(-q -B -Dstyle.color=never -f "$pom" dependency:copy-dependencies
                -DincludeScope=runtime "-DoutputDirectory=$tmp")
    [ -n "$kafka_version" ] && args+=("-Dkafka.version=$kafka_version")
    # Maven's output goes to a log and is shown only on failure: -q still
    # emits stray ANSI escapes, and CI logs want the error, not the noise.
    local mvn_log="$home/kafka/mvn.log"
    if ! mvn "${args[@]}" >"$mvn_log" 2>&1; then
        cat "$mvn_log" >&2
        rm -rf "$tmp"
        log "maven failed to fetch kafka (full log: $mvn_log)"
        return 1
    fi
    local jar
    jar="$(cd "$tmp" && ls kafka_2.13-*.jar 2>/dev/null | head -n1)"
    if [ -z "$jar" ]; then
        rm -rf "$tmp"; log "no kafka_2.13 jar was copied"; return 1
    fi
    printf '%s\n%s\n' "$stamp" "${jar%.jar}" > "$tmp/.installed"
    rm -rf "$libs"
    mv "$tmp" "$libs"
    log "kafka installed: ${jar%.jar} ($(ls "$libs"/*.jar | wc -l) jars)"
}

install_redis
install_kafka
log "done"
