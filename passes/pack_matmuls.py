"""Pack the parallel projections of one input (query/key/value, gate/up) into one MatMul."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import new_initializer, packed_matmul, replace_by_split


def _packable(node: ir.Node) -> bool:
    """A plain ``MatMul(x, W)``: ``W`` a 2-D initializer read by this node alone, the output
    no graph output."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    weight = node.inputs[1]
    return (
        weight is not None and weight.is_initializer() and weight.const_value is not None
        and weight.shape is not None and len(weight.shape) == 2 and len(weight.uses()) == 1
        and not weight.is_graph_input() and not weight.is_graph_output()
        and not node.outputs[0].is_graph_output()
    )


class PackParallelMatMulsPass(ir.passes.InPlacePass):
    """Rule: MatMuls ``x·W1, …, x·Wk`` (k ≥ 2) reading the same ``x``, each a plain MatMul with
    a constant 2-D weight of one dtype and one row count that nothing else reads, are
    ``Split(x·[W1 | … | Wk], axis=-1, sizes=[n1, …, nk])``: every output column is the same dot
    product of a row of ``x`` with a column of one ``Wi``. The parameters stay the same; ONNX
    Runtime runs one GEMM over the concatenated columns instead of k. The packed MatMul and its
    Split take the place of the first of the k; the Split's outputs keep the old output names.
    ``count`` is the number of MatMuls packed away (k - 1 per group).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.count = 0
        if graph.opset_imports.get("", 1) < 13:  # Split takes its sizes as an input from opset 13
            return ir.passes.PassResult(model, False)
        groups: dict[int, list[ir.Node]] = {}
        for node in graph:
            if _packable(node) and node.inputs[0] is not None:
                groups.setdefault(id(node.inputs[0]), []).append(node)
        for nodes in groups.values():
            weights = [n.inputs[1] for n in nodes]
            if len(nodes) < 2 or len({w.dtype for w in weights}) != 1 or len({w.shape[0] for w in weights}) != 1:
                continue
            self._pack(graph, nodes)
            self.count += len(nodes) - 1
        return ir.passes.PassResult(model, self.count > 0)

    @staticmethod
    def _pack(graph: ir.Graph, nodes: list[ir.Node]) -> None:
        weights = [n.inputs[1] for n in nodes]
        dtype = weights[0].dtype
        array = np.concatenate([np.asarray(w.const_value.numpy()) for w in weights], axis=1)
        first = nodes[0]
        packed = new_initializer(graph, f"{weights[0].name}.packed", array, dtype)
        sizes = new_initializer(graph, f"{weights[0].name}.packed_sizes",
                                np.array([int(w.shape[1]) for w in weights], dtype=np.int64))
        name = first.name or "matmul"
        matmul = packed_matmul(first, packed, f"{name}.packed")
        split = ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1},
                        num_outputs=len(nodes), name=f"{name}.packed_split")
        graph.insert_before(first, [matmul, split])
        replace_by_split(graph, nodes, split)
