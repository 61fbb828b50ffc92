#!/usr/bin/env bash
# Builds the backends that the test suite runs, from Go modules at pinned
# versions, into a cache OUTSIDE the repo:
#
#   ${OTEL_BRIDGE_CACHE:-$HOME/.cache/otel-bridge}/bin/jaeger          Jaeger v2 (traces)
#   ${OTEL_BRIDGE_CACHE:-$HOME/.cache/otel-bridge}/bin/otelcol-bridge  OpenTelemetry Collector (ocb)
#   ${OTEL_BRIDGE_CACHE:-$HOME/.cache/otel-bridge}/bin/prometheus      Prometheus 3 (metrics)
#   ${OTEL_BRIDGE_CACHE:-$HOME/.cache/otel-bridge}/bin/victoria-logs   VictoriaLogs (logs)
#
# All four are Apache-2.0.
#
# Each binary has a stamp file next to it (<name>.version); a binary whose
# stamp matches the pinned version is not rebuilt. GOPATH, the module cache
# and the build cache live under the same cache dir, so a rebuild is fast.
#
# Grafana Tempo is not built: it is AGPL-3.0, and the project uses no AGPL
# software, not even in tests (collector-config/tempo.yaml still sends to it).
# The script builds every one it can, says which failed (BUILD FAILED: NAME,
# with the end of its build log) and exits non-zero when any did.
#
# Builds run under `nice` (NICE, default 10): they are CPU-heavy.
set -euo pipefail

# ---- pinned versions -------------------------------------------------------
# Jaeger v2 lives in module github.com/jaegertracing/jaeger (no /v2 suffix);
# each v2 release is also tagged v1.x. v1.76.0 == Jaeger v2.13.0.
JAEGER_MODULE=github.com/jaegertracing/jaeger
JAEGER_MODULE_VERSION=v1.76.0
JAEGER_RELEASE=v2.13.0
# The OpenTelemetry Collector Builder; scripts/otelcol-builder.yaml pins every
# component at this same version.
OCB_MODULE=go.opentelemetry.io/collector/cmd/builder
OCB_VERSION=v0.165.0
# Prometheus: Go module versions are v0.<minor>.<patch> for release 3.<minor>.<patch>.
# v0.316.0 == Prometheus 3.16.0, the newest the proxy serves for go1.26 (its
# go.mod needs go 1.26.7). Built without the `builtinassets` tag: the web UI's
# compiled assets are not in the module (they come from an npm build) and the
# tests only use the HTTP API and the OTLP receiver, so the UI pages 404.
PROMETHEUS_MODULE=github.com/prometheus/prometheus
PROMETHEUS_MODULE_VERSION=v0.316.0
PROMETHEUS_RELEASE=3.16.0
# VictoriaLogs: its own module since the split from VictoriaMetrics; the
# server is app/victoria-logs (its web UI, vmui, is embedded from the module).
VICTORIALOGS_MODULE=github.com/VictoriaMetrics/VictoriaLogs
VICTORIALOGS_VERSION=v1.52.1

# ---- layout ----------------------------------------------------------------
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MANIFEST="$REPO_DIR/scripts/otelcol-builder.yaml"
CACHE="${OTEL_BRIDGE_CACHE:-$HOME/.cache/otel-bridge}"
BIN="$CACHE/bin"
SRC="$CACHE/src"
LOGS="$CACHE/logs"
NICE="${NICE:-10}"
mkdir -p "$BIN" "$SRC" "$LOGS"

export GOPATH="$CACHE/go"
export GOMODCACHE="$CACHE/go/pkg/mod"
export GOCACHE="$CACHE/go-build"
export GOTOOLCHAIN=local   # never download a toolchain; use the installed go
export CGO_ENABLED=0
export GOFLAGS="-modcacherw -buildvcs=false"

if ! command -v go >/dev/null 2>&1; then
    echo "build-backends: 'go' is not on PATH" >&2
    exit 1
fi
GO_VERSION="$(go env GOVERSION)"

# One build at a time per cache dir (make test and a pytest run may race).
exec 9>"$CACHE/.build.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

log() { printf 'build-backends: %s\n' "$*" >&2; }

# Prints the value of a top-level string field of `go mod download -json`.
json_field() { sed -n "s/^\t\"$1\": \"\(.*\)\",\{0,1\}\$/\1/p" | head -n1; }

