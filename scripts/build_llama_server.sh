#!/usr/bin/env bash
# Benchmark-only: build llama.cpp's own tools from the llama.cpp sources vendored in the
# llama-cpp-python source package (the version scripts/setup_llamacpp.sh pins), natively for
# this CPU, into $MPILLM_ROOT/cache/llamacpp/build/bin/. Baselines for benchmarks.serve
# (llama-server), benchmarks.batched (llama-batched-bench), benchmarks.gpt_oss (llama-bench) and
# mpillm.bench_spec (llama-server's ngram drafting), never a dependency of mpillm.
# LLAMA_TARGETS="llama-lookup llama-speculative-simple ..." builds other tools (examples included).
# About 50 minutes on 2 busy cores (-j 1); LLAMA_JOBS=N builds with N jobs.
set -euo pipefail
source "$(dirname "$0")/env.sh"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
DIR="$MPILLM_ROOT/cache/llamacpp"
mkdir -p "$DIR"
if [ ! -d "$DIR/src" ]; then
  pip download -q --no-deps --no-binary :all: -d "$DIR" "llama-cpp-python==$VERSION"
  tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
  mv "$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR/src"
  rm -rf "$DIR/llama_cpp_python-$VERSION"
fi
cmake -S "$DIR/src" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_SERVER=ON >"$DIR/configure.log"
# shellcheck disable=SC2086  # a list of targets
ninja -C "$DIR/build" -j "${LLAMA_JOBS:-1}" ${LLAMA_TARGETS:-llama-server llama-batched-bench llama-bench}
echo "$DIR/build/bin"
