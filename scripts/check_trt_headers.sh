#!/usr/bin/env bash
# Compile-and-test check of the TensorRT plugin against one or more TensorRT header sets, the check CI
# cannot run (TensorRT headers are in no registry CI reaches, so .ci/native.sh builds without them).
# For each TENSORRT_INCLUDE_DIR (a folder holding NvInferRuntime.h, e.g. include/ of a TensorRT release or
# of github.com/NVIDIA/TensorRT at a release tag): configure a separate build with those headers, build
# everything (CPU reference, CUDA kernels, both plugin libraries, ctests), and run the plugin ctests:
#   trt_plugin_creator        the creator and plugin through getCreators, as IPluginRegistry::loadLibrary
#   trt_plugin_exports        dynamic library exports getCreators/setLoggerFinder; the static one does not
#   trt_plugin_core_emulated  the plugin's rules and enqueue path on the CPU (also runs in CI, no headers)
# No TensorRT library or GPU is needed (the plugin links without libnvinfer when none is found).
#
#   scripts/check_trt_headers.sh /path/to/TensorRT-10.8/include /path/to/TensorRT-11.1/include
#   env: M4R_CUDA_ARCHS (default 80: one arch keeps each build short), JOBS (default 2),
#        M4R_CHECK_BUILD_ROOT (default build/trt-headers; one build folder per header set)
# Exit code 0 when every header set configures, builds and passes; 1 otherwise; 2 on bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ $# -eq 0 ]]; then
  echo "usage: $0 TENSORRT_INCLUDE_DIR..." >&2
  exit 2
fi
archs="${M4R_CUDA_ARCHS:-80}"
jobs="${JOBS:-2}"
root="${M4R_CHECK_BUILD_ROOT:-build/trt-headers}"
tests='^(trt_plugin_creator|trt_plugin_exports|trt_plugin_core_emulated)$'
mkdir -p "$root"
summary=()
failed=0

for inc in "$@"; do
  inc="$(cd "$inc" 2>/dev/null && pwd)" || { echo "error: $inc is not a directory" >&2; exit 2; }
  if [[ ! -f "$inc/NvInferRuntime.h" || ! -f "$inc/NvInferVersion.h" ]]; then
    echo "error: $inc has no NvInferRuntime.h/NvInferVersion.h; pass TensorRT's include/ folder" >&2
    exit 2
  fi
  version="$(printf '#include <NvInferVersion.h>\nNV_TENSORRT_MAJOR.NV_TENSORRT_MINOR.NV_TENSORRT_PATCH\n' \
             | c++ -E -P -x c++ -I"$inc" - | tail -n 1 | tr -d ' ')"
  build="$root/trt-$version"
  echo "== TensorRT $version headers: $inc -> $build"
  start=$SECONDS
  status="PASS"
  if ! cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DM4R_REQUIRE_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="$archs" -DTensorRT_ROOT="$(dirname "$inc")" \
        -DTensorRT_INCLUDE_DIR="$inc" > "$build.configure.log" 2>&1; then
    status="FAIL (configure, see $build.configure.log)"
  elif ! grep -q "TensorRT headers: $inc" "$build.configure.log"; then
    status="FAIL (CMake did not use $inc, see $build.configure.log)"
  elif ! cmake --build "$build" -j "$jobs" > "$build.build.log" 2>&1; then
    tail -n 30 "$build.build.log"
    status="FAIL (build, see $build.build.log)"
  else
    listed="$(ctest --test-dir "$build" -N -R "$tests" | grep -c 'Test *#')"
    if [[ "$listed" -ne 3 ]]; then
      status="FAIL (expected 3 plugin ctests, CMake registered $listed)"
    elif ! ctest --test-dir "$build" -R "$tests" --output-on-failure; then
      status="FAIL (ctest)"
    else
      status="PASS (3/3 plugin ctests)"
    fi
  fi
  [[ "$status" == PASS* ]] || failed=1
  summary+=("TensorRT $version ($inc): $status in $((SECONDS - start)) s")
done

echo "== summary (CUDA archs $archs)"
printf '  %s\n' "${summary[@]}"
exit "$failed"
