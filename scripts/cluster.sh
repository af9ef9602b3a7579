#!/usr/bin/env bash
# Three local Kiln nodes and one worker:
#   gRPC 127.0.0.1:8981, :8982, :8983 (HTTP 9981-9983), data under ./.kiln-cluster.
#   The worker is the only one, so it prefetches a lease per slot, as `kiln dev`'s embedded
#   worker does: a freed slot starts its next action without a round of Raft proposals.
# Usage: scripts/cluster.sh up|down|status
#   up      builds (release) unless KILN_BIN is set, starts what is not running, and returns once
#           a leader is elected and all three nodes serve
#   down    stops the worker and the nodes (SIGTERM, then SIGKILL after 10 s)
#   status  `kiln cluster status` against node 1
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${KILN_CLUSTER_DIR:-$PWD/.kiln-cluster}
KILN_BIN=${KILN_BIN:-}
RF=${KILN_RF:-2}

bin() {
  if [ -z "$KILN_BIN" ]; then
    cargo build --release -p kiln-node >&2
    KILN_BIN=$PWD/target/release/kiln
  fi
  echo "$KILN_BIN"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

config() {
  local id=$1
  cat <<TOML
[node]
id = $id
listen = "127.0.0.1:898$id"
http = "127.0.0.1:998$id"
data_dir = "$ROOT/node$id"

[cluster]
replication_factor = $RF
peers = [
  { id = 1, address = "127.0.0.1:8981" },
  { id = 2, address = "127.0.0.1:8982" },
  { id = 3, address = "127.0.0.1:8983" },
]
TOML
}

up() {
  local k; k=$(bin)
  mkdir -p "$ROOT"
  for id in 1 2 3; do
    if running "$ROOT/node$id.pid"; then continue; fi
    config "$id" > "$ROOT/node$id.toml"
    nohup "$k" serve --config "$ROOT/node$id.toml" > "$ROOT/node$id.log" 2>&1 &
    echo $! > "$ROOT/node$id.pid"
  done
  if ! running "$ROOT/worker.pid"; then
    nohup "$k" worker --endpoint grpc://127.0.0.1:8981,grpc://127.0.0.1:8982,grpc://127.0.0.1:8983 \
      --work-dir "$ROOT/worker" --name cluster-worker --prefetch "$(nproc)" > "$ROOT/worker.log" 2>&1 &
    echo $! > "$ROOT/worker.pid"
  fi
  local deadline=$((SECONDS + 60)) out=""
  while (( SECONDS < deadline )); do
    if out=$("$k" cluster status --endpoint grpc://127.0.0.1:8981 2>/dev/null) \
       && ! grep -q "none (election)" <<<"$out" \
       && [ "$(grep -c SERVING <<<"$out")" -ge 3 ] && ! grep -q "NOT_SERVING\|UNREACHABLE" <<<"$out"; then
      echo "$out"
      echo "cluster up: three nodes on 127.0.0.1:8981-8983, worker attached; logs in $ROOT"
      return 0
    fi
    sleep 0.5
  done
  echo "cluster did not come up within 60 s; last status:" >&2
  echo "$out" >&2
  tail -n 20 "$ROOT"/node*.log >&2 || true
  return 1
}

down() {
  for f in "$ROOT/worker.pid" "$ROOT"/node*.pid; do
    [ -f "$f" ] || continue
    local pid; pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  echo "cluster down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) "$(bin)" cluster status --endpoint grpc://127.0.0.1:8981 ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
