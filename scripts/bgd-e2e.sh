#!/usr/bin/env bash
# Cross-check Kiln's CAS with an independent client: BuildGrid's `bgd` CLI
# (PyPI package `buildgrid`, needs Python >= 3.11).
#
# Starts `kiln dev` on free loopback ports with a throw-away data directory,
# then round-trips files and a directory tree through it with
# `bgd cas upload-file|download-file|upload-dir|download-dir` and checks that
# what comes back is byte-identical.
#
# Usage: scripts/bgd-e2e.sh [--worker-on-buildgrid]
#
#   --worker-on-buildgrid  the server is BuildGrid itself (scripts/buildgrid.sh: in-memory CAS,
#                     PostgreSQL scheduler) with a `kiln worker` as its only bot: the same
#                     round-trips and execution checks then prove that Kiln's worker speaks
#                     standard Remote Workers API (BuildGrid's lease and result conventions).
#                     Checks of the server rather than the worker are skipped: the non-default
#                     instance (BuildGrid serves one instance here) and `bgd operation list`.
#
# Environment:
#   KILN_BIN          kiln binary (default: target/debug/kiln under the repo
#                     root; built with `cargo build -p kiln-node` if missing)
#   BGD_E2E_INSTANCE  non-default instance name used for two round-trips
#                     (default: kiln-e2e-alt)
#   BGD_E2E_REMOTE    if set (e.g. grpc://127.0.0.1:50051), do not start kiln;
#                     run the checks against that server instead (handy for
#                     checking the script itself against `bgd server start`)
#   BGD_E2E_KEEP=1    keep the temporary directory (path printed at exit)
#
# How bgd (buildgrid 0.4.4) behaves, as read from its source
# (buildgrid/server/app/commands/cmd_cas.py, buildgrid/server/client/cas.py):
#   * `--remote`/`--instance-name` are options of the `cas` group, so they go
#     BEFORE the subcommand: `bgd cas --remote grpc://H:P --instance-name X
#     upload-file F`. Schemes grpc:// and http:// are plaintext.
#   * It calls Capabilities.GetCapabilities once per channel to learn
#     max_batch_total_size_bytes; if that call fails it silently assumes
#     4 MiB - 1 KiB. Blobs bigger than 1/4 of that limit (~1 MiB) go through
#     ByteStream Write/Read (4 MiB - 1 KiB chunks, resource names
#     `[inst/]uploads/<uuid>/blobs/<hash>/<size>` and `[inst/]blobs/<hash>/<size>`);
#     smaller ones through BatchUpdateBlobs/BatchReadBlobs. download-dir calls
#     GetTree first (UNIMPLEMENTED -> falls back to reading Directory blobs).
#   * upload-file prints `Success: Pushed path=[P] with digest=[HASH/SIZE]`;
#     the digest is computed locally, so a per-blob error status inside a
#     BatchUpdateBlobs response is NOT reported - only the download proves
#     the upload. upload-dir prints one such line per file/dir node, the root
#     directory last (path = the directory argument).
#   * Exit codes are unreliable: several failures (output path exists, a file
#     missing from a batch read, failed verify) print `Error: ...` to stderr
#     and still exit 0. So every call here also fails on any `Error` line and
#     every download is compared with the original.
#   * Reading bgd's `Error: ...` lines: its retrier turns most gRPC codes into
#     exceptions that print only the status details, not the code:
#     INVALID_ARGUMENT, CANCELLED, DEADLINE_EXCEEDED, PERMISSION_DENIED,
#     RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNIMPLEMENTED -> details only;
#     NOT_FOUND -> "Requested data does not exist on remote" (or "Blob not
#     found in CAS"); UNAVAILABLE/ABORTED -> details (no retries by default);
#     other codes (INTERNAL, UNKNOWN, ...) -> the full grpc error incl. the
#     code. An empty message after the colon is a failed Python assert, e.g.
#     WriteResponse.committed_size != blob size, BatchRead/UpdateBlobs
#     responses naming a digest that was not requested, a ByteStream Read
#     returning the wrong number of bytes, or GetTree not returning the root.
#     INVALID_ARGUMENT from BatchUpdateBlobs/BatchReadBlobs is swallowed and
#     bgd silently falls back to ByteStream Write/Read.
#   * The executable bit IS preserved: upload-dir sets FileNode.is_executable
#     from os.access(X_OK), download chmods such files to 0755 (others get the
#     umask default). Symlinks are stored as SymlinkNodes and recreated.