# go mod download MODULE@VERSION, print its (read-only) source dir.
download_module() {
    local out dir err
    out="$(nice -n "$NICE" go mod download -json "$1" 2>&1 || true)"
    dir="$(printf '%s\n' "$out" | json_field Dir)"
    err="$(printf '%s\n' "$out" | json_field Error)"
    if [[ -z "$dir" || -n "$err" ]]; then
        printf 'go mod download %s failed: %b\n' "$1" "${err:-$out}" >&2
        return 1
    fi
    printf '%s\n' "$dir"
}

# A writable copy of a module's source (go build refuses to honour the
# module's replace directives unless it is the main module).
writable_copy() {  # MODULE@VERSION DEST
    local dir
    dir="$(download_module "$1")" || return 1
    rm -rf "$2" && cp -R "$dir" "$2" && chmod -R u+w "$2"
}

stamp_ok() {  # NAME EXPECTED-STAMP
    [[ -x "$BIN/$1" && -f "$BIN/$1.version" && "$(cat "$BIN/$1.version")" == "$2" ]]
}

fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# ---- jaeger ----------------------------------------------------------------
build_jaeger() {
    local dir="$SRC/jaeger-$JAEGER_MODULE_VERSION" date
    writable_copy "$JAEGER_MODULE@$JAEGER_MODULE_VERSION" "$dir" || return 1
    # The proxy's .info has the tag's commit time but no commit hash.
    date="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$GOMODCACHE/cache/download/$JAEGER_MODULE/@v/$JAEGER_MODULE_VERSION.info" 2>/dev/null || true)"
    local pkg="$JAEGER_MODULE/internal/version"
    (cd "$dir" && nice -n "$NICE" go build -trimpath \
        -ldflags "-s -w -X $pkg.latestVersion=$JAEGER_RELEASE -X $pkg.date=${date:-unknown}" \
        -o "$BIN/jaeger.tmp" ./cmd/jaeger) || return 1
    mv -f "$BIN/jaeger.tmp" "$BIN/jaeger"
}

# ---- prometheus -------------------------------------------------------------
build_prometheus() {
    local dir="$SRC/prometheus-$PROMETHEUS_MODULE_VERSION" date
    writable_copy "$PROMETHEUS_MODULE@$PROMETHEUS_MODULE_VERSION" "$dir" || return 1
    date="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$GOMODCACHE/cache/download/$PROMETHEUS_MODULE/@v/$PROMETHEUS_MODULE_VERSION.info" 2>/dev/null || true)"
    local pkg=github.com/prometheus/common/version
    # GOWORK=off: the module ships a go.work naming sub-modules the module zip
    # does not hold (compliance/, internal/tools/, ...).
    (cd "$dir" && GOWORK=off nice -n "$NICE" go build -trimpath \
        -ldflags "-s -w -X $pkg.Version=$PROMETHEUS_RELEASE -X $pkg.Revision=$PROMETHEUS_MODULE_VERSION -X $pkg.Branch=module -X $pkg.BuildUser=build-backends -X $pkg.BuildDate=${date:-unknown}" \
        -o "$BIN/prometheus.tmp" ./cmd/prometheus) || return 1
    mv -f "$BIN/prometheus.tmp" "$BIN/prometheus"
}

# ---- victorialogs -----------------------------------------------------------
build_victorialogs() {
    local dir="$SRC/victorialogs-$VICTORIALOGS_VERSION"
    writable_copy "$VICTORIALOGS_MODULE@$VICTORIALOGS_VERSION" "$dir" || return 1
    (cd "$dir" && nice -n "$NICE" go build -trimpath \
        -ldflags "-s -w -X github.com/VictoriaMetrics/VictoriaMetrics/lib/buildinfo.Version=victoria-logs-$VICTORIALOGS_VERSION" \
        -o "$BIN/victoria-logs.tmp" ./app/victoria-logs) || return 1
    mv -f "$BIN/victoria-logs.tmp" "$BIN/victoria-logs"
}

