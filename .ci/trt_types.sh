#!/usr/bin/env bash
# mypy on m4r_export/trt against the TensorRT Python API (tensorrt-stubs, repaired into typings/).
# Needs: pip install --no-deps tensorrt-stubs (its tensorrt dependency cannot install).
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/prepare_trt_stubs.py --out typings
MYPYPATH=typings python -m mypy m4r_export/trt
