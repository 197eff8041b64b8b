"""Activation-norm pruning: keep the neurons (MLP) or stream features (residual) of largest
calibrated norm, readers refit by least squares or kept as they are (``--unmerge``)."""

from __future__ import annotations

from graphresize.calibrate.statistics import GroupStats
from graphresize.methods.base import Method
from graphresize.options import OptimizeOptions, unmerge_for
from graphresize.plan.widths import GroupPlan
from graphresize.solve.transforms import ChannelTransform


class Prune(Method):
    residual_method = "prune"

    def solve_mlp(self, entry: GroupPlan, stats: GroupStats, options: OptimizeOptions) -> ChannelTransform:
        from graphresize.solve.merge import prune

        return prune(entry.group_id, stats, entry.new_width, unmerge=unmerge_for(options, "mlp"))
