"""torch -> ONNX: the serving graph, the ``m4r::SelectiveScan`` node and its function bodies, fp16.

See docs/onnx-export.md. Heavy imports (torch.onnx, onnx, onnxruntime) happen in the submodules.
"""

from __future__ import annotations

from .inputs import exclude_inputs, histories_to_inputs, truncate_inputs

__all__ = ["exclude_inputs", "histories_to_inputs", "truncate_inputs"]
