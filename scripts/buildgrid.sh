#!/usr/bin/env bash
# BuildGrid as a benchmark peer on this machine: PostgreSQL (for BuildGrid's SQL scheduler),
# `bgd server start` with an in-memory CAS and Action Cache, and `kiln worker`s as its bots.
#
# usage: scripts/buildgrid.sh up [--dir DIR] [--port PORT] [--workers N] [--concurrency N] [--prefetch N]
#        scripts/buildgrid.sh down [--dir DIR]
#   up      creates DIR (default ./.buildgrid-bench), starts PostgreSQL (unix socket only, no
#           TCP), BuildGrid on 127.0.0.1:PORT (default: a free port) and N kiln workers (default
#           1; 0 for none) with N slots each (default: kiln's, the number of CPUs) on its Bots
#           service (each with --prefetch N, default 0: leases taken ahead while every slot is
#           busy, as `kiln dev`'s embedded worker does with one per slot); returns once every bot session is open and one trivial action has run
#           through BuildGrid. Prints BUILDGRID_INSTANCE=<name> and, last,
#           BUILDGRID_ENDPOINT=grpc://127.0.0.1:PORT. Logs: DIR/*.log; pids: DIR/*.pid.
#   down    stops the workers, BuildGrid and PostgreSQL, and removes DIR
#
# KILN_BIN=/path/to/kiln picks the worker binary (default: target/release/kiln, not built here:
# `cargo build --release -p kiln-node`). Needs `bgd` (PyPI buildgrid, installed with pip if
# missing, with psycopg2-binary, its PostgreSQL driver) and PostgreSQL's server binaries (Debian
# package postgresql, installed with apt-get if missing). Run as root: PostgreSQL refuses to run
# as root, so it runs as the `postgres` user.
#
# The BuildGrid configuration (DIR/buildgrid.yml) and why:
#   * one insecure channel on 127.0.0.1:PORT; instance "" (the default instance, as Kiln's)
#     with Execution, Operations, Bots (the three of `!execution`), CAS, ByteStream and
#     ActionCache; Capabilities comes with them;
#   * CAS: `!lru-storage` of 2 GiB in memory; Action Cache: `!lru-action-cache` on it;
#   * `!sql-scheduler` on the PostgreSQL, whose schema `bgd server start` does not create:
#     `bgd migrate apply` does, before the server starts;
#   * a `!static-property-set` with one label and no properties, and OSFamily, ISA and
#     container-image as wildcard keys: any Command (none or some of those platform
#     properties) goes to any bot. (A dynamic set always makes OSFamily and ISA match keys,
#     which a job's OSFamily=Linux would then require the bot to advertise.)
#   * one `!priority-age-assigner` polling every 0.1 s (+ up to 0.05 s jitter). The default,
#     1 s + up to 1 s, adds about 1.5 s to an action that arrives while the assigner sleeps,
#     which would measure the sleep, not BuildGrid;
#   * 128 gRPC threads: BuildGrid's server is thread-per-RPC (every Execute stream and every
#     bot's long-polling UpdateBotSession holds a thread while it waits), and the thread count
#     is also its limit of concurrent RPCs; with the default, 5 per CPU, most of the
#     benchmark's 32 concurrent Executes fail at once with RESOURCE_EXHAUSTED "Concurrent RPC
#     limit exceeded!". The SQL pool is sized to match (10 + 30 overflow);
#   * SO_REUSEPORT off (gRPC Python's default is on: a clash on PORT would go unnoticed);
#   * no authorization, no monitoring, no command allowlist, no pruning.
# PostgreSQL runs with its defaults (durable: fsync on), listening on the unix socket only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() {
  sed -n '/^# usage:/,/^#   down /p' "$0" | sed 's/^# \{0,1\}//'
}

die() { echo "buildgrid.sh: $*" >&2; exit 1; }
log() { echo "buildgrid.sh: $*" >&2; }

