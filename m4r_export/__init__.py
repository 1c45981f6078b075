"""m4r-export: ship Mamba4Rec sequential recommenders to ONNX Runtime, TensorRT and Triton."""

from __future__ import annotations

__version__ = "0.1.0"
