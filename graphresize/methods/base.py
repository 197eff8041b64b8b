"""The strategy every resizing method implements, and the default behaviour of each hook.

The pipeline calls, in this order:

``check(options, kinds)``
    refuse option combinations the method cannot run (``UsageError``);
``stat_requests(group, layouts)``
    the calibration statistics one changed group needs;
``solve(entry, stats, options)``
    the ``ChannelTransform`` of one changed plan entry, or None when the method chooses that
    group's widths at the rewrite (DISP);
``rewrite_passes(ctx)``
    the rewrite passes in the order they run (the pipeline adds the cleanup);
``final_plan(plan, ctx)``
    the plan the report shows, after the rewrite.

A method that only changes how MLP and residual groups are solved overrides ``solve_mlp`` /
``solve_residual``; see ``graphresize/methods/prune.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import onnx_ir as ir

from graphresize.analysis.groups import WidthGroup, WidthGroups
from graphresize.analysis.residual import ResidualLayout
from graphresize.calibrate.statistics import GroupStats, Statistics, StatRequest
from graphresize.options import OptimizeOptions, unmerge_for
from graphresize.plan.widths import GroupPlan, ResizePlan
from graphresize.solve.transforms import ChannelTransform


@dataclasses.dataclass(eq=False)
class RewriteContext:
    """What the rewrite stage hands a method: the model, its analysis (groups and the
    residual layouts of the changed residual groups), the statistics and the solved
    transforms; ``selection`` is filled by methods that choose per-block subsets (DISP)."""

    model: ir.Model
    groups: WidthGroups
    layouts: Mapping[str, ResidualLayout]
    stats: Statistics | None
    transforms: Mapping[str, ChannelTransform]
    options: OptimizeOptions
    selection: object | None = None


def stat_request(group: WidthGroup, layouts: Mapping[str, ResidualLayout]) -> StatRequest:
    """MLP groups: the anchor's rows. Residual groups: the unit-RMS stream at every junction."""
    if group.id in layouts:
        streams = tuple(j.stream for j in layouts[group.id].junctions)
        return StatRequest(group.id, group.width, streams, unit_rms=True)
    return StatRequest.anchor(group)


def norm_passes(ctx: RewriteContext) -> list[ir.passes.PassBase]:
    """After a residual group changed width: its RMS norms rescaled to the new width, and the
    LM head re-tied to the embedding where the rewrite left them equal."""
    from graphresize.passes import RescaleNormsPass, RetieWeightsPass

    if not ctx.layouts:
        return []
    widths = {gid: (t.width, t.new_width) for gid, t in ctx.transforms.items() if gid in ctx.layouts}
    return [RescaleNormsPass([ctx.layouts[gid] for gid in widths], widths), RetieWeightsPass()]


class Method:
    """Default strategy: OT merge on MLP groups, the method's own residual transform on the
    stream, one ``ResizeGroupsPass`` for all transforms."""

    #: the ``method`` recorded in residual transforms (``solve.residual.residual_transform``)
    residual_method: str = "dotresize"

    def check(self, options: OptimizeOptions, kinds: frozenset[str]) -> None:
        """Raise ``UsageError`` for options this method cannot run."""

    def stat_requests(self, group: WidthGroup, layouts: Mapping[str, ResidualLayout]) -> list[StatRequest]:
        return [stat_request(group, layouts)]

    def solve(self, entry: GroupPlan, stats: Statistics, options: OptimizeOptions) -> ChannelTransform | None:
        group_stats = stats.groups[entry.group_id]
        if entry.kind == "residual":
            return self.solve_residual(entry, group_stats, options)
        return self.solve_mlp(entry, group_stats, options)

    def solve_mlp(self, entry: GroupPlan, stats: GroupStats, options: OptimizeOptions) -> ChannelTransform:
        from graphresize.solve.merge import ot_merge

        return ot_merge(entry.group_id, stats, entry.new_width, reg=options.reg, metric=options.metric,
                        target_mass=options.target_mass, unmerge=unmerge_for(options, "mlp"))

    def solve_residual(self, entry: GroupPlan, stats: GroupStats, options: OptimizeOptions) -> ChannelTransform:
        from graphresize.solve.residual import residual_transform

        return residual_transform(
            entry.group_id, stats, entry.new_width, method=self.residual_method, unmerge=unmerge_for(options, "residual"),
            reg=options.reg, metric=options.metric, target_mass=options.target_mass,
        )

    def rewrite_passes(self, ctx: RewriteContext) -> list[ir.passes.PassBase]:
        from graphresize.passes import ResizeGroupsPass

        return [ResizeGroupsPass(ctx.groups, ctx.transforms), *norm_passes(ctx)]

    def final_plan(self, plan: ResizePlan, ctx: RewriteContext) -> ResizePlan:
        return plan