CMD=${1:-}
[ $# -gt 0 ] && shift
DIR=$ROOT/.buildgrid-bench
PORT=
WORKERS=1
CONCURRENCY=
PREFETCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=${2:?--dir needs a value}; shift ;;
    --port) PORT=${2:?--port needs a value}; shift ;;
    --workers) WORKERS=${2:?--workers needs a value}; shift ;;
    --concurrency) CONCURRENCY=${2:?--concurrency needs a value}; shift ;;
    --prefetch) PREFETCH=${2:?--prefetch needs a value}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "buildgrid.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$DIR" in /*) ;; *) DIR=$ROOT/$DIR ;; esac
[[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers must be a number, not '$WORKERS'"
[[ -z "$CONCURRENCY" || "$CONCURRENCY" =~ ^[1-9][0-9]*$ ]] || die "--concurrency must be a positive number"
[[ -z "$PORT" || "$PORT" =~ ^[1-9][0-9]*$ ]] || die "--port must be a number"
[[ "$PREFETCH" =~ ^[0-9]+$ ]] || die "--prefetch must be a number"

# gRPC honours http(s)_proxy; loopback must never go through a proxy.
export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
export NO_PROXY="$no_proxy"

INSTANCE=""   # BuildGrid accepts the empty (default) instance name
PG_PORT=5432  # only names the socket file (<pg root>/sock/.s.PGSQL.5432): no TCP listener
PG_DB=bgd

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop PIDFILE SIGNAL SECONDS: sends SIGNAL, waits up to SECONDS, then SIGKILL.
stop() {
  local f=$1 sig=$2 secs=$3 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$(basename "$f" .pid) (pid $pid) still running after ${secs}s; SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

down() {
  if [ ! -d "$DIR" ]; then
    log "$DIR does not exist; nothing to stop"
    return 0
  fi
  local f
  # Workers first, while BuildGrid can still take their BOT_TERMINATING; PostgreSQL last.
  for f in "$DIR"/worker-*.pid; do
    [ -e "$f" ] && stop "$f" TERM 15
  done
  stop "$DIR/bgd.pid" TERM 15
  stop "$DIR/postgres.pid" INT 30 # SIGINT: PostgreSQL's fast shutdown
  # The PostgreSQL cluster may live outside DIR (see pg_root); remove only what we made.
  if [ -f "$DIR/pg_root" ]; then
    local pg; pg=$(cat "$DIR/pg_root")
    case "$pg" in "$DIR"/* | "${TMPDIR:-/tmp}"/kiln-buildgrid-pg.*) rm -rf "$pg" ;; esac
  fi
  rm -rf "$DIR"
  log "down: stopped and removed $DIR"
}

log_tail() { # log_tail FILE...: the last lines of each, to stderr
  local f
  for f in "$@"; do
    [ -s "$f" ] || continue
    echo "----- last 40 lines of $f -----" >&2
    tail -n 40 "$f" >&2 || true
  done
}

# fail MESSAGE LOG...: says why up failed, with the logs' tails, and exits 1 (up_exit cleans up).
fail() {
  local msg=$1; shift
  echo "buildgrid.sh: up failed: $msg" >&2
  log_tail "$@"
  exit 1
}

# up's EXIT trap: on any failure (fail, or a command failing under set -e), stops what up
# started and keeps DIR for its logs.
up_exit() {
  local rc=$? f
  [ "$rc" -eq 0 ] && return 0
  set +e
  for f in "$DIR"/worker-*.pid; do [ -e "$f" ] && stop "$f" TERM 5; done
  stop "$DIR/bgd.pid" TERM 5
  stop "$DIR/postgres.pid" INT 15
  echo "buildgrid.sh: up failed (exit $rc); what it started is stopped, logs are in $DIR ('scripts/buildgrid.sh down --dir $DIR' removes it)" >&2
  exit "$rc"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# as_postgres CMD...: runs CMD as the postgres user, from / (root's cwd may be unreadable to
# it). Not for a background start: its $! would be a subshell's pid, not CMD's.
AS_POSTGRES=(setpriv --reuid=postgres --regid=postgres --init-groups --)
as_postgres() {
  (cd / && exec "${AS_POSTGRES[@]}" "$@")
}

psql_q() { # psql_q DB SQL: one value, as root through the socket (trust auth)
  "$PG_BIN/psql" -X -q -t -A -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d "$1" -c "$2"
}

pg_bin() { # the newest Debian PostgreSQL's bin directory, if any
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/postgres" ] && echo "$d"; done | sort -V | tail -n 1
}

ensure_tools() {
  if ! command -v bgd >/dev/null 2>&1; then
    log "bgd not found; installing buildgrid with pip"
    python3 -m pip install -q buildgrid >&2
    hash -r
    command -v bgd >/dev/null 2>&1 || die "bgd still not on PATH after 'pip install buildgrid'"
  fi
  # BuildGrid imports psycopg2 for PostgreSQL but does not depend on it (extra "database").
  if ! python3 -c 'import psycopg2' 2>/dev/null; then
    log "psycopg2 missing; installing psycopg2-binary with pip"
    python3 -m pip install -q psycopg2-binary >&2
  fi
  PG_BIN=$(pg_bin)
  if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/postgres" ]; then
    log "PostgreSQL server binaries not found; apt-get install postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >&2 || { apt-get update -q >&2 && apt-get install -y -q postgresql >&2; }
    PG_BIN=$(pg_bin)
    if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/postgres" ]; then
      die "no /usr/lib/postgresql/*/bin/postgres after apt-get install postgresql"
    fi
  fi
  id postgres >/dev/null 2>&1 || die "no 'postgres' user (the Debian postgresql package creates it)"
  command -v setpriv >/dev/null 2>&1 || die "setpriv (util-linux) is required"
  [ "$(id -u)" = 0 ] || die "run as root: PostgreSQL is started as the postgres user"
  if [ "$WORKERS" -gt 0 ]; then
    KILN=${KILN_BIN:-$ROOT/target/release/kiln}
    [ -x "$KILN" ] || die "$KILN missing: build it (cargo build --release -p kiln-node) or set KILN_BIN"
  fi
}

