"""Cleanup after a rewrite: drop what no longer feeds an output and keep the graph sorted."""

from __future__ import annotations

import onnx_ir as ir
from graphresize.passes.reshare import ReshareUntiedConstantsPass
from graphresize.passes.unpack import RepackSplitMatMulPass
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass


def cleanup_passes() -> ir.passes.PassManager:
    """Repack projections unpacked for the analysis, share again the constants preparation
    copied and the rewrite left equal, remove nodes and initializers left without users, then
    sort topologically."""
    return ir.passes.PassManager(
        [RepackSplitMatMulPass(), ReshareUntiedConstantsPass(), RemoveUnusedNodesPass(), TopologicalSortPass()]
    )
