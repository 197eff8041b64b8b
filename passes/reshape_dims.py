"""Fill in the dimension a ``Reshape`` infers (its ``-1``) where ONNX shape inference leaves it
unknown, so that fusions which read head counts off shapes still match a resized graph."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from graphresize.passes.edit import unnamed_dim

#: Rounds of infer-then-resolve; each round resolves the Reshapes the previous one shaped.
MAX_ROUNDS = 4


def inferred_dim(input_shape: ir.Shape, output_shape: ir.Shape) -> tuple[int, int] | None:
    """``(axis, size)`` of the one unknown entry of ``output_shape`` when the element count
    decides it: every other output entry is an int or a named dimension that the input has
    (each name used once), the input's named dimensions are all used, and the input's ints
    divide exactly by the output's. ``None`` otherwise."""
    unknown = [i for i, d in enumerate(output_shape) if unnamed_dim(d)]
    if len(unknown) != 1:
        return None
    size, names = 1, []
    for d in input_shape:
        if isinstance(d, int):
            size *= d
        elif unnamed_dim(d):
            return None
        else:
            names.append(d.value)
    known = 1
    for i, d in enumerate(output_shape):
        if i == unknown[0]:
            continue
        if isinstance(d, int):
            known *= d
        elif d.value in names:
            names.remove(d.value)
        else:
            return None
    if names or known <= 0 or size % known:
        return None
    return unknown[0], size // known


class ReshapeDimsPass(ir.passes.InPlacePass):
    """Rule: a ``Reshape`` output with exactly one unknown dimension gets it from the element
    count (:func:`inferred_dim`), then ONNX shape inference carries it on; repeated until no
    Reshape is left to resolve (at most ``MAX_ROUNDS``).

    Why: after heads are removed the exporters' ``view(B, S, -1, head_dim)`` has a head count
    only ``-1`` states, and ONNX shape inference cannot cancel the symbolic ``B·S`` against the
    input's, so the attention values stay unknown and onnxscript's rotary and attention
    fusions (which read the head count off shapes) do not fire. Written by hand: onnx_ir has
    no symbolic Reshape arithmetic.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for _ in range(MAX_ROUNDS):
            resolved = 0
            for node in model.graph:
                if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
                    continue
                x, out = node.inputs[0], node.outputs[0]
                if x is None or x.shape is None or out.shape is None:
                    continue
                found = inferred_dim(x.shape, out.shape)
                if found is not None:
                    dims = list(out.shape)
                    dims[found[0]] = found[1]
                    out.shape = ir.Shape(dims)
                    resolved += 1
            if not resolved:
                break
            modified = True
            common_passes.ShapeInferencePass()(model)
        return ir.passes.PassResult(model, modified)
