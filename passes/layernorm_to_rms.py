"""Turn the LayerNorms of a residual stream into RMSNorms (SliceGPT's conversion)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import new_initializer, set_initializer

from graphresize.analysis.channels import PRODUCER, VECTOR
from graphresize.analysis.groups import WidthGroup
from graphresize.analysis.residual import ResidualLayout


class LayerNormToRMSNormPass(ir.passes.InPlacePass):
    """Rule: centre every writer of the stream along the stream axis (embedding rows,
    writer columns, writer biases), so the stream has zero mean over its features; then
    ``LayerNormalization(x, γ, β)`` equals ``x / √(mean(x²) + ε) · γ + β`` and is replaced by
    the chain ``Pow → ReduceMean → Add(ε) → Sqrt → Div → Mul(γ) [→ Add(β)]``, the form ORT
    fuses into ``SimplifiedLayerNormalization``. Exact: the outputs do not change.

    Applies to a residual group whose junctions are all ``LayerNormalization`` ops.
    """

    def __init__(self, pairs: Sequence[tuple[WidthGroup, ResidualLayout]]) -> None:
        super().__init__()
        self.pairs = tuple(pairs)

    def requires(self, model: ir.Model) -> None:
        for group, layout in self.pairs:
            if layout.frozen or any(j.form != "LayerNormalization" for j in layout.junctions):
                raise ir.passes.PreconditionError(f"{group.id}: not a stream read only through LayerNormalization")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 18)
        nodes = {node.name: node for node in graph}
        gains = set()
        for group, layout in self.pairs:
            gains |= layout.gains()
            for ref in group.params:
                if ref.role in (PRODUCER, VECTOR) and ref.name not in gains:
                    array = graph.initializers[ref.name].const_value.numpy()
                    work = array.astype(np.float64)
                    centred = work - work.mean(axis=ref.axis, keepdims=True)
                    set_initializer(graph, ref.name, centred.astype(array.dtype))
            for junction in layout.junctions:
                _replace_layernorm(graph, nodes[junction.node], opset)
        return ir.passes.PassResult(model, modified=bool(self.pairs))


def _replace_layernorm(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    x, gain = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if any(out is not None and out.uses() for out in node.outputs[1:]):
        raise ValueError(f"{node.name}: LayerNormalization mean/inv-std outputs are used")
    dtype = x.dtype.numpy()
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    two = new_initializer(graph, f"{node.name}.two", np.array(2.0, dtype=dtype))
    eps = new_initializer(graph, f"{node.name}.eps", np.array(epsilon, dtype=dtype))
    name = node.name
    square = ir.node("Pow", [x, two], name=f"{name}.pow")
    if opset >= 18:
        axes = new_initializer(graph, f"{name}.axes", np.array([-1], dtype=np.int64))
        mean = ir.node("ReduceMean", [square.outputs[0], axes], attributes={"keepdims": 1, "noop_with_empty_axes": 0},
                       name=f"{name}.mean")
    else:
        mean = ir.node("ReduceMean", [square.outputs[0]], attributes={"axes": [-1], "keepdims": 1}, name=f"{name}.mean")
    add = ir.node("Add", [mean.outputs[0], eps], name=f"{name}.add_eps")
    sqrt = ir.node("Sqrt", [add.outputs[0]], name=f"{name}.sqrt")
    div = ir.node("Div", [x, sqrt.outputs[0]], name=f"{name}.div")
    scale = ir.node("Mul", [div.outputs[0], gain], name=f"{name}.gain")
    chain = [square, mean, add, sqrt, div, scale]
    if bias is not None and np.any(bias.const_value.numpy() != 0):
        chain.append(ir.node("Add", [scale.outputs[0], bias], name=f"{name}.bias"))
    for new in chain:
        new.outputs[0].name = new.name
        new.outputs[0].dtype = x.dtype
    graph.insert_before(node, chain)
    node.outputs[0].replace_all_uses_with(chain[-1].outputs[0])
    graph.remove(node, safe=True)