#
# Then it executes commands through Kiln (REAPI Execution, run by `kiln dev`'s
# embedded worker) with `bgd execute command`, and looks the operations up
# with `bgd operation status|list` (google.longrunning Operations). How bgd
# 0.4.4 behaves (buildgrid/server/app/commands/cmd_execute.py, cmd_operation.py):
#   * `bgd execute --remote R command [--output-file P]... [--output-directory
#     D] [-c] INPUT_ROOT ARGV...` uploads INPUT_ROOT (upload-dir) as the input
#     root and a Command with just `arguments` = ARGV and `output_paths` = the
#     --output-file values (REAPI v2.1 field; no environment variables, no
#     working directory, no platform), then Execute. Without -c the Action has
#     do_not_cache and the request skip_cache_lookup; with -c neither.
#   * ARGV's options must follow `--`, or click takes them as bgd's (a `-c`
#     in `/bin/sh -c SCRIPT` silently becomes --enable-action-cache).
#   * It prints every streamed Operation in protobuf text format with its Any
#     fields packed (type_url + escaped bytes: exit code, stdout/stderr
#     digests and cached_result are not readable there, so exec_decode
#     unpacks them with buildgrid's protos), then `Response status code: ` +
#     the google.rpc.Status (empty when OK), then downloads each output file
#     to D/PATH (D defaults to ./testing, relative to the cwd). It exits 0
#     whatever the action's exit code; stdout/stderr are not downloaded.
#   * `bgd operation --remote R status NAME` prints `Success: NAME: Completed
#     succesfully (stage=4, exit_code=0)` (sic), or `... Completed with failure
#     (stage=4, exit_code=N)`, or `Failure: NAME: MSG (code=C)` for a non-OK
#     status; `list` sends ListOperations with an empty filter and prints one
#     such status line per operation (`Error: No operations to list.` if none).
set -euo pipefail

ON_BUILDGRID=0
case "${1:-}" in
    "") ;;
    --worker-on-buildgrid) ON_BUILDGRID=1 ;;
    *) echo "usage: $0 [--worker-on-buildgrid]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KILN_BIN="${KILN_BIN:-$ROOT/target/debug/kiln}"
INSTANCE="${BGD_E2E_INSTANCE:-kiln-e2e-alt}"
BGD_TIMEOUT=120

# gRPC honours http(s)_proxy; loopback must never go through a proxy.
export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
export NO_PROXY="$no_proxy"

