#!/usr/bin/env bash
# GPU self-check of the SelectiveScan CUDA kernels: builds them for this GPU (cmake + nvcc), runs ctest
# (kernels vs the C++ CPU reference), compares them with the CPU and PyTorch references for several
# shapes and dtypes, and times them against the PyTorch scan next to the measured copy bandwidth.
# Needs: an NVIDIA GPU, torch with CUDA, numpy, nvcc, cmake, a C++ compiler. No TensorRT.
# Takes a few minutes; exit code 0 = parity passed, 1 = a check failed, 2 = this machine cannot run it.
#   scripts/gpu_check.sh [--no-speed] [--build-dir DIR] [--cuda-archs 90]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m m4r_export.trt.selftest "$@"
