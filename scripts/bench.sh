#!/usr/bin/env bash
# Kiln's benchmark: builds release binaries, starts a fresh single node on free loopback ports
# with its data in a temporary directory, measures the machine's own limits (one core's
# SHA-256, one loopback TCP stream, disk write + fsync in that same directory, /bin/true
# spawns), runs
# `kiln-load suite` against the node, and prints every figure with its ratio to those limits
# plus the checks of the benchmark issue. The full report goes to bench/results/<UTC time>.json.
# Before the suite, `kiln-load memory` reads the fresh node's idle resident set and how far a
# 1 GiB upload raises it (<UTC time>-memory.json).
#
# usage: scripts/bench.sh [--quick] [--cluster | --vs-buildgrid] [--bazel] [--fill-page-cache]
#   --quick           ~1 s per workload instead of ~5 s (a smoke run; results get a -quick suffix)
#   --cluster         also the same suite against a three-node cluster (scripts/cluster.sh: nodes
#                     on 127.0.0.1:8981-8983, RF=2, one worker), through node 1, printed beside
#                     the single node's figures of the same run (results: <time>-cluster.json)
#   --vs-buildgrid    the same suite against BuildGrid (PyPI `buildgrid`, in-memory CAS and Action
#                     Cache, its SQL scheduler on a local PostgreSQL, one `kiln worker` on its Bots
#                     service set up as Kiln's embedded worker: slots and prefetch; scripts/buildgrid.sh),
#                     interleaved workload by workload, then the Bazel build benchmark against both
#                     (results: <time>.json for Kiln, <time>-buildgrid.json, <time>-vs-buildgrid.json
#                     with the ratios, <time>-bazel.json)
#   --bazel           also the Bazel build benchmark (scripts/bench-bazel.sh: a clean remote-execution
#                     build of a few hundred actions and a fully cached rebuild, medians of 3)
#   --fill-page-cache first fills the page cache with a file in the run's temporary directory
#                     (all available memory but 3 GiB, at most the free disk space but 8 GiB), kept
#                     until the end: the memory state of a node that has run for a while, whose
#                     new writes reuse pages the kernel reclaims. On a VM that hands free memory
#                     back to its host (free page reporting, proactive reclaim), a fresh machine's
#                     writes land in pages the host must fault in first, several times slower
#                     (the `writes alone` limit measures that state). Recorded as page_cache_fill_mib.
#
# CARGO_TARGET_DIR is honoured (default: target/ in the repository). KILN_BIN=/path/to/kiln
# benchmarks that binary instead of building this tree's (e.g. another revision's build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() {
  sed -n '/^# usage:/,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
}

QUICK=0
MODE=single
BAZEL=0
FILL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --cluster) MODE=cluster ;;
    --vs-buildgrid) MODE=vs-buildgrid; BAZEL=1 ;;
    --bazel) BAZEL=1 ;;
    --fill-page-cache) FILL=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

for tool in cargo python3; do
  command -v "$tool" >/dev/null || { echo "bench.sh: $tool is required" >&2; exit 1; }
done