log() { printf 'bgd-e2e: %s\n' "$*"; }
die() { printf 'bgd-e2e: FATAL: %s\n' "$*" >&2; exit 1; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/bgd-e2e.XXXXXX")"
KILN_PID=""
KILN_LOG="$TMP/kiln.log"

kiln_log_tail() {
    if [[ -s "$KILN_LOG" ]]; then
        echo "----- last 60 lines of $KILN_LOG -----" >&2
        tail -n 60 "$KILN_LOG" >&2 || true
        echo "----- end of kiln log -----" >&2
    fi
}

cleanup() {
    local rc=$?
    set +e
    if [[ $rc -ne 0 ]]; then
        kiln_log_tail
    fi
    if [[ -d "$TMP/buildgrid" ]]; then
        if [[ $rc -ne 0 ]]; then
            for f in "$TMP"/buildgrid/*.log; do
                [[ -s "$f" ]] || continue
                echo "----- last 30 lines of $f -----" >&2
                tail -n 30 "$f" >&2
            done
        fi
        KILN_BIN="$KILN_BIN" "$ROOT/scripts/buildgrid.sh" down --dir "$TMP/buildgrid" >/dev/null 2>&1
    fi
    if [[ -n "$KILN_PID" ]] && kill -0 "$KILN_PID" 2>/dev/null; then
        kill "$KILN_PID" 2>/dev/null
        for _ in $(seq 1 50); do
            kill -0 "$KILN_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$KILN_PID" 2>/dev/null
        wait "$KILN_PID" 2>/dev/null
    fi
    if [[ "${BGD_E2E_KEEP:-0}" == 1 ]]; then
        echo "bgd-e2e: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- bgd --------------------------------------------------------------------
if ! command -v bgd >/dev/null 2>&1; then
    log "bgd not found; installing buildgrid with pip"
    python3 -m pip install -q buildgrid
    hash -r
    command -v bgd >/dev/null 2>&1 || die "bgd still not on PATH after pip install buildgrid"
fi
log "using $(command -v bgd) (buildgrid $(python3 -m pip show buildgrid 2>/dev/null | sed -n 's/^Version: //p'))"

# --- kiln -------------------------------------------------------------------
free_ports() { # prints two distinct free loopback ports
    python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [[ $ON_BUILDGRID == 1 ]]; then
    [[ -x "$KILN_BIN" ]] || die "$KILN_BIN missing (cargo build -p kiln-node)"
    log "starting BuildGrid with a kiln worker ($KILN_BIN) as its bot"
    KILN_BIN="$KILN_BIN" "$ROOT/scripts/buildgrid.sh" up --dir "$TMP/buildgrid" --workers 1 --concurrency 2 >"$TMP/buildgrid.out" ||
        die "scripts/buildgrid.sh up failed"
    REMOTE="$(sed -n 's/^BUILDGRID_ENDPOINT=//p' "$TMP/buildgrid.out" | tail -n 1)"
    [[ -n "$REMOTE" ]] || die "scripts/buildgrid.sh up printed no BUILDGRID_ENDPOINT"
elif [[ -n "${BGD_E2E_REMOTE:-}" ]]; then
    REMOTE="$BGD_E2E_REMOTE"
    log "BGD_E2E_REMOTE set: not starting kiln, using $REMOTE"
else
    if [[ ! -x "$KILN_BIN" ]]; then
        log "$KILN_BIN missing; running cargo build -p kiln-node"
        (cd "$ROOT" && cargo build -p kiln-node)
        [[ -x "$KILN_BIN" ]] || die "$KILN_BIN still missing after cargo build -p kiln-node"
    fi
    read -r PORT HPORT < <(free_ports)
    log "starting $KILN_BIN dev --listen 127.0.0.1:$PORT --http 127.0.0.1:$HPORT --data $TMP/data"
    RUST_LOG="${RUST_LOG:-info}" "$KILN_BIN" dev \
        --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HPORT" --data "$TMP/data" \
        >"$KILN_LOG" 2>&1 &
    KILN_PID=$!
    deadline=$((SECONDS + 30))
    until port_open "$PORT"; do
        if ! kill -0 "$KILN_PID" 2>/dev/null; then
            krc=0; wait "$KILN_PID" || krc=$?
            KILN_PID=""
            die "kiln exited (status $krc) before listening on 127.0.0.1:$PORT"
        fi
        ((SECONDS < deadline)) || die "kiln did not accept connections on 127.0.0.1:$PORT within 30 s"
        sleep 0.2
    done
    log "kiln (pid $KILN_PID) is listening on 127.0.0.1:$PORT"
    REMOTE="grpc://127.0.0.1:$PORT"
fi

# --- helpers ----------------------------------------------------------------
TOTAL=0  # round-trips attempted
OK=0     # round-trips identical
FAILS=0  # failed checks of any kind (round-trips, digests, modes)
CALL=0

fail() { printf 'bgd-e2e: FAIL: %s\n' "$*" >&2; FAILS=$((FAILS + 1)); }

# bgd_call OUTVAR ARGS...
# Runs `bgd ARGS...` bounded by timeout; stores the path of the combined
# stdout+stderr log in OUTVAR. Returns non-zero (and prints the output) if bgd
# exits non-zero, times out, or prints an `Error` line.
bgd_call() {
    local __out=$1; shift
    CALL=$((CALL + 1))
    local out="$TMP/bgd-$CALL.out" rc=0
    printf -v "$__out" '%s' "$out"
    timeout "$BGD_TIMEOUT" bgd "$@" >"$out" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]] || grep -q '^Error' "$out"; then
        if [[ $rc -eq 124 ]]; then
            printf 'bgd-e2e: bgd %s timed out after %ss\n' "$*" "$BGD_TIMEOUT" >&2
        else
            printf 'bgd-e2e: bgd %s failed (exit %s):\n' "$*" "$rc" >&2
        fi
        sed 's/^/    | /' "$out" >&2
        return 1
    fi
}

# bgd_run OUTVAR [--instance-name X] SUBCOMMAND ARGS...
# bgd_call for `bgd cas --remote $REMOTE [--instance-name X] SUBCOMMAND ARGS...`.
bgd_run() {
    local __outvar=$1; shift
    local group_opts=(--remote "$REMOTE")
    if [[ "${1:-}" == --instance-name ]]; then
        group_opts+=(--instance-name "$2"); shift 2
    fi
    bgd_call "$__outvar" cas "${group_opts[@]}" "$@"
}

# pushed_digest LOG PATH -> HASH/SIZE printed by upload-file/upload-dir for PATH
pushed_digest() {
    grep -F "Success: Pushed path=[$2] with digest=[" "$1" | tail -n 1 |
        sed -n 's/.* with digest=\[\([0-9a-f]\{64\}\/[0-9]\{1,\}\)\]$/\1/p'
}

# check_digest PATH DIGEST: DIGEST must equal sha256sum/size of PATH
check_digest() {
    local want
    want="$(sha256sum "$1" | cut -d' ' -f1)/$(stat -c %s "$1")"
    if [[ "$2" == "$want" ]]; then
        log "digest ok: $(basename "$1") $2"
    else
        fail "bgd reported digest $2 for $1, sha256sum/stat say $want"
    fi
}

# roundtrip_files [--instance-name X] FILE...
# Uploads all FILEs in one upload-file call, downloads them in one
# download-file call, compares each with cmp. One round-trip per file.
roundtrip_files() {
    local inst=()
    if [[ "$1" == --instance-name ]]; then inst=(--instance-name "$2"); shift 2; fi
    local files=("$@") f d up down pairs=() digests=() i
    TOTAL=$((TOTAL + ${#files[@]}))
    if ! bgd_run up "${inst[@]}" upload-file "${files[@]}"; then
        fail "upload-file ${files[*]##*/}${inst[1]:+ (instance ${inst[1]})}"
        return 0
    fi
    for f in "${files[@]}"; do
        d="$(pushed_digest "$up" "$f")"
        if [[ -z "$d" ]]; then
            fail "no 'Success: Pushed path=[$f] with digest=[...]' line from upload-file:"
            sed 's/^/    | /' "$up" >&2
            return 0
        fi
        check_digest "$f" "$d"
        digests+=("$d")
        pairs+=("$d" "$TMP/down/${f##*/}${inst[1]:+.$INSTANCE}")
    done
    mkdir -p "$TMP/down"
    if ! bgd_run down "${inst[@]}" download-file "${pairs[@]}"; then
        fail "download-file ${files[*]##*/}${inst[1]:+ (instance ${inst[1]})}"
        return 0
    fi
    for i in "${!files[@]}"; do
        f="${files[$i]}"
        local got="${pairs[$((2 * i + 1))]}"
        if [[ ! -f "$got" ]]; then
            fail "download-file did not create $got (digest ${digests[$i]})"
        elif cmp -s "$f" "$got"; then
            OK=$((OK + 1))
            log "identical: ${f##*/} (${digests[$i]#*/} bytes)${inst[1]:+ via instance ${inst[1]}}"
        else
            fail "${f##*/} came back different: $(cmp "$f" "$got" 2>&1 | head -n 1); sizes $(stat -c %s "$f") vs $(stat -c %s "$got")"
        fi
    done
}

