"""``m4r export --int8``: ``model.int8.onnx``, the fp32 file with its weight GEMMs quantized to int8.

ONNX Runtime's dynamic quantization (:func:`onnxruntime.quantization.quantize_dynamic`): every ``MatMul``
whose second input is a constant weight (in_proj, x_proj, dt_proj of each Mamba block) becomes
``DynamicQuantizeLinear`` + ``MatMulInteger`` (int8 weights, activations quantized per call to uint8).
Everything else stays fp32: the ``SelectiveScan`` node and its state (a custom-domain node the quantizer
leaves alone), LayerNorm, the ``Gemm`` layers (out_proj, FFN: dynamic quantization does not cover Gemm), and
the scores head (its item table reaches the MatMul through a Transpose, not as a constant weight). Dynamic
rather than static: no calibration data to ship or choose, and the activations' ranges vary per user.
With ``--fused`` the Mamba block is one ``m4r::MambaMixer`` node, which the quantizer leaves alone (its
weights stay fp32, run by the fused kernel or the node's function body); only the MatMuls outside it become
int8.
Measured accuracy and speed: docs/ort-custom-ops.md ("int8").
"""

from __future__ import annotations

import tempfile
from pathlib import Path

INT8_FILE = "model.int8.onnx"
#: op types whose presence marks a graph as int8 (what quantize_dynamic / static QDQ produce)
INT8_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul"})


def quantize_int8(model_bytes: bytes) -> bytes:
    """The int8 variant of an fp32 ``model.onnx`` (bytes in, bytes out)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" warning is not for our users
    try:
        with tempfile.TemporaryDirectory(prefix="m4r-int8-") as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(model_bytes)
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
            return dst.read_bytes()
    finally:
        quiet.setLevel(level)


def is_int8(op_types: set[str]) -> bool:
    return bool(INT8_OPS & op_types)