start_postgres() {
  # The cluster goes in DIR/postgres, which the postgres user must be able to reach; under a
  # directory it cannot traverse (e.g. a mktemp -d of root's, mode 0700) it goes in a
  # directory of its own under TMPDIR instead, named in DIR/pg_root for `down`.
  PG_ROOT=$DIR/postgres
  if ! as_postgres test -x "$DIR"; then
    PG_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/kiln-buildgrid-pg.XXXXXX")
    chmod 0755 "$PG_ROOT"
    log "the postgres user cannot reach $DIR; PostgreSQL's files go in $PG_ROOT"
  fi
  echo "$PG_ROOT" >"$DIR/pg_root"
  PG_DATA=$PG_ROOT/data
  PG_SOCK=$PG_ROOT/sock
  mkdir -p "$PG_DATA" "$PG_SOCK"
  chown -R postgres:postgres "$PG_ROOT"
  chmod 0700 "$PG_DATA"
  # Logs are opened by this (root) shell, so they can stay in DIR either way.
  as_postgres "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust --locale=C -E UTF8 --no-sync \
    >"$DIR/postgres-initdb.log" 2>&1 || fail "initdb failed" "$DIR/postgres-initdb.log"
  # setpriv execs postgres, so $! is the postmaster's pid.
  (cd / && exec "${AS_POSTGRES[@]}" "$PG_BIN/postgres" -D "$PG_DATA" -p "$PG_PORT" \
    -c listen_addresses= -c unix_socket_directories="$PG_SOCK" -c max_connections=200) \
    </dev/null >"$DIR/postgres.log" 2>&1 &
  echo $! >"$DIR/postgres.pid"
  local deadline=$((SECONDS + 60))
  until "$PG_BIN/pg_isready" -q -h "$PG_SOCK" -p "$PG_PORT"; do
    running "$DIR/postgres.pid" || fail "PostgreSQL exited during start-up" "$DIR/postgres.log"
    ((SECONDS < deadline)) || fail "PostgreSQL did not accept connections within 60 s" "$DIR/postgres.log"
    sleep 0.2
  done
  # The postmaster's own word on its pid, in case the one above is not it.
  head -n 1 "$PG_DATA/postmaster.pid" >"$DIR/postgres.pid"
  psql_q postgres "CREATE DATABASE $PG_DB" >/dev/null 2>>"$DIR/postgres.log" ||
    fail "CREATE DATABASE $PG_DB failed" "$DIR/postgres.log"
  # SQLAlchemy URL: psycopg2 named (SQLAlchemy 2.1 defaults to psycopg 3, which BuildGrid
  # 0.4.4 does not use), through the unix socket (host= a directory).
  PG_URL="postgresql+psycopg2://postgres@/$PG_DB?host=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$PG_SOCK")&port=$PG_PORT"
  # `bgd server start` does not create its tables (only a throw-away SQLite one would).
  bgd migrate apply "$PG_URL" >"$DIR/bgd-migrate.log" 2>&1 || fail "bgd migrate apply failed" "$DIR/bgd-migrate.log"
  log "PostgreSQL (pid $(cat "$DIR/postgres.pid")) on $PG_SOCK, database $PG_DB migrated"
}

