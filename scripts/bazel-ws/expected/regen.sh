#!/usr/bin/env bash
# Recomputes the expected outputs of the e2e workspace with plain shell, no
# Bazel, by running the same pipelines as the genrules in ../BUILD,
# ../leaves/BUILD, ../mid/BUILD and ../tree.bzl. KEEP IN SYNC with those.
#
# Usage: regen.sh [OUT_DIR]
#   Writes final.txt and tree_listing.txt to OUT_DIR (default: this script's
#   directory, i.e. refreshes the checked-in copies). scripts/bazel-e2e.sh
#   runs it into a temp dir and compares both Bazel's outputs and the
#   checked-in copies against the result.
#
# shellcheck disable=SC2018,SC2019 # a-z ranges are meant (rot13, ASCII upcase).
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ws=$(dirname "$here")
out=$(mkdir -p "${1:-$here}" && cd "${1:-$here}" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"

seed=$ws/leaves/seed.txt
cp "$seed" seed.txt

leaf() { printf 'leaf%02d.txt' "$1"; }

# Layer 0 (leaves/BUILD).
for i in $(seq 0 23); do
    {
        for j in $(seq 1 $((4 + (i * 7) % 11))); do
            echo "leaf$i k$(( (i * 31 + j * 17) % 97 )) w$(( j * (i + 1) % 7 ))"
        done
        if (( i % 2 == 1 )); then tr a-z n-za-m < "$seed"; fi
    } > "$(leaf "$i")"
done

# Layer 1 (mid/BUILD).
for k in $(seq 0 11); do
    cat "$(leaf $((2 * k)))" "$(leaf $((2 * k + 1)))" | sort | tr a-z A-Z > "m1_$k.txt"
done

# Layer 2.
for k in $(seq 0 5); do
    for f in "m1_$((2 * k)).txt" "m1_$((2 * k + 1)).txt"; do
        echo "$(sha256sum < "$f" | cut -c1-64) $(wc -l < "$f") $(tr ' ' '\n' < "$f" | sort -u | wc -l)"
    done > "m2_$k.txt"
done

# Layer 3.
for k in $(seq 0 2); do
    srcs=("m2_$((2 * k)).txt" "m2_$((2 * k + 1)).txt" "$(leaf $((3 * k)))")
    {
        cat "${srcs[@]}" | sort | uniq
        echo "bytes $(cat "${srcs[@]}" | wc -c)"
    } > "m3_$k.txt"
done

# Tree artifact (tree.bzl) from leaf05, and its listing (//:tree_listing).
src=$(leaf 5)
mkdir -p tree_out/sub/deeper
head -n 2 "$src" > tree_out/head.txt
tail -n 2 "$src" > tree_out/tail.txt
wc -l < "$src" > tree_out/lines.txt
sort -r "$src" > tree_out/sub/reversed.txt
sha256sum < "$src" | cut -c1-64 > tree_out/sub/deeper/sha256.txt
: > tree_out/sub/empty.txt
(cd tree_out && find -L . -type f | sort | while read -r f; do echo "== $f"; cat "$f"; done) > tree_listing.txt

# //:final.
{
    echo kiln-e2e final
    for f in m3_0.txt m3_1.txt m3_2.txt tree_listing.txt m1_11.txt leaf23.txt seed.txt; do
        echo "$(basename "$f") $(sha256sum < "$f" | cut -c1-64) $(wc -l < "$f")"
    done
    cat m3_0.txt m3_1.txt m3_2.txt
    echo end
} > final.txt

cp final.txt tree_listing.txt "$out/"
