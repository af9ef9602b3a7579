#!/usr/bin/env bash
# Builds Kiln in release mode and runs a single development node in the foreground:
# gRPC on 127.0.0.1:8980, HTTP on 127.0.0.1:9980, data in ./.kiln. Extra flags go to `kiln dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
  echo "cargo is required (rustup.rs)" >&2
  exit 1
fi
cargo build --release -p kiln-node
exec target/release/kiln dev "$@"
