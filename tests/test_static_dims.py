"""StaticShapeDimsPass: ``Gather(Shape(x), i)`` of a static dimension becomes a constant."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from graphresize.passes.static_dims import StaticShapeDimsPass, forget_unnamed_shapes
from onnx import helper


def _model() -> ir.Model:
    """y = Identity(Slice(x[B, 4, S, 16], 0, Shape(x)[3] // 2, axis 3)), as the TorchScript exporter
    writes rotate_half's first half; ``b`` = Shape(x)[0] (symbolic, stays)."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 4, "S", 16])
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y",)]
    outs.append(helper.make_tensor_value_info("b", onnx.TensorProto.INT64, None))
    const = {n: helper.make_tensor(n, onnx.TensorProto.INT64, [] if n in ("three", "two", "zero_s") else [1], v)
             for n, v in (("three", [3]), ("two", [2]), ("zero_s", [0]), ("zero", [0]), ("axis", [3]), ("unsq", [0]))}
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "three"], ["last"], axis=0),
        helper.make_node("Div", ["last", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "unsq"], ["end"]),
        helper.make_node("Slice", ["x", "zero", "end", "axis"], ["half_x"]),
        helper.make_node("Identity", ["half_x"], ["y"]),
        helper.make_node("Gather", ["shape", "zero_s"], ["b"], axis=0),
    ]
    graph = helper.make_graph(nodes, "g", [x], outs, initializer=list(const.values()))
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_static_dimension_becomes_a_constant_and_inference_then_knows_the_slice():
    model = _model()
    ir.passes.common.ShapeInferencePass()(model)
    sliced = next(n for n in model.graph if n.op_type == "Slice").outputs[0]
    assert sliced.shape is None or not isinstance(sliced.shape[3], int)
    assert StaticShapeDimsPass()(model).modified
    half = next(n for n in model.graph if n.op_type == "Div").inputs[0]
    assert half.producer().op_type == "Constant" and int(np.asarray(half.producer().attributes["value"].as_tensor().numpy())) == 16
    from onnxscript.optimizer import _constant_folding as folding

    folding.FoldConstantsPass(shape_inference=True, input_size_limit=1024, output_size_limit=1024)(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    gathers = [n for n in model.graph if n.op_type == "Gather"]
    assert len(gathers) == 1 and gathers[0].outputs[0].name == "b"  # the symbolic batch stays
    forget_unnamed_shapes(model)
    ir.passes.common.ShapeInferencePass()(model)
    sliced = next(n for n in model.graph if n.op_type == "Slice").outputs[0]
    assert sliced.shape[1] == 4 and sliced.shape[3] == 8
    from graphresize.io.ort_utils import make_session

    x = np.random.default_rng(0).standard_normal((2, 4, 5, 16)).astype(np.float32)
    got_y, got_b = make_session(model).run(None, {"x": x})
    np.testing.assert_array_equal(got_y, x[..., :8])
    assert int(got_b) == 2
