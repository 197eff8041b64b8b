"""Rewrite passes of graphresize, built on ``onnx_ir.passes``.

Each pass applies one rule to the graph; analysis and math live in ``graphresize``.
"""

from graphresize.passes.cleanup import cleanup_passes
from graphresize.passes.prepare import prepare_passes
from graphresize.passes.resize_groups import ResizeGroupsPass
from graphresize.passes.resize_heads import ResizeHeadsPass

__all__ = ["ResizeGroupsPass", "ResizeHeadsPass", "cleanup_passes", "prepare_passes"]
