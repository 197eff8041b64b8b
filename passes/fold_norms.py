"""Fold norm gains and biases into the linear maps that read the norm output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import add_after, private_weight, set_initializer

from graphresize.analysis.residual import Reader, ResidualLayout


class FoldNormAffinePass(ir.passes.InPlacePass):
    """Rule: a junction output ``y = n·γ + β`` read only by linear maps ``y·W + c`` becomes
    ``n·1`` (γ set to ones, β to zeros or its ``Add`` removed) and every reader becomes
    ``n·(diag(γ)·W) + (β·W + c)``. A reader weight that is also used elsewhere (a tied
    embedding) gets a private copy first. Exact: the outputs do not change.
    """

    def __init__(self, layouts: Sequence[ResidualLayout]) -> None:
        super().__init__()
        self.layouts = tuple(layouts)

    def requires(self, model: ir.Model) -> None:
        for layout in self.layouts:
            if layout.frozen:
                raise ir.passes.PreconditionError(f"{layout.group_id} is frozen: {layout.frozen}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        modified = False
        for layout in self.layouts:
            for junction, readers in zip(layout.junctions, layout.readers, strict=True):
                gain = _vector(graph, junction.gain)
                bias = _vector(graph, junction.bias)
                for reader in readers:
                    _fold_into_reader(graph, nodes, reader, gain, bias)
                if gain is not None:
                    set_initializer(graph, junction.gain, np.ones_like(gain))
                if bias is not None:
                    if junction.bias_node is not None:
                        node = nodes[junction.bias_node]
                        kept = next(v for v in node.inputs if v.name != junction.bias)
                        node.outputs[0].replace_all_uses_with(kept)
                        graph.remove(node, safe=True)
                    else:
                        set_initializer(graph, junction.bias, np.zeros_like(bias))
                modified = True
        return ir.passes.PassResult(model, modified=modified)


def _vector(graph: ir.Graph, name: str | None) -> np.ndarray | None:
    if name is None:
        return None
    return np.asarray(graph.initializers[name].const_value.numpy()).reshape(-1).astype(np.float64)


def _fold_into_reader(graph: ir.Graph, nodes: dict, reader: Reader, gain, bias) -> None:
    node = nodes[reader.node]
    weight = private_weight(graph, node, 1)
    array = weight.const_value.numpy()
    work = np.moveaxis(array.astype(np.float64), reader.axis, 0)  # [features, out]
    if bias is not None:
        shift = bias @ work.reshape(work.shape[0], -1)
        _add_bias(graph, node, reader, shift)
    if gain is not None:
        work = work * gain.reshape((-1,) + (1,) * (work.ndim - 1))
        set_initializer(graph, weight.name, np.moveaxis(work, 0, reader.axis).astype(array.dtype))


def _add_bias(graph: ir.Graph, node: ir.Node, reader: Reader, shift: np.ndarray) -> None:
    """``reader``'s output gets ``+ shift``: into its existing bias, else through a new one."""
    if reader.bias is not None:
        old = graph.initializers[reader.bias].const_value.numpy()
        set_initializer(graph, reader.bias, (old.astype(np.float64) + shift.reshape(old.shape)).astype(old.dtype))
        return
    dtype = node.outputs[0].dtype or ir.DataType.FLOAT
    name = f"{node.name}.folded_bias"
    value = ir.Value(name=name, const_value=ir.tensor(shift.astype(dtype.numpy()), name=name))
    value.shape, value.dtype = ir.Shape(shift.shape), dtype
    graph.register_initializer(value)
    add_after(graph, node, "Add", [value], name=f"{node.name}.add_folded_bias")