# ---- collector (ocb) -------------------------------------------------------
build_collector() {
    local ocb="$GOPATH/bin/builder" out="$SRC/otelcol-bridge" manifest="$SRC/otelcol-builder.yaml"
    if [[ ! -x "$ocb" || "$("$ocb" version 2>/dev/null || true)" != *"${OCB_VERSION#v}"* ]]; then
        nice -n "$NICE" go install "$OCB_MODULE@$OCB_VERSION" || return 1
    fi
    # The repo's manifest, with the output path moved into the cache.
    sed "s|^\([[:space:]]*output_path:\).*|\1 $out|" "$MANIFEST" >"$manifest" || return 1
    rm -rf "$out"
    # GOFLAGS=-e reaches only `go mod tidy` (the one go command ocb runs that
    # has -e): tidy also resolves the *test* imports of every component, and
    # fileexporter's tests import otlpencodingextension, which the Go module
    # proxy does not serve. -e lets tidy finish without that test-only module;
    # the build itself never needs it.
    GOFLAGS="$GOFLAGS -e" nice -n "$NICE" "$ocb" --config="$manifest" --ldflags="-s -w" || return 1
    cp -f "$out/otelcol-bridge" "$BIN/otelcol-bridge.tmp" || return 1
    mv -f "$BIN/otelcol-bridge.tmp" "$BIN/otelcol-bridge"
}

# run_build NAME STAMP FUNCTION -> 0 built or up to date, 1 failed
run_build() {
    local name="$1" stamp="$2" fn="$3" logf="$LOGS/$1-build.log" t0 secs
    if stamp_ok "$name" "$stamp"; then
        log "$name: up to date ($stamp)"
        return 0
    fi
    log "$name: building $stamp (log: $logf)"
    rm -f "$BIN/$name.version"
    t0=$(date +%s)
    if "$fn" >"$logf" 2>&1; then
        secs=$(($(date +%s) - t0))
        printf '%s\n' "$stamp" >"$BIN/$name.version"
        log "$name: built in $(fmt_secs "$secs") ($secs s), $(du -h "$BIN/$name" | cut -f1)"
        return 0
    fi
    secs=$(($(date +%s) - t0))
    log "BUILD FAILED: $name, after $(fmt_secs "$secs") ($secs s); last lines of $logf:"
    tail -n 25 "$logf" | sed 's/^/    /' >&2
    return 1
}

manifest_sum="$(sha256sum "$MANIFEST" | cut -c1-16)"
JAEGER_STAMP="$JAEGER_MODULE@$JAEGER_MODULE_VERSION (jaeger $JAEGER_RELEASE) $GO_VERSION"
COLLECTOR_STAMP="$OCB_MODULE@$OCB_VERSION manifest-sha256:$manifest_sum $GO_VERSION"
PROMETHEUS_STAMP="$PROMETHEUS_MODULE@$PROMETHEUS_MODULE_VERSION (prometheus $PROMETHEUS_RELEASE) $GO_VERSION"
VICTORIALOGS_STAMP="$VICTORIALOGS_MODULE@$VICTORIALOGS_VERSION $GO_VERSION"

failed=()
total0=$(date +%s)

run_build jaeger "$JAEGER_STAMP" build_jaeger || failed+=(jaeger)
run_build otelcol-bridge "$COLLECTOR_STAMP" build_collector || failed+=(otelcol-bridge)
run_build prometheus "$PROMETHEUS_STAMP" build_prometheus || failed+=(prometheus)
run_build victoria-logs "$VICTORIALOGS_STAMP" build_victorialogs || failed+=(victoria-logs)

# Grafana Tempo is AGPL-3.0: remove what earlier versions of this script built.
tempo_left=("$BIN/tempo" "$BIN/tempo.version" "$BIN/tempo.tmp" "$BIN/tempo.build-error"
    "$LOGS/tempo-build.log" "$SRC"/tempo-* "$GOMODCACHE"/github.com/grafana/tempo@*
    "$GOMODCACHE/cache/download/github.com/grafana/tempo")
chmod -R u+w "${tempo_left[@]}" 2>/dev/null || true
rm -rf "${tempo_left[@]}" || log "could not remove all of an earlier Tempo build: ${tempo_left[*]}"

log "done in $(fmt_secs $(($(date +%s) - total0))); binaries in $BIN:"
ls -l "$BIN" | sed 's/^/    /' >&2
if ((${#failed[@]})); then
    log "FAILED: ${failed[*]} (build logs: $LOGS/<name>-build.log)"
    exit 1
fi
