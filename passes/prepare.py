"""Normalise an exported graph so that analysis sees names, initializers and shapes."""

from __future__ import annotations

import onnx_ir as ir
from graphresize.passes.contrib_shapes import ContribShapeInferencePass
from graphresize.passes.unpack import UnpackSplitMatMulPass
from graphresize.passes.untie import UntieSharedVectorsPass
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    NameFixPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
)


def prepare_passes() -> ir.passes.PassManager:
    """Unique names for every node and value; weight-sized ``Constant`` nodes lifted to
    initializers (the rewrite edits initializers); shared bias/gain vectors untied; packed
    projections split into one MatMul per part; unused nodes and initializers dropped; ONNX shape inference so that every
    activation has a known last-axis size (legacy exports carry no shapes), and ONNX Runtime's
    symbolic inference behind ``com.microsoft`` ops, which ONNX's skips."""
    return ir.passes.PassManager(
        [
            NameFixPass(),
            LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
            UntieSharedVectorsPass(),
            UnpackSplitMatMulPass(),
            RemoveUnusedNodesPass(),
            ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True),
            ContribShapeInferencePass(),
        ]
    )
