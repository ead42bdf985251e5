#!/usr/bin/env bash
# Benchmark-only environment: llama.cpp (through llama-cpp-python) in its own venv
# at $MPILLM_ROOT/.bench-venv, so it never becomes a runtime dependency of mpillm.
# Idempotent: does nothing when the pinned version is already importable there.
#
# llama-cpp-python ships as a source distribution and builds llama.cpp with CMake
# (~7.5 minutes on 2 cores). We build with GGML_NATIVE=ON (-march=native: AVX-512,
# VNNI, ... whatever this CPU has) and switch off the portable multi-variant CPU
# backend, so the baseline is the fastest llama.cpp this machine can run.
# A build log is kept in $MPILLM_ROOT/cache/baseline/llamacpp-build.log.
#
# Environment: MPILLM_BENCH_VENV overrides the venv location; LLAMACPP_FORCE=1 rebuilds.
set -euo pipefail
source "$(dirname "$0")/env.sh"

LLAMACPP_VERSION="0.3.36"
BENCH_VENV="${MPILLM_BENCH_VENV:-$MPILLM_ROOT/.bench-venv}"
LOG_DIR="$MPILLM_ROOT/cache/baseline"
mkdir -p "$LOG_DIR"

installed_version() {
  [ -x "$BENCH_VENV/bin/python" ] || return 1
  "$BENCH_VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m
import llama_cpp, numpy, gguf  # noqa: F401  (all three must import)
print(m.version("llama-cpp-python"))
EOF
}

if [ -z "${LLAMACPP_FORCE:-}" ] && [ "$(installed_version || true)" = "$LLAMACPP_VERSION" ]; then
  echo "llama-cpp-python $LLAMACPP_VERSION already installed in $BENCH_VENV"
  exit 0
fi

if [ ! -x "$BENCH_VENV/bin/python" ]; then
  python3 -m venv "$BENCH_VENV"
  "$BENCH_VENV/bin/pip" install -q --upgrade pip
fi
"$BENCH_VENV/bin/pip" install -q numpy gguf

# SOURCE_DATE_EPOCH or a cross-compiling toolchain make ggml default GGML_NATIVE to
# OFF; drop the former and ask for native code explicitly.
unset SOURCE_DATE_EPOCH
export CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF -DGGML_OPENMP=ON -DCMAKE_BUILD_TYPE=Release ${LLAMACPP_EXTRA_CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "building llama-cpp-python $LLAMACPP_VERSION (CMAKE_ARGS=$CMAKE_ARGS); log: $LOG_DIR/llamacpp-build.log"
# --no-cache-dir: never reuse a wheel that some earlier build made with other flags.
"$BENCH_VENV/bin/pip" install -v --no-cache-dir --force-reinstall --no-deps \
  "llama-cpp-python==$LLAMACPP_VERSION" >"$LOG_DIR/llamacpp-build.log" 2>&1 || {
  tail -n 40 "$LOG_DIR/llamacpp-build.log" >&2
  exit 1
}
# Its pure-Python dependencies (typing-extensions, diskcache, jinja2, numpy).
"$BENCH_VENV/bin/pip" install -q "llama-cpp-python==$LLAMACPP_VERSION"
v="$(installed_version)"
echo "llama-cpp-python $v installed in $BENCH_VENV"
grep -o -E 'GGML_AVX512[A-Z0-9_]*|-march=native' "$LOG_DIR/llamacpp-build.log" | sort -u | tr '\n' ' ' || true
echo