write_config() {
  cat >"$DIR/buildgrid.yml" <<YAML
# Written by scripts/buildgrid.sh: BuildGrid as Kiln's benchmark peer.
description: BuildGrid benchmark peer (in-memory CAS and Action Cache, SQL scheduler)

server:
  - !channel
    address: "127.0.0.1:$PORT"
    insecure-mode: true

# gRPC Python sets SO_REUSEPORT by default: a second server on the port would silently share it.
grpc-server-options:
  grpc.so_reuseport: 0

authorization:
  method: none

monitoring:
  enabled: false

thread-pool-size: 128

connections:
  - !sql-connection &sql
    connection-string: "$PG_URL"
    pool-size: 10
    max-overflow: 30
    pool-timeout: 30

storages:
  - !lru-storage &cas
    size: 2048M

caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 1000000
    allow-updates: true
    cache-failed-actions: true

schedulers:
  - !sql-scheduler &scheduler
    sql: *sql
    storage: *cas
    action-cache: *ac
    property-set: !static-property-set
      property-labels:
        - label: any
          properties: []
      wildcard-property-keys: [OSFamily, ISA, container-image]
    assigners:
      - !priority-age-assigner
        count: 1
        interval: 0.1
        jitter-factor: 0.05

instances:
  - name: "$INSTANCE"
    description: the default instance
    services:
      - !execution
        scheduler: *scheduler
        endpoints: [execution, operations, bots]
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
      - !action-cache
        cache: *ac
YAML
}

start_bgd() {
  if ! bgd server lint "$DIR/buildgrid.yml" >"$DIR/bgd-lint.log" 2>&1 || grep -q ERROR "$DIR/bgd-lint.log"; then
    fail "BuildGrid rejects its configuration $DIR/buildgrid.yml" "$DIR/bgd-lint.log"
  fi
  (cd "$DIR" && exec bgd server start "$DIR/buildgrid.yml") </dev/null >"$DIR/bgd.log" 2>&1 &
  echo $! >"$DIR/bgd.pid"
  local deadline=$((SECONDS + 60))
  until port_open "$PORT"; do
    running "$DIR/bgd.pid" || fail "bgd server exited during start-up" "$DIR/bgd.log"
    ((SECONDS < deadline)) || fail "BuildGrid did not accept connections on 127.0.0.1:$PORT within 60 s" "$DIR/bgd.log"
    sleep 0.2
  done
  log "BuildGrid (pid $(cat "$DIR/bgd.pid")) listening on 127.0.0.1:$PORT"
}

