"""Fold ``Gather(Shape(x), i)`` to a constant where the dimensions it reads are static."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _unnamed(dim) -> bool:
    return not isinstance(dim, int) and (dim is None or dim.value is None or str(dim.value).startswith("unk__"))


def forget_unnamed_shapes(model: ir.Model) -> int:
    """Drop every node output shape with a dimension ONNX shape inference invented (``unk__N``)
    or left unknown, so that the next inference derives it afresh (ONNX shape inference keeps a
    shape already recorded). Graph outputs keep theirs. Returns how many were dropped."""
    dropped = 0
    for node in model.graph:
        for value in node.outputs:
            if value.shape is not None and not value.is_graph_output() and any(_unnamed(d) for d in value.shape):
                value.shape = None
                dropped += 1
    return dropped


class StaticShapeDimsPass(ir.passes.InPlacePass):
    """Rule: ``Gather(Shape(x, start, end), i)`` with a constant index ``i`` becomes a
    ``Constant`` when every dimension of ``x`` it reads is a static int (``x.shape[start:end][i]``).

    Why: the TorchScript exporter computes split points from shapes, e.g. ``rotate_half``'s
    ``x[..., : x.shape[-1] // 2]`` as ``Slice(x, 0, Unsqueeze(Div(Gather(Shape(x), 3), 2)))``;
    onnxscript's constant folding folds a ``Shape`` only when the whole shape is static, so with
    a symbolic batch the Slice bounds stay computed, its output shape unknown, and the rotary
    and attention fusions (which read shapes) do not match. Written by hand on ``onnx_ir``.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in list(model.graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
                continue
            if node.outputs[0].is_graph_output():
                continue
            shape_node = node.inputs[0].producer()
            if shape_node is None or shape_node.op_type != "Shape" or shape_node.domain not in ("", "ai.onnx"):
                continue
            x, index = shape_node.inputs[0], ir.convenience.get_const_tensor(node.inputs[1])
            if x is None or x.shape is None or index is None or node.attributes.get_int("axis", 0) != 0:
                continue
            start = shape_node.attributes.get_int("start", 0)
            end = shape_node.attributes.get_int("end", len(x.shape))
            dims = list(x.shape)[start:end]
            positions = np.asarray(index.numpy()).astype(np.int64)
            if positions.size and not (-len(dims) <= positions.min() and positions.max() < len(dims)):
                continue
            values = [dims[int(p)] for p in positions.reshape(-1)]
            if not all(isinstance(v, int) for v in values):
                continue
            array = np.array(values, dtype=np.int64).reshape(positions.shape)
            constant = ir.node("Constant", [], attributes={"value": ir.tensor(array)}, name=f"{node.name}_static")
            model.graph.insert_before(node, constant)
            constant.outputs[0].shape, constant.outputs[0].type = ir.Shape(array.shape), ir.TensorType(ir.DataType.INT64)
            ir.convenience.replace_all_uses_with(node.outputs[0], constant.outputs[0])
            count += 1
        return ir.passes.PassResult(model, modified=count > 0)
