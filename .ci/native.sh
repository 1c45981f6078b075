#!/usr/bin/env bash
# Native part of CI: configure + build the CPU reference, the optimised CPU kernel, the CUDA kernels (compiled, not run: CI has no
# GPU) and, when TensorRT_ROOT points at TensorRT headers, the plugin; then run ctest.
#   env: M4R_CUDA_ARCHS (default 80: one arch keeps the build ~1 min on 2 cores; releases use the
#        CMake default 75;80;86;87;89;90), M4R_NATIVE_BUILD_DIR (default build/native-ci), TensorRT_ROOT,
#        ONNXRUNTIME_ROOT (builds libm4r_ort_ops.so and recipes/cpp/ort_recommend).
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir="${M4R_NATIVE_BUILD_DIR:-build/native-ci}"
archs="${M4R_CUDA_ARCHS:-80}"
python_bin="$(command -v python3 || command -v python || true)"

cmake_args=(-S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DM4R_REQUIRE_CUDA=ON
            -DCMAKE_CUDA_ARCHITECTURES="$archs")
if [[ -n "$python_bin" ]]; then
  cmake_args+=(-DPython3_EXECUTABLE="$python_bin")
fi
if [[ -n "${ONNXRUNTIME_ROOT:-}" ]]; then
  cmake_args+=(-DONNXRUNTIME_ROOT="$ONNXRUNTIME_ROOT")
fi
if [[ -n "${TensorRT_ROOT:-}" ]]; then
  cmake_args+=(-DTensorRT_ROOT="$TensorRT_ROOT")
fi

start=$SECONDS
cmake "${cmake_args[@]}"
cmake --build "$build_dir" -j "$(nproc 2>/dev/null || echo 2)"
ctest --test-dir "$build_dir" --output-on-failure
echo "native build + ctest: $((SECONDS - start)) s"