start_workers() {
  local i args
  # Kiln's default is the number of CPUs too; given explicitly, the sessions can be counted.
  CONCURRENCY=${CONCURRENCY:-$(nproc)}
  for ((i = 1; i <= WORKERS; i++)); do
    args=(worker --endpoint "grpc://127.0.0.1:$PORT" --work-dir "$DIR/worker-$i" --name "bgpeer-$i"
      --instance-name "$INSTANCE" --concurrency "$CONCURRENCY" --prefetch "$PREFETCH")
    RUST_LOG=${RUST_LOG:-info} "$KILN" "${args[@]}" </dev/null >"$DIR/worker-$i.log" 2>&1 &
    echo $! >"$DIR/worker-$i.pid"
  done
  # Every slot opens its own bot session; BuildGrid keeps them in its `bots` table.
  local want=$((WORKERS * (CONCURRENCY + PREFETCH))) have=0 deadline=$((SECONDS + 60))
  while :; do
    for ((i = 1; i <= WORKERS; i++)); do
      running "$DIR/worker-$i.pid" || fail "kiln worker $i exited" "$DIR/worker-$i.log" "$DIR/bgd.log"
    done
    have=$(psql_q "$PG_DB" "SELECT count(*) FROM bots" 2>/dev/null || echo 0)
    [ "$have" -ge "$want" ] && break
    ((SECONDS < deadline)) ||
      fail "$have of $want bot sessions open after 60 s" "$DIR"/worker-*.log "$DIR/bgd.log"
    sleep 0.2
  done
  log "$WORKERS kiln worker(s), $have bot sessions open"
}

# One trivial action through BuildGrid and a kiln worker, its output file downloaded: proves
# the whole path (Execute, scheduler, Bots lease, worker CAS reads and writes) before a
# benchmark relies on it. bgd exits 0 on most errors, hence the checks of its output.
smoke() {
  local s=$DIR/smoke t0 out rc=0
  rm -rf "$s"
  mkdir -p "$s/in"
  echo "buildgrid.sh smoke input" >"$s/in/input.txt"
  t0=$(date +%s%N)
  timeout 60 bgd execute --remote "grpc://127.0.0.1:$PORT" command --output-file out.txt \
    --output-directory "$s/out" -- "$s/in" /bin/sh -c 'cat input.txt > out.txt' >"$s.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ] || grep -q '^Error' "$s.log" || ! cmp -s "$s/in/input.txt" "$s/out/out.txt"; then
    # Where the job got to (stage 2 queued, 3 executing, 4 completed; worker_name = bot id).
    psql_q "$PG_DB" "SELECT 'job ' || name || ': stage ' || stage || ', bot ' || coalesce(worker_name, '-')
      || ', assigned ' || assigned FROM jobs" >"$DIR/smoke-jobs.log" 2>&1 || true
    fail "a trivial action did not run through BuildGrid (bgd exit $rc$([ "$rc" = 124 ] && echo ': timed out after 60 s'))" \
      "$s.log" "$DIR/smoke-jobs.log" "$DIR"/worker-*.log "$DIR/bgd.log"
  fi
  out=$(( ($(date +%s%N) - t0) / 1000000 ))
  rm -rf "$s" "$s.log"
  log "trivial action ran through BuildGrid and a kiln worker in ${out} ms (bgd CLI start-up included)"
}

up() {
  ensure_tools
  [ -n "$PORT" ] || PORT=$(free_port)
  port_open "$PORT" && die "port 127.0.0.1:$PORT is in use"
  if [ -d "$DIR" ]; then
    local f
    for f in "$DIR"/*.pid; do
      running "$f" && die "$DIR is in use ($(basename "$f" .pid) is running): 'scripts/buildgrid.sh down --dir $DIR' first"
    done
    rm -rf "$DIR"
  fi
  mkdir -p "$DIR"
  trap up_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  start_postgres
  write_config
  start_bgd
  if [ "$WORKERS" -gt 0 ]; then
    start_workers
    smoke
  fi
  log "up: BuildGrid $(python3 -m pip show buildgrid 2>/dev/null | sed -n 's/^Version: //p') on 127.0.0.1:$PORT, instance '${INSTANCE}', logs in $DIR"
  echo "BUILDGRID_INSTANCE=$INSTANCE"
  echo "BUILDGRID_ENDPOINT=grpc://127.0.0.1:$PORT"
}

case "$CMD" in
  up) up ;;
  down) down ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