# --- test data --------------------------------------------------------------
SRC="$TMP/src"
mkdir -p "$SRC"
printf 'hello from the kiln bgd cross-check\nline two\n' >"$SRC/small.txt"
: >"$SRC/empty.bin"
head -c $((200 * 1024)) /dev/urandom >"$SRC/medium.bin"   # batch path, above kiln's 64 KiB memory tier
head -c $((5 * 1024 * 1024 + 123)) /dev/urandom >"$SRC/big.bin" # > 1 MiB: ByteStream, 2 Write chunks
printf 'multi one\n' >"$SRC/multi1.txt"
printf 'multi two\n' >"$SRC/multi2.txt"
head -c 3000 /dev/urandom >"$SRC/multi3.bin"
# Fresh content for the instance round-trips, so the blobs are not already stored.
printf 'instance-scoped blob %s\n' "$INSTANCE" >"$SRC/inst-small.txt"
head -c $((2 * 1024 * 1024 + 7)) /dev/urandom >"$SRC/inst-big.bin"

TREE="$SRC/tree"
mkdir -p "$TREE/bin" "$TREE/lib/nested/deeper" "$TREE/empty-dir"
printf '#!/bin/sh\necho tool\n' >"$TREE/bin/tool.sh"
chmod 0755 "$TREE/bin/tool.sh"
printf 'top-level readme\n' >"$TREE/README"
chmod 0644 "$TREE/README"
printf 'lib a\n' >"$TREE/lib/a.txt"
cp "$TREE/lib/a.txt" "$TREE/lib/nested/a-copy.txt"   # same blob at two paths
head -c 70000 /dev/urandom >"$TREE/lib/nested/data.bin"
printf 'deep\n' >"$TREE/lib/nested/deeper/leaf.txt"
: >"$TREE/lib/nested/deeper/empty-file"
ln -s ../README "$TREE/lib/readme-link"

