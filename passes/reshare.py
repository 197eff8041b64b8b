"""Share again the constants that preparation copied and the rewrite left equal."""

from __future__ import annotations

import hashlib

import onnx_ir as ir
from graphresize.passes.edit import UNTIED_FROM


class ReshareUntiedConstantsPass(ir.passes.InPlacePass):
    """Rule: an initializer copied from ``E`` during preparation (its ``UNTIED_FROM``
    metadata names ``E``) whose dtype, shape and bytes still equal those of ``E``, or of an
    earlier copy of ``E``, is replaced by that one; so a region the rewrite did not touch keeps
    the sharing, and the parameter count, that the exporter gave it.

    Only copies are merged, never two constants that were distinct in the input: equal
    content alone (onnx_ir's ``DeduplicateInitializersPass``) would also merge constants the
    exporter kept apart, and the written count would then drop below the input's for an
    untouched graph.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        keepers: dict[tuple, ir.Value] = {}
        modified = False
        # originals first, so that a group keeps the exporter's name
        values = sorted(graph.initializers.values(), key=lambda v: UNTIED_FROM in v.metadata_props)
        for value in values:
            key = _key(value.metadata_props.get(UNTIED_FROM, value.name), value)
            if key is None or value.is_graph_input() or value.is_graph_output():
                continue
            keeper = keepers.setdefault(key, value)
            if keeper is not value:
                value.replace_all_uses_with(keeper)
                graph.initializers.pop(value.name)
                modified = True
        return ir.passes.PassResult(model, modified=modified)


def _key(origin: str, value: ir.Value) -> tuple | None:
    tensor = value.const_value
    if tensor is None:
        return None
    # a SHA-256 of the bytes, not the bytes: the keys of every initializer would otherwise hold
    # a copy of all the weights at once (the segment engine reads them from disk one by one)
    return origin, tensor.dtype, tuple(tensor.shape), hashlib.sha256(tensor.tobytes()).digest()
