#!/usr/bin/env bash
# Installs what the tests need when it is missing, then runs every test: unit and in-process
# tests (cargo nextest), then the end-to-end scripts with real clients (Bazel, BuildGrid's bgd).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null; then
  echo "cargo is required (rustup.rs)" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# A clean clone gains nothing from incremental caches; they would double the target dir.
if [ "${CI:-}" = "true" ]; then
  export CARGO_INCREMENTAL=0
fi

log "build (debug, all targets)"
cargo build --workspace --all-targets

log "unit and integration tests"
cargo nextest run --workspace --no-fail-fast

export KILN_BIN="$PWD/target/debug/kiln"
for e2e in scripts/bazel-e2e.sh scripts/bgd-e2e.sh; do
  if [ -x "$e2e" ]; then
    case "$e2e" in
      *bazel-e2e.sh)
        log "$e2e cache"; "$e2e" cache
        log "$e2e exec"; "$e2e" exec
        log "$e2e cluster"; "$e2e" cluster
        log "$e2e bes"; "$e2e" bes ;;
      *bgd-e2e.sh)
        log "$e2e"; "$e2e"
        log "$e2e --worker-on-buildgrid"; "$e2e" --worker-on-buildgrid ;;
      *) log "$e2e"; "$e2e" ;;
    esac
  fi
done
log "all tests passed"
