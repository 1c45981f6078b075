"""Check exported files: onnx.checker full_check, one m4r::SelectiveScan node per layer, the function.

python benchmarks/onnx_check.py DIR/model.onnx DIR/model.fp16.onnx ...
"""

from __future__ import annotations

import sys

import onnx


def check(path: str) -> str:
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == ("m4r", "SelectiveScan")]
    assert nodes, f"{path}: no m4r::SelectiveScan node"
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"m4r" and attrs["plugin_version"] == b"1", attrs
        assert attrs["delta_softplus"] == 1 and attrs["mode"] in (b"all", b"last"), attrs
        assert len(n.input) == 9
    fns = [(f.domain, f.name) for f in model.functions]
    assert fns == [("m4r", "SelectiveScan")], fns
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("m4r") == 1, opsets
    modes = [
        onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "mode")).decode()
        for n in nodes
    ]
    fp16 = any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    outs = [o.name for o in model.graph.output]
    return (
        f"{path}: full_check OK; {len(nodes)} SelectiveScan node(s) modes={modes}; "
        "function m4r::SelectiveScan; "
        f"opset {opsets['']}; {'fp16' if fp16 else 'fp32'} weights; outputs {outs}"
    )


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(check(p))
