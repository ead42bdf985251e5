#!/usr/bin/env bash
# Build distributed-llama's `dllama` (root + worker binary) for the cluster benchmarks' baseline
# column. It is a benchmark tool, never a dependency of mpillm: nothing of it is committed.
#
#   scripts/build_dllama.sh SRC_DIR [OUT_DIR]       (OUT_DIR defaults to cache/dllama)
#
# SRC_DIR is an unpacked source tree of distributed-llama (v0.16.x), taken from a snapshot of
# its public repository, e.g. with the snapshot as a bare git dir G:
#     mkdir -p cache/dllama/src && git --git-dir=G archive v0.16.4 | tar -x -C cache/dllama/src
# This script downloads nothing. It copies the tree to OUT_DIR/build (so the source stays
# clean), runs the project's own Makefile (`make dllama`: g++ -std=c++11 -O3 -march=native)
# and puts the binary at OUT_DIR/dllama. -j defaults to 1 (a shared 2-core machine);
# set JOBS=2 to go faster.
set -euo pipefail
src="${1:?usage: scripts/build_dllama.sh SRC_DIR [OUT_DIR]}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${2:-$root/cache/dllama}"
[ -f "$src/Makefile" ] && [ -f "$src/src/dllama.cpp" ] || { echo "build_dllama: $src is not a distributed-llama source tree" >&2; exit 2; }
command -v g++ >/dev/null || { echo "build_dllama: g++ is missing" >&2; exit 2; }
mkdir -p "$out/build"
# a fresh copy each time: the Makefile has no header dependencies, stale objects would survive
rm -rf "$out/build"
mkdir -p "$out/build"
cp -a "$src/." "$out/build/"
# each compiler call under a generous timeout (a loaded machine takes minutes for -O3 of sgemm)
timeout "${BUILD_TIMEOUT:-1800}" make -C "$out/build" -j"${JOBS:-1}" dllama
cp "$out/build/dllama" "$out/dllama"
# it has no usage text: `dllama --help` exits 1 ("Unsupported mode"); a crash or a missing
# library gives another code
rc=0; timeout 10 "$out/dllama" --help >/dev/null 2>&1 || rc=$?
[ "$rc" -le 1 ] || { echo "build_dllama: $out/dllama does not run (exit $rc)" >&2; exit 1; }
echo "build_dllama: $out/dllama ($(cat "$src/.snapshot" 2>/dev/null || echo 'source version unknown'))"
