"""Rewrite passes of graphresize, built on ``onnx_ir.passes``.

Each pass applies one rule to the graph; analysis and math live in ``graphresize``.
"""

from graphresize.passes.cleanup import cleanup_passes
from graphresize.passes.disp import DispPass
from graphresize.passes.fold_norms import FoldNormAffinePass
from graphresize.passes.layernorm_to_rms import LayerNormToRMSNormPass
from graphresize.passes.manager import RewriteManager
from graphresize.passes.prepare import prepare_passes
from graphresize.passes.rescale_norms import RescaleNormsPass
from graphresize.passes.resize_groups import ResizeGroupsPass
from graphresize.passes.resize_heads import ResizeHeadsPass
from graphresize.passes.retie import RetieWeightsPass
from graphresize.passes.skip_layernorm import DecomposeSkipLayerNormPass

__all__ = [
    "DispPass",
    "FoldNormAffinePass",
    "LayerNormToRMSNormPass",
    "RescaleNormsPass",
    "ResizeGroupsPass",
    "ResizeHeadsPass",
    "RetieWeightsPass",
    "RewriteManager",
    "DecomposeSkipLayerNormPass",
    "cleanup_passes",
    "prepare_passes",
]