# --- round-trips ------------------------------------------------------------
log "remote $REMOTE"
for f in small.txt empty.bin medium.bin big.bin; do
    roundtrip_files "$SRC/$f"
done
roundtrip_files "$SRC/multi1.txt" "$SRC/multi2.txt" "$SRC/multi3.bin"
if [[ $ON_BUILDGRID == 0 ]]; then
    roundtrip_files --instance-name "$INSTANCE" "$SRC/inst-small.txt"
    roundtrip_files --instance-name "$INSTANCE" "$SRC/inst-big.bin"
fi

# Directory tree.
TOTAL=$((TOTAL + 1))
if bgd_run up upload-dir "$TREE"; then
    root="$(pushed_digest "$up" "$TREE")"
    if [[ -z "$root" ]]; then
        fail "no root digest line 'Success: Pushed path=[$TREE] with digest=[...]' from upload-dir:"
        sed 's/^/    | /' "$up" >&2
    else
        log "tree root digest $root ($(grep -c '^Success: Pushed' "$up") nodes pushed)"
        check_digest "$TREE/bin/tool.sh" "$(pushed_digest "$up" "$TREE/bin/tool.sh")"
        check_digest "$TREE/lib/nested/data.bin" "$(pushed_digest "$up" "$TREE/lib/nested/data.bin")"
        OUT="$TMP/down/tree"
        if bgd_run down download-dir "$root" "$OUT"; then
            dir_ok=1
            if ! diff -r "$TREE" "$OUT" >"$TMP/tree.diff" 2>&1; then
                fail "directory tree differs after download-dir:"
                sed 's/^/    | /' "$TMP/tree.diff" >&2
                dir_ok=0
            fi
            # bgd preserves the executable bit (FileNode.is_executable); diff -r does not look at it.
            if [[ ! -x "$OUT/bin/tool.sh" ]]; then
                fail "bin/tool.sh lost its executable bit ($(stat -c %A "$OUT/bin/tool.sh" 2>&1))"
                dir_ok=0
            fi
            if [[ -x "$OUT/README" ]]; then
                fail "README became executable ($(stat -c %A "$OUT/README"))"
                dir_ok=0
            fi
            if [[ ! -L "$OUT/lib/readme-link" || "$(readlink "$OUT/lib/readme-link")" != ../README ]]; then
                fail "lib/readme-link is not the symlink ../README after download-dir"
                dir_ok=0
            fi
            if [[ ! -d "$OUT/empty-dir" ]]; then
                fail "empty-dir missing after download-dir"
                dir_ok=0
            fi
            if [[ $dir_ok == 1 ]]; then
                OK=$((OK + 1))
                log "identical: directory tree ($(find "$OUT" | wc -l) entries, exec bit, symlink, empty dir)"
            fi
        else
            fail "download-dir $root"
        fi
    fi
else
    fail "upload-dir $TREE"
fi

