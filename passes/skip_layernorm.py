"""Split ORT's fused ``SkipLayerNormalization`` into the residual ``Add`` and a
``LayerNormalization``, so that a routed stream's LayerNorms can become RMS norms."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir


class DecomposeSkipLayerNormPass(ir.passes.InPlacePass):
    """Rule: ``SkipLayerNormalization(x, skip, γ, β, b)`` (com.microsoft) computes
    ``s = x + b + skip`` (``b`` optional) and ``LayerNormalization(s, γ, β)`` over the last
    axis with its ``epsilon``; its fourth output is ``s``. It becomes ``Add(x, b)`` (the writer's
    bias, where an unfused graph has it), ``Add(·, skip)`` and ``LayerNormalization(axis=-1)``;
    uses of the sum move to the ``Add``. Exact up to float rounding of the sum's order.

    Applies to the nodes named in ``names`` whose mean and inverse-std outputs are unused
    (ORT's fusions never use them); others are left as they are.
    """

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.names = frozenset(names)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.name not in self.names or node.op_type != "SkipLayerNormalization":
                continue
            outputs = list(node.outputs) + [None] * (4 - len(node.outputs))
            if any(out is not None and (out.uses() or out.is_graph_output()) for out in outputs[1:3]):
                continue
            _decompose(graph, node, outputs[0], outputs[3])
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _decompose(graph: ir.Graph, node: ir.Node, out: ir.Value, total: ir.Value | None) -> None:
    x, skip, gain = node.inputs[0], node.inputs[1], node.inputs[2]
    beta = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    name = node.name
    chain = []
    if bias is not None:
        chain.append(ir.node("Add", [x, bias], name=f"{name}.bias"))
        x = chain[-1].outputs[0]
    chain.append(ir.node("Add", [x, skip], name=f"{name}.residual"))
    summed = chain[-1].outputs[0]
    inputs = [summed, gain] + ([beta] if beta is not None else [])
    epsilon = node.attributes.get_float("epsilon", 1e-12)
    norm = ir.node("LayerNormalization", inputs, attributes={"axis": -1, "epsilon": epsilon}, name=f"{name}.norm")
    chain.append(norm)
    for new in chain:
        new.outputs[0].name = new.name
        new.outputs[0].dtype = out.dtype
        new.outputs[0].shape = out.shape
    graph.insert_before(node, chain)
    if total is not None:
        total.replace_all_uses_with(summed)
        if total.is_graph_output():
            graph.outputs[list(graph.outputs).index(total)] = summed
    out.replace_all_uses_with(norm.outputs[0])
    if out.is_graph_output():
        position = list(graph.outputs).index(out)
        old = out.name
        out.name = f"{old}.fused"
        norm.outputs[0].name = old
        graph.outputs[position] = norm.outputs[0]
    graph.remove(node, safe=True)
