"""Give shared per-channel constants a private copy per use."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import UNTIED_FROM

from graphresize.analysis.channels import FLOAT_TYPES


def _is_vector(value: ir.Value) -> bool:
    """A float constant whose only axis larger than 1 is the last (bias, gain, scale)."""
    tensor = value.const_value
    if tensor is None or value.dtype not in FLOAT_TYPES or len(tensor.shape) == 0:
        return False
    return tensor.shape[-1] > 1 and all(d == 1 for d in tensor.shape[:-1])


class UntieSharedVectorsPass(ir.passes.InPlacePass):
    """Rule: a float vector initializer read by several nodes (directly, or through an
    ``Identity``) gets one copy per reading node.

    Exporters deduplicate equal constants (zero biases, unit norm gains), which would glue
    unrelated layers into one width group. Weight matrices are left shared: a shared matrix is
    a real tie (embedding and LM head) that must stay tied. Each copy names its source in
    ``UNTIED_FROM`` metadata, so that cleanup can share the copies left equal again.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            source = node.inputs[0] if node.op_type == "Identity" and node.inputs else None
            if source is not None and source.is_initializer() and _is_vector(source) and not node.outputs[0].is_graph_output():
                copy = self._copy(graph, source, node.outputs[0].name)
                node.outputs[0].replace_all_uses_with(copy)
                graph.remove(node, safe=True)
                modified = True
        for value in list(graph.initializers.values()):
            if not _is_vector(value) or value.is_graph_input() or value.is_graph_output():
                continue
            uses = sorted(value.uses(), key=lambda u: (u.node.name or "", u.idx))
            for use in uses[1:]:
                copy = self._copy(graph, value, f"{value.name}.{use.node.name or use.idx}")
                use.node.replace_input_with(use.idx, copy)
                modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _copy(graph: ir.Graph, value: ir.Value, name: str) -> ir.Value:
        base, n = name, 0
        while name in graph.initializers:
            n += 1
            name = f"{base}.{n}"
        array = np.array(value.const_value.numpy(), copy=True)
        copy = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(value.dtype),
                        const_value=ir.tensor(array, dtype=value.dtype, name=name))
        copy.metadata_props[UNTIED_FROM] = value.name
        graph.register_initializer(copy)
        return copy
