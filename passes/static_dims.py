"""Fold ``Gather(Shape(x), i)`` to a constant where the dimensions it reads are static."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import unnamed_dim


def forget_unnamed_shapes(model: ir.Model) -> int:
    """Drop every node output shape with a dimension ONNX shape inference invented (``unk__N``)
    or left unknown, so that the next inference derives it afresh (ONNX shape inference keeps a
    shape already recorded). Graph outputs keep theirs. Returns how many were dropped."""
    dropped = 0
    for node in model.graph:
        for value in node.outputs:
            if value.shape is not None and not value.is_graph_output() and any(unnamed_dim(d) for d in value.shape):
                value.shape = None
                dropped += 1
    return dropped


def dims_read(gather: ir.Node) -> tuple[list, np.ndarray] | None:
    """For ``Gather(Shape(x, start, end), i, axis=0)`` with a constant index: the entries of
    ``x.shape[start:end]`` it reads (ints or symbolic dims, in index order) and the index array;
    None for any other node, an unknown shape or an index out of range."""
    if gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx") or gather.inputs[0] is None:
        return None
    shape_node = gather.inputs[0].producer()
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.domain not in ("", "ai.onnx"):
        return None
    x, index = shape_node.inputs[0], ir.convenience.get_const_tensor(gather.inputs[1])
    if x is None or x.shape is None or index is None or gather.attributes.get_int("axis", 0) != 0:
        return None
    dims = list(x.shape)[shape_node.attributes.get_int("start", 0):shape_node.attributes.get_int("end", len(x.shape))]
    positions = np.asarray(index.numpy()).astype(np.int64)
    if positions.size and not (-len(dims) <= positions.min() and positions.max() < len(dims)):
        return None
    return [dims[int(p)] for p in positions.reshape(-1)], positions


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
            found = dims_read(node)
            if found is None or node.outputs[0].is_graph_output():
                continue
            values, positions = found
            if not all(isinstance(v, int) for v in values):
                continue
            array = np.array(values, dtype=np.int64).reshape(positions.shape)
            constant = ir.node("Constant", [], attributes={"value": ir.tensor(array)}, name=f"{node.name}_static")
            model.graph.insert_before(node, constant)
            constant.outputs[0].shape, constant.outputs[0].type = ir.Shape(array.shape), ir.TensorType(ir.DataType.INT64)
            ir.convenience.replace_all_uses_with(node.outputs[0], constant.outputs[0])
            count += 1
        return ir.passes.PassResult(model, modified=count > 0)