# --- remote execution -------------------------------------------------------
# exec_decode LOG: decodes the last Operation that `bgd execute command`
# printed (protobuf text format, whose Any fields bgd leaves packed) with bgd's
# own protos and prints KEY=VALUE lines: name, done, stage, code and message
# (the operation's error, else ExecuteResponse.status), exit_code, cached,
# stdout and stderr (HASH/SIZE), outputs (the output file paths).
exec_decode() {
    python3 - "$1" <<'PY'
import re, sys
from google.protobuf import text_format
from buildgrid._protos.google.longrunning import operations_pb2
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

text = open(sys.argv[1], errors="replace").read().split("\nResponse status code:")[0]
starts = [m.start() for m in re.finditer(r'^name: "', text, re.M)]
if not starts:
    sys.exit(0)
op = text_format.Parse(text[starts[-1]:], operations_pb2.Operation())
def kv(k, v):
    print(f"{k}=" + str(v).replace("\n", " "))
kv("name", op.name)
kv("done", int(op.done))
meta = re_pb2.ExecuteOperationMetadata()
if op.metadata.Unpack(meta):
    kv("stage", meta.stage)
if op.HasField("error"):
    kv("code", op.error.code)
    kv("message", op.error.message)
elif op.HasField("response"):
    resp = re_pb2.ExecuteResponse()
    if not op.response.Unpack(resp):
        kv("message", f"response is a {op.response.type_url}, not an ExecuteResponse")
        kv("code", -1)
        sys.exit(0)
    kv("code", resp.status.code)
    kv("message", resp.status.message)
    kv("exit_code", resp.result.exit_code)
    kv("cached", int(resp.cached_result))
    for f in ("stdout", "stderr"):
        d = getattr(resp.result, f + "_digest")
        kv(f, f"{d.hash}/{d.size_bytes}" if d.hash else "")
    kv("outputs", " ".join(f.path for f in resp.result.output_files))
PY
}

# exec_result LOG: exec_decode LOG into the associative array R (emptied).
declare -A R
exec_result() {
    local k v
    R=()
    while IFS='=' read -r k v; do R[$k]=$v; done < <(exec_decode "$1")
}

# fetch_blob DIGEST DEST: downloads a blob with bgd cas download-file.
fetch_blob() {
    # shellcheck disable=SC2034 # set by bgd_run through its OUTVAR
    local dl
    mkdir -p "$(dirname "$2")"
    bgd_run dl download-file "$1" "$2" && [[ -f "$2" ]]
}

# op_status NAME WANT: `bgd operation status NAME` must print WANT (a fixed
# string) on its `Success:`/`Failure:` line. One check.
op_status() {
    local st="" line
    TOTAL=$((TOTAL + 1))
    if ! bgd_call st operation --remote "$REMOTE" status "$1"; then
        fail "bgd operation status $1"
        return 0
    fi
    line="$(grep -E '^(Success|Failure): ' "$st" | head -n 1)"
    if [[ "$line" == *"$2"* ]]; then
        OK=$((OK + 1))
        log "operation status ok: $line"
    else
        fail "bgd operation status $1: want '$2', got:"
        sed 's/^/    | /' "$st" >&2
    fi
}

# Lowercase input -> uppercase copy plus line count, written into a
# subdirectory that does not exist in the input root (REAPI: the worker
# creates the parents of outputs), and a line on stdout.
EXEC_IN="$TMP/exec-in"
mkdir -p "$EXEC_IN/data"
printf 'kiln remote execution input\nsecond line, %s\n' "$(date +%s%N)" >"$EXEC_IN/data/input.txt"
EXEC_SCRIPT='export PATH=/bin:/usr/bin LC_ALL=C; tr a-z A-Z < data/input.txt > out/result.txt && wc -l < data/input.txt >> out/result.txt && echo produced-result'
EXPECTED="$TMP/exec-expected.txt"
# shellcheck disable=SC2018,SC2019 # ASCII a-z is meant, as in EXEC_SCRIPT.
{ LC_ALL=C tr a-z A-Z <"$EXEC_IN/data/input.txt"; wc -l <"$EXEC_IN/data/input.txt"; } >"$EXPECTED"
OP_OK="" OP_FAIL="" OP_CACHED=""