log() { printf '\n== %s\n' "$*" >&2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/kiln-bench.XXXXXX")
KILN_PID=
CLUSTER_UP=
BUILDGRID_UP=
cleanup() {
  if [ -n "$BUILDGRID_UP" ]; then
    KILN_BIN=$KILN scripts/buildgrid.sh down --dir "$TMP/buildgrid" >/dev/null 2>&1 || true
  fi
  if [ -n "$KILN_PID" ] && kill -0 "$KILN_PID" 2>/dev/null; then
    kill "$KILN_PID" 2>/dev/null || true
    wait "$KILN_PID" 2>/dev/null || true
  fi
  if [ -n "$CLUSTER_UP" ]; then
    KILN_CLUSTER_DIR=$TMP/cluster KILN_BIN=$KILN scripts/cluster.sh down >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT


# The tree as it is built. Someone may commit or edit while this script runs, so the commit,
# the uncommitted difference (saved next to the results when there is one) and its digest are
# taken before the build and checked again after it. bench/ itself is left out.
tree_diff() { git diff HEAD -- . ':(exclude)bench' 2>/dev/null; }
REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
DIRTY_PATHS=$(git status --porcelain -- . ':(exclude)bench' 2>/dev/null | awk '{print $2}' | paste -sd, - | cut -c1-400)
DIRTY=$([ -n "$DIRTY_PATHS" ] && echo yes || echo no)
tree_diff >"$TMP/tree.diff"
DIFF_SHA=$(sha256sum <"$TMP/tree.diff" | cut -c1-16)

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export CARGO_TARGET_DIR=$TARGET
if [ -n "${KILN_BIN:-}" ]; then
  log "build (release): kiln-load; kiln is $KILN_BIN"
  nice cargo build --release -p chaos-tests
  KILN=$KILN_BIN
else
  log "build (release): kiln, kiln-load"
  nice cargo build --release -p kiln-node -p chaos-tests
  KILN=$TARGET/release/kiln
fi
LOAD=$TARGET/release/kiln-load

TREE_CHANGED=no
if [ "$(git rev-parse HEAD 2>/dev/null || echo unknown)" != "$COMMIT" ] ||
  [ "$(tree_diff | sha256sum | cut -c1-16)" != "$DIFF_SHA" ]; then
  TREE_CHANGED=yes
  echo "bench.sh: warning: the tree changed during the build; the binary may not match git_rev + the saved diff" >&2
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
PORT=$(free_port)
HPORT=$(free_port)
while [ "$HPORT" = "$PORT" ]; do HPORT=$(free_port); done

FILL_MIB=0
if [ "$FILL" = 1 ]; then
  avail_mib=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
  disk_mib=$(df -Pm "$TMP" | awk 'NR == 2 {print $4}')
  FILL_MIB=$((avail_mib - 3072))
  [ $((disk_mib - 8192)) -lt "$FILL_MIB" ] && FILL_MIB=$((disk_mib - 8192))
  if [ "$FILL_MIB" -gt 0 ]; then
    log "fill the page cache: $FILL_MIB MiB in $TMP/page-cache-fill"
    dd if=/dev/zero of="$TMP/page-cache-fill" bs=1M count="$FILL_MIB" status=none
    sync
  else
    FILL_MIB=0
    echo "bench.sh: no memory or disk to spare for --fill-page-cache; running without" >&2
  fi
fi

log "start kiln dev on 127.0.0.1:$PORT (data in $TMP/data)"
RUST_LOG=${RUST_LOG:-warn} "$KILN" dev --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HPORT" --data "$TMP/data" \
  >"$TMP/kiln.log" 2>&1 &
KILN_PID=$!
for _ in $(seq 1 300); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    break
  fi
  if ! kill -0 "$KILN_PID" 2>/dev/null; then
    echo "bench.sh: kiln exited during start-up:" >&2
    cat "$TMP/kiln.log" >&2
    exit 1
  fi
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || { echo "bench.sh: kiln did not open port $PORT" >&2; exit 1; }

# Machine limits, measured now, on this machine, next to the idle node.
log "machine limits"
if [ "$QUICK" = 1 ]; then
  "$LOAD" sha256-rate --bytes $((64 << 20)) --json "$TMP/limits-sha256.json"
  "$LOAD" tcp-rate --bytes $((256 << 20)) --json "$TMP/limits-tcp.json"
  "$LOAD" file-send-rate --dir "$TMP" --passes 2 --json "$TMP/limits-filesend.json"
  "$LOAD" disk-rate --dir "$TMP" --bytes $((256 << 20)) --fsyncs 50 --json "$TMP/limits-disk.json"
  "$LOAD" spawn-rate --count 200 --json "$TMP/limits-spawn.json"
else
  "$LOAD" sha256-rate --json "$TMP/limits-sha256.json"
  "$LOAD" tcp-rate --json "$TMP/limits-tcp.json"
  "$LOAD" file-send-rate --dir "$TMP" --json "$TMP/limits-filesend.json"
  "$LOAD" disk-rate --dir "$TMP" --json "$TMP/limits-disk.json"
  "$LOAD" spawn-rate --json "$TMP/limits-spawn.json"
fi

STAMP=$(date -u +%Y-%m-%dT%H-%M-%SZ)
SUFFIX=
SUITE_FLAGS=()
if [ "$QUICK" = 1 ]; then
  SUFFIX=-quick
  SUITE_FLAGS+=(--quick)
fi
mkdir -p bench/results
RESULT=bench/results/$STAMP$SUFFIX.json

# suite ENDPOINT INSTANCE JSON [ARGS...]: the load suite against one server.
suite() {
  local endpoint=$1 instance=$2 json=$3
  shift 3
  "$LOAD" suite --endpoint "$endpoint" --instance "$instance" "${SUITE_FLAGS[@]}" \
    --limits "$TMP/limits-sha256.json" --limits "$TMP/limits-tcp.json" --limits "$TMP/limits-disk.json" \
    --limits "$TMP/limits-spawn.json" --limits "$TMP/limits-filesend.json" --meta "page_cache_fill_mib=$FILL_MIB" \
    --meta "git_rev=$REV" --meta "git_commit=$COMMIT" --meta "git_dirty=$DIRTY" \
    --meta "git_dirty_paths=$DIRTY_PATHS" --meta "git_diff_sha256=$DIFF_SHA" \
    --meta "tree_changed_during_build=$TREE_CHANGED" --meta "mode=$MODE" \
    --meta "kiln_bin=${KILN_BIN:-this tree}" --meta "kiln_version=$("$KILN" --version 2>/dev/null || echo unknown)" \
    --meta "kernel=$(uname -sr)" --meta "cpus=$(nproc)" --meta "started_utc=$STAMP" \
    --json "$json" "$@"
}

status=0
# Memory first, on the fresh node: its idle resident set, and what one 1 GiB streamed upload
# adds to its peak (targets: under 100 MiB idle, under 64 MiB added).
log "memory: idle RSS and a 1 GiB upload"
"$LOAD" memory --endpoint "grpc://127.0.0.1:$PORT" --pid "$KILN_PID" --json "bench/results/$STAMP$SUFFIX-memory.json" || status=$?

if [ "$MODE" = vs-buildgrid ]; then
  # The peer's worker is set up as Kiln's embedded worker: one slot per core, one lease
  # prefetched per slot.
  log "start BuildGrid (data and logs in $TMP/buildgrid)"
  BUILDGRID_UP=1
  KILN_BIN=$KILN scripts/buildgrid.sh up --dir "$TMP/buildgrid" --workers 1 --concurrency "$(nproc)" \
    --prefetch "$(nproc)" >"$TMP/buildgrid-up.out"
  BG_ENDPOINT=$(sed -n 's/^BUILDGRID_ENDPOINT=//p' "$TMP/buildgrid-up.out" | tail -n 1)
  BG_INSTANCE=$(sed -n 's/^BUILDGRID_INSTANCE=//p' "$TMP/buildgrid-up.out" | tail -n 1)
  [ -n "$BG_ENDPOINT" ] || { echo "bench.sh: scripts/buildgrid.sh up printed no BUILDGRID_ENDPOINT" >&2; exit 1; }
  BG_VERSION=$(python3 -m pip show buildgrid 2>/dev/null | sed -n 's/^Version: //p')
  PEER_RESULT=bench/results/$STAMP$SUFFIX-buildgrid.json
  # Interleaved workload by workload, so a slow spell of the shared machine hits both.
  parts_kiln=() parts_peer=()
  for g in bytestream-write bytestream-read batch-update batch-read find-missing action-cache execute-trivial; do
    log "$g: Kiln (grpc://127.0.0.1:$PORT)"
    suite "grpc://127.0.0.1:$PORT" "" "$TMP/kiln-$g.json" --only "$g" || status=$?
    parts_kiln+=("$TMP/kiln-$g.json")
    log "$g: BuildGrid $BG_VERSION ($BG_ENDPOINT${BG_INSTANCE:+, instance $BG_INSTANCE})"
    suite "$BG_ENDPOINT" "$BG_INSTANCE" "$TMP/peer-$g.json" --only "$g" --meta "peer=buildgrid $BG_VERSION" || status=$?
    parts_peer+=("$TMP/peer-$g.json")
  done
  present() { local f; for f in "$@"; do [ -f "$f" ] && echo "$f"; done; }
  mapfile -t parts_kiln < <(present "${parts_kiln[@]}")
  mapfile -t parts_peer < <(present "${parts_peer[@]}")
  log "Kiln, all workloads"
  [ ${#parts_kiln[@]} -gt 0 ] && "$LOAD" merge --json "$RESULT" "${parts_kiln[@]}"
  log "BuildGrid, all workloads"
  [ ${#parts_peer[@]} -gt 0 ] && "$LOAD" merge --json "$PEER_RESULT" "${parts_peer[@]}"
  if [ -f "$RESULT" ] && [ -f "$PEER_RESULT" ]; then
    python3 scripts/bench_report.py compare kiln="$RESULT" buildgrid="$PEER_RESULT" \
      --json "bench/results/$STAMP$SUFFIX-vs-buildgrid.json"
  fi
else
  log "suite against grpc://127.0.0.1:$PORT"
  suite "grpc://127.0.0.1:$PORT" "" "$RESULT" || status=$?
fi

if [ "$BAZEL" = 1 ] && [ "$status" = 0 ]; then
  BAZEL_TARGETS=("kiln=grpc://127.0.0.1:$PORT")
  [ "$MODE" = vs-buildgrid ] && BAZEL_TARGETS+=("buildgrid=$BG_ENDPOINT${BG_INSTANCE:+,$BG_INSTANCE}")
  BAZEL_FLAGS=()
  [ "$QUICK" = 1 ] && BAZEL_FLAGS+=(--scale 2 --rounds 1)
  log "Bazel build benchmark: ${BAZEL_TARGETS[*]}"
  scripts/bench-bazel.sh "${BAZEL_FLAGS[@]}" --json "bench/results/$STAMP$SUFFIX-bazel.json" "${BAZEL_TARGETS[@]}" || status=$?
fi

if ! kill -0 "$KILN_PID" 2>/dev/null; then
  echo "bench.sh: kiln died during the run; its log:" >&2
  tail -50 "$TMP/kiln.log" >&2
  status=1
elif grep -qiE 'panick|ERROR' "$TMP/kiln.log"; then
  echo "bench.sh: kiln logged errors during the run:" >&2
  grep -iE 'panick|ERROR' "$TMP/kiln.log" | head -20 >&2
fi

if [ "$MODE" = cluster ] && [ "$status" = 0 ]; then
  # The single node goes first, so the cluster has the machine to itself.
  kill "$KILN_PID" 2>/dev/null || true
  wait "$KILN_PID" 2>/dev/null || true
  KILN_PID=
  for p in 8981 8982 8983 9981 9982 9983; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "bench.sh: port $p is in use; --cluster needs 8981-8983 and 9981-9983 (scripts/cluster.sh down?)" >&2
      exit 1
    fi
  done
  log "start the three-node cluster (data in $TMP/cluster)"
  CLUSTER_UP=1
  KILN_CLUSTER_DIR=$TMP/cluster KILN_BIN=$KILN RUST_LOG=${RUST_LOG:-warn} scripts/cluster.sh up >&2
  CRESULT=bench/results/$STAMP$SUFFIX-cluster.json
  log "suite against the cluster, through node 1 (grpc://127.0.0.1:8981)"
  "$LOAD" suite --endpoint "grpc://127.0.0.1:8981" "${SUITE_FLAGS[@]}" \
    --limits "$TMP/limits-sha256.json" --limits "$TMP/limits-tcp.json" --limits "$TMP/limits-disk.json" \
    --limits "$TMP/limits-spawn.json" --limits "$TMP/limits-filesend.json" --meta "page_cache_fill_mib=$FILL_MIB" \
    --meta "git_rev=$REV" --meta "git_commit=$COMMIT" --meta "git_dirty=$DIRTY" \
    --meta "mode=cluster" --meta "nodes=3" --meta "replication_factor=2" \
    --meta "kiln_version=$("$KILN" --version 2>/dev/null || echo unknown)" \
    --meta "kernel=$(uname -sr)" --meta "cpus=$(nproc)" --meta "started_utc=$STAMP" \
    --json "$CRESULT" || status=$?
  if grep -qiE 'panick' "$TMP"/cluster/node*.log 2>/dev/null; then
    echo "bench.sh: a cluster node panicked:" >&2
    grep -iE 'panick' "$TMP"/cluster/node*.log | head -10 >&2
    status=1
  fi
  if [ -f "$CRESULT" ]; then
    python3 - "$RESULT" "$CRESULT" <<'EOF'
import json, sys
single, cluster = (json.load(open(p)) for p in sys.argv[1:3])
def key(w): return (w["name"], w["concurrency"])
s = {key(w): w for w in single["workloads"]}
def figure(w):
    return (w["mb_per_sec"], "MB/s") if w.get("bytes") and w["name"].startswith("bytestream") else (w["items_per_sec"], w["item_unit"] + "/s")
print()
print("single node vs three-node cluster (RF=2, through node 1), same run")
print(f'{"workload":<34} {"conc":>4} {"single":>16} {"cluster":>16} {"ratio":>6}  {"p99 single/cluster ms":>22}')
for w in cluster["workloads"]:
    a = s.get(key(w))
    if not a or "latency" not in a or "latency" not in w:
        print(f'{w["name"]:<34} {w["concurrency"]:>4}  failed or missing on one side: see the tables above')
        continue
    (fa, unit), (fc, _) = figure(a), figure(w)
    ratio = fc / fa if fa else float("nan")
    print(f'{w["name"]:<34} {w["concurrency"]:>4} {fa:>10.1f} {unit:<5} {fc:>10.1f} {unit:<5} {ratio:>6.2f}  {a["latency"]["p99_ms"]:>10.1f} / {w["latency"]["p99_ms"]:<9.1f}')
checks = []
def find(ws, name, conc):
    return next((w for w in ws if w["name"] == name and w["concurrency"] == conc), None)
wc, ws1 = find(cluster["workloads"], "bytestream-write-64MiB", 1), find(single["workloads"], "bytestream-write-64MiB", 1)
if wc and ws1 and wc.get("mb_per_sec") and ws1.get("mb_per_sec"):
    r = wc["mb_per_sec"] / ws1["mb_per_sec"]
    checks.append((f"ByteStream write 64 MiB through node 1 >= 0.5x single node: {r:.2f}x", r >= 0.5))
fm = find(cluster["workloads"], "find-missing-10k", 1)
if fm and "latency" in fm:
    checks.append((f'FindMissingBlobs 10,000 digests p99 < 30 ms on the cluster: {fm["latency"]["p99_ms"]:.1f} ms', fm["latency"]["p99_ms"] < 30))
print()
for text, ok in checks:
    print(("PASS " if ok else "MISS ") + text)
EOF
  fi
fi

if [ -f "$RESULT" ]; then
  echo
  echo "results: $RESULT"
  [ -n "${CRESULT:-}" ] && [ -f "$CRESULT" ] && echo "cluster results: $CRESULT"
  [ -n "${PEER_RESULT:-}" ] && [ -f "$PEER_RESULT" ] && echo "BuildGrid results: $PEER_RESULT"
  [ -f "bench/results/$STAMP$SUFFIX-bazel.json" ] && echo "Bazel build results: bench/results/$STAMP$SUFFIX-bazel.json"
  [ -f "bench/results/$STAMP$SUFFIX-memory.json" ] && echo "memory results: bench/results/$STAMP$SUFFIX-memory.json"
  if [ "$DIRTY" = yes ] && [ -z "${KILN_BIN:-}" ]; then
    cp "$TMP/tree.diff" "${RESULT%.json}.diff"
    echo "uncommitted changes measured (on top of $REV): ${RESULT%.json}.diff"
  fi
fi
exit "$status"
