"""ReshapeDimsPass: the one dimension a Reshape infers, from the element count."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from graphresize.passes.reshape_dims import ReshapeDimsPass, inferred_dim
from onnx import helper


def _shape(*dims) -> ir.Shape:
    return ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in dims])


@pytest.mark.parametrize(("x", "out", "want"), [
    (("B", "S", 384), ("B", "S", None, 64), (2, 6)),
    (("B", 6, "S", 64), ("B", "S", None), (2, 384)),  # named dims cancel in any order
    (("B", "S", 6, 64), ("B", "S", None), (2, 384)),
    (("B", "S", 384), ("B", None, 6, 64), None),  # S unused
    (("B", "S", 380), ("B", "S", None, 64), None),  # not divisible
    (("B", "S", 384), ("B", "S", None, None), None),  # two unknowns
    (("B", "S", 384), ("B", "S", "unk__3", 64), (2, 6)),  # ONNX's unnamed dims count as unknown
    (("B", "unk__1", 384), ("B", "S", None, 64), None),
])
def test_inferred_dim(x, out, want):
    assert inferred_dim(_shape(*x), _shape(*out)) == want


def test_pass_fills_the_head_count_and_inference_carries_it():
    """y = Transpose(Reshape(x[B, S, 384], Concat(Shape(x)[:2], [-1, 64]))), what dynamo writes
    for ``view(B, S, -1, 64)``: ONNX shape inference leaves the head count unknown, the pass
    makes it 6 and inference carries it through the Transpose."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "S", 384])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], end=2),
        helper.make_node("Constant", [], ["tail"], value=helper.make_tensor("tail", onnx.TensorProto.INT64, [2], [-1, 64])),
        helper.make_node("Concat", ["shape", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["heads"]),
        helper.make_node("Transpose", ["heads"], ["y"], perm=[0, 2, 1, 3]),
    ]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(proto)
    ir.passes.common.ShapeInferencePass()(model)
    heads = next(n for n in model.graph if n.op_type == "Reshape").outputs[0]
    assert not isinstance(heads.shape[2], int)
    assert ReshapeDimsPass()(model).modified
    assert list(heads.shape)[2:] == [6, 64]
    assert model.graph.outputs[0].shape[1] == 6