# exec_ok TAG [-c]: runs EXEC_SCRIPT through Kiln, checks the operation
# completed with exit code 0, downloads out/result.txt and the stdout blob and
# compares them with what is expected. TAG "cached" must be answered from the
# Action Cache (cached_result), the others must not. One check. Sets OP_NAME.
exec_ok() {
    local tag=$1 ex="" got="$TMP/exec-out-$1"
    local opts=("${@:2}")
    TOTAL=$((TOTAL + 1))
    OP_NAME=""
    # `--` ends bgd's options: the command's own `-c` must not be taken as
    # bgd's --enable-action-cache. --output-directory is absolute: bgd's cwd
    # does not matter.
    if ! bgd_call ex execute --remote "$REMOTE" command "${opts[@]}" \
            --output-file out/result.txt --output-directory "$got" \
            -- "$EXEC_IN" /bin/sh -c "$EXEC_SCRIPT"; then
        fail "bgd execute command ($tag)"
        return 0
    fi
    exec_result "$ex"
    OP_NAME="${R[name]:-}"
    if [[ "${R[done]:-0}" != 1 || "${R[code]:-}" != 0 || "${R[exit_code]:-}" != 0 ]]; then
        fail "execute ($tag): want a done operation, status OK, exit code 0; got done=${R[done]:-?} status=${R[code]:-?} '${R[message]:-}' exit_code=${R[exit_code]:-?}"
        sed 's/^/    | /' "$ex" >&2
        return 0
    fi
    if [[ "$tag" == cached && "${R[cached]:-}" != 1 ]]; then
        fail "execute ($tag): a repeated cacheable action was executed again instead of served from the Action Cache (cached_result false)"
        return 0
    elif [[ "$tag" != cached && "${R[cached]:-}" != 0 ]]; then
        fail "execute ($tag): cached_result is true for an action never run before"
        return 0
    fi
    if [[ "${R[outputs]:-}" != out/result.txt ]]; then
        fail "execute ($tag): output files are '${R[outputs]:-}', want 'out/result.txt'"
        return 0
    fi
    if [[ ! -f "$got/out/result.txt" ]]; then
        fail "execute ($tag): bgd did not download out/result.txt to $got"
        sed 's/^/    | /' "$ex" >&2
        return 0
    fi
    if ! cmp -s "$EXPECTED" "$got/out/result.txt"; then
        fail "execute ($tag): out/result.txt differs from the expected content:"
        diff -u "$EXPECTED" "$got/out/result.txt" | sed 's/^/    | /' >&2
        return 0
    fi
    if [[ -z "${R[stdout]:-}" ]] || ! fetch_blob "${R[stdout]:-}" "$got/logs/stdout" ||
            [[ "$(cat "$got/logs/stdout")" != produced-result ]]; then
        fail "execute ($tag): stdout (${R[stdout]:-no stdout_digest}) is '$(cat "$got/logs/stdout" 2>/dev/null)', want 'produced-result'"
        return 0
    fi
    OK=$((OK + 1))
    log "execution ok ($tag): operation $OP_NAME, exit code 0, out/result.txt identical ($(stat -c %s "$got/out/result.txt") bytes), stdout ok$([[ ${R[cached]:-} == 1 ]] && echo ', served from the Action Cache')"
}

log "remote execution through $REMOTE"
exec_ok plain                # do_not_cache, skip_cache_lookup
OP_OK="$OP_NAME"
exec_ok cacheable -c         # runs, and its result is cached
exec_ok cached -c            # the same action again: an Action Cache hit
OP_CACHED="$OP_NAME"

# A command that fails: exit code 3 with an OK status, and its stderr.
TOTAL=$((TOTAL + 1))
ex=""
if bgd_call ex execute --remote "$REMOTE" command --output-directory "$TMP/exec-out-fail" \
        -- "$EXEC_IN" /bin/sh -c 'echo "kiln-bgd: failing on purpose" >&2; exit 3'; then
    exec_result "$ex"
    OP_FAIL="${R[name]:-}"
    if [[ "${R[done]:-0}" != 1 || "${R[code]:-}" != 0 || "${R[exit_code]:-}" != 3 ]]; then
        fail "failing command: want a done operation, status OK, exit code 3; got done=${R[done]:-?} status=${R[code]:-?} '${R[message]:-}' exit_code=${R[exit_code]:-?}"
        sed 's/^/    | /' "$ex" >&2
    elif [[ -z "${R[stderr]:-}" ]] || ! fetch_blob "${R[stderr]:-}" "$TMP/exec-out-fail/stderr" ||
            [[ "$(cat "$TMP/exec-out-fail/stderr")" != "kiln-bgd: failing on purpose" ]]; then
        fail "failing command: stderr (${R[stderr]:-no stderr_digest}) is '$(cat "$TMP/exec-out-fail/stderr" 2>/dev/null)', want 'kiln-bgd: failing on purpose'"
    else
        OK=$((OK + 1))
        log "failing command reported: operation $OP_FAIL, exit code 3, status OK, stderr 'kiln-bgd: failing on purpose'"
    fi
else
    fail "bgd execute command (failing command)"
fi

# Operations API: the executed operations by name, and in the list.
if [[ -n "$OP_OK" ]]; then
    op_status "$OP_OK" "Success: $OP_OK: Completed succesfully (stage=4, exit_code=0)"
fi
if [[ -n "$OP_FAIL" ]]; then
    op_status "$OP_FAIL" "Success: $OP_FAIL: Completed with failure (stage=4, exit_code=3)"
fi
# The operation list is the server's, not the worker's: not checked against BuildGrid.
check_operation_list() {
    local oplist="" missing_ops=() o
    TOTAL=$((TOTAL + 1))
    if ! bgd_call oplist operation --remote "$REMOTE" list; then
        fail "bgd operation list"
        return 0
    fi
    for o in $OP_OK $OP_FAIL; do
        grep -qF ": $o: " "$oplist" || missing_ops+=("$o")
    done
    if [[ ${#missing_ops[@]} -eq 0 ]]; then
        OK=$((OK + 1))
        log "operation list ok: $(grep -cE '^(Success|Failure|Queued|Executing|CacheCheck): ' "$oplist") operations listed, incl. $OP_OK and $OP_FAIL"
    else
        fail "bgd operation list does not show ${missing_ops[*]}:"
        sed 's/^/    | /' "$oplist" >&2
    fi
}
if [[ $ON_BUILDGRID == 0 ]]; then
    check_operation_list
fi
# Informational, not a check: REAPI does not say whether an operation answered
# from the Action Cache can be looked up afterwards.
if [[ -n "$OP_CACHED" ]]; then
    CALL=$((CALL + 1))
    if timeout "$BGD_TIMEOUT" bgd operation --remote "$REMOTE" status "$OP_CACHED" >"$TMP/bgd-$CALL.out" 2>&1 &&
            ! grep -q '^Error' "$TMP/bgd-$CALL.out"; then
        log "note: the Action Cache hit's operation can be looked up: $(head -n 1 "$TMP/bgd-$CALL.out")"
    else
        log "note: the Action Cache hit's operation $OP_CACHED cannot be looked up: $(head -n 1 "$TMP/bgd-$CALL.out")"
    fi
fi

# --- summary ----------------------------------------------------------------
# Best effort: which RPCs kiln served and which failed with what code, from its
# Prometheus endpoint (kiln_rpc_duration_seconds_count, kiln_rpc_errors_total).
if [[ -n "$KILN_PID" ]]; then
    timeout 10 python3 - "$HPORT" <<'PY' || true
import re, sys, urllib.request
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
except Exception as e:
    print(f"bgd-e2e: (could not read kiln /metrics: {e})")
    sys.exit(0)
calls, errors = [], []
for line in text.splitlines():
    m = re.match(r'kiln_rpc_duration_seconds_count\{method="([^"]+)"\} (\S+)', line)
    if m:
        calls.append(f"{m[1]}={float(m[2]):.0f}")
    elif line.startswith("kiln_rpc_errors"):
        errors.append(line)
print("bgd-e2e: kiln served: " + (" ".join(sorted(calls)) or "(no RPC metrics found)"))
for e in errors:
    print("bgd-e2e: kiln RPC errors: " + e)
PY
fi

echo "bgd-e2e: $OK/$TOTAL round-trips and execution checks passed"
if [[ $OK -ne $TOTAL || $FAILS -ne 0 ]]; then
    echo "bgd-e2e: $FAILS failed check(s)" >&2
    exit 1
fi
