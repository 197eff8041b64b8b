"""DISP: every block reads and writes its own subset of the full-width residual stream
(``solve.disp`` chooses the subsets, ``passes.DispPass`` inserts the index-selects); MLP
groups are merged by DOTResize. The subsets are chosen at the rewrite, from the weights the
MLP solve left, so the residual group has no transform of its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphresize.analysis.groups import WidthGroup, WidthGroups
from graphresize.analysis.residual import ResidualLayout
from graphresize.calibrate.statistics import Statistics, StatRequest
from graphresize.errors import UnsupportedModelError, UsageError
from graphresize.methods.base import Method, RewriteContext, norm_passes
from graphresize.options import OptimizeOptions
from graphresize.plan.widths import GroupPlan, ResizePlan
from graphresize.solve import disp
from graphresize.solve.transforms import ChannelTransform


class Disp(Method):
    """``disp``: every block reads and writes its own subset of the stream, made of whole
    blocks of 8 features. The features are grouped into blocks of 8 that the free subsets
    (each site's top-scoring single features under the global budget) hold at the same sites
    (``solve.disp.block_order``), the stream is permuted once (exactly) into that order, and
    every site keeps its top-scoring blocks under the same budget. Each read and write is then
    a ``Gather`` on the block axis of a ``[..., D/8, 8]`` view (no ``Expand``, 8-float copies
    per index): about half the index-node time of free subsets, and on SmolLM2-135M better
    one-shot and healed perplexity on two texts at 0.2 and 0.3 (``benchmarks/disp_overhead.md``).
    A width that 8 does not divide gets free subsets."""

    #: dotresize+disp: rotate into the principal basis, nested prefixes of one width
    composed = False
    #: nested subsets (prefixes of one feature order: ``Slice``/``Pad`` only); None: the
    #: method's own choice (``disp``: not nested; ``dotresize+disp``: nested)
    nested: bool | None = None
    #: > 1: subsets of whole blocks of this many features (``solve.disp.allocate``); 1: free
    #: subsets of single features
    block: int = 8

    def check(self, options: OptimizeOptions, kinds: frozenset[str]) -> None:
        if "residual" not in kinds:
            raise UsageError(f"--method {options.method} selects subsets of the residual stream: use --target residual or all")
        if options.kind_ratios.get("residual", options.ratio) <= 0:
            raise UsageError(f"--method {options.method} needs a positive residual ratio")

    def stat_requests(self, group: WidthGroup, layouts: Mapping[str, ResidualLayout]) -> list[StatRequest]:
        """One unit-RMS request per block junction (keys ``GROUP#jN``)."""
        if group.id not in layouts:
            return super().stat_requests(group, layouts)
        layout = layouts[group.id]
        return [
            StatRequest(f"{group.id}#j{i}", group.width, (j.stream,), unit_rms=True)
            for i, j in enumerate(layout.junctions[: disp.block_junctions(layout)])
        ]

    def solve(self, entry: GroupPlan, stats: Statistics, options: OptimizeOptions) -> ChannelTransform | None:
        if entry.kind == "residual":
            return None  # subsets are chosen at the rewrite, from the weights left by the MLP solve
        return super().solve(entry, stats, options)

    def rewrite_passes(self, ctx: RewriteContext) -> list[ir.passes.PassBase]:
        from graphresize.passes import ResizeGroupsPass

        select = [DispSelectPass(ctx, self.composed, self.nested, self.block)] if ctx.layouts else []
        return [ResizeGroupsPass(ctx.groups, ctx.transforms), *select, *norm_passes(ctx)]

    def final_plan(self, plan: ResizePlan, ctx: RewriteContext) -> ResizePlan:
        """The stream keeps its width; the per-block widths are in ``ctx.selection``."""
        if ctx.selection is None:
            return plan
        return dataclasses.replace(plan, entries=tuple(
            dataclasses.replace(e, new_width=e.width) if e.group_id in ctx.layouts else e for e in plan.entries))


class DispNested(Disp):
    """``disp-nested``: ``disp`` with nested subsets, each block keeping a prefix of one
    global feature order (``solve.disp.global_order``) under the same global budget; the
    stream is permuted once into that order, so every read is a ``Slice`` and every write a
    ``Pad`` + ``Add`` (ORT's norm fusions still fire). Slightly faster in ORT than ``disp``'s
    blocks, lower one-shot quality (``benchmarks/disp_overhead.md``); hence an option."""

    nested = True


class DispFree(Disp):
    """``disp-free``: ``disp`` with free subsets of single features (DISP-LLM's granularity):
    each site keeps its top-scoring features under the global budget, read by an element-wise
    ``GatherElements`` with an ``Expand``-ed index and written by ``x + GatherElements(u, ·)``.
    The reference for ``disp``'s blocks: about twice their index-node time on ORT CPU
    (``benchmarks/disp_overhead.md``)."""

    block = 1


class DispSelectPass(ir.passes.InPlacePass):
    """Choose the DISP subsets of the residual group from the current weights and rewrite the
    graph (``apply_disp``); the selection is left in ``ctx.selection``."""

    def __init__(self, ctx: RewriteContext, composed: bool, nested: bool | None = None, block: int = 1) -> None:
        super().__init__()
        self.ctx = ctx
        self.composed = composed
        self.nested = nested
        self.block = block

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ctx = self.ctx
        ctx.selection = apply_disp(model, ctx.groups, ctx.layouts, ctx.stats, ctx.options, composed=self.composed, nested=self.nested,
                                   block=self.block)
        return ir.passes.PassResult(model, modified=True)


def apply_disp(
    model: ir.Model, groups: WidthGroups, layouts: Mapping[str, ResidualLayout], stats, options,
    *, composed: bool | None = None, basis: str | None = None, nested: bool | None = None, refit: bool = False, **allocation,
) -> disp.DispSelection:
    """Choose the DISP subsets of the (single) residual group and rewrite the graph.

    ``disp``: subsets of the stream's own features under one global budget.
    ``dotresize+disp`` (``composed``): the stream is first rotated (exactly) into the principal
    basis of its calibration Gram, and every block keeps a prefix of it (nested subsets:
    ``Slice`` and ``Pad`` only), all of the same width ``(1 - ratio)·D``. Writers are scored by
    their calibrated outputs when ``stats`` hold them (``GROUP#wN``, requested by measurement
    scripts), else by weight norms; ``refit``: readers refit by least squares
    (``disp.lsq_readout``). ``basis``/``nested``/``allocation`` override the method's choices
    (measurements in the README: the defaults are the best found). ``composed`` defaults to
    ``options.method == "dotresize+disp"``.
    """
    from graphresize.passes import DispPass, ResizeGroupsPass
    from graphresize.solve.residual import principal_basis

    if len(layouts) != 1:
        raise UnsupportedModelError(f"--method {options.method} handles one residual stream, found {len(layouts)}")
    ((gid, layout),) = layouts.items()
    group = groups.by_id(gid)
    writers = disp.find_writers(model.graph, group)
    n = disp.block_junctions(layout)
    labels = disp.site_labels(model.graph, layout, writers) if not isinstance(writers, str) else writers
    if isinstance(labels, str):
        raise UnsupportedModelError(f"--method {options.method}: residual stream not recognised ({labels})")
    if composed is None:
        composed = options.method == "dotresize+disp"
    basis = basis or ("pca" if composed else "identity")
    nested = composed if nested is None else nested
    if composed:  # measured on SmolLM2: in the principal basis one width for all blocks beats the global budget
        allocation.setdefault("uniform", True)
    grams = [stats.groups[f"{gid}#j{i}"].gram for i in range(n)]
    outs = [stats.groups[f"{gid}#w{i}"].gram for i in range(len(writers))] if f"{gid}#w0" in stats.groups else None
    rotation = principal_basis(sum(grams), group.width) if basis == "pca" else np.eye(group.width)
    grams = disp.rotate(grams, rotation)
    outs = disp.rotate(outs, rotation) if outs is not None else None
    ratio = options.kind_ratios.get("residual", options.ratio)
    in_scores = disp.input_scores(model.graph, layout, grams) if basis == "identity" else _rotated_input_scores(model, layout, grams, rotation)
    out_scores = disp.output_scores(model.graph, writers, outs) if outs is not None else _rotated_output_scores(model, writers, rotation)
    selection = disp.select(
        gid, group.width, in_scores, out_scores,
        [j.output for j in layout.junctions[:n]], [w.node for w in writers], ratio, options.multiple_of, nested, labels, **allocation,
    )
    if selection.block > 1:  # the order the blocks were cut from: every subset a union of aligned blocks
        order = np.asarray(selection.order)
    else:  # nested: the shared order itself (every subset a prefix of it)
        order = disp.range_order(selection, disp.global_order(list(in_scores) + list(out_scores)) if nested else None)
    if order is not None:  # one permutation of the stream makes every subset a range (nested: a prefix)
        rotation = rotation[:, order]
        grams = [g[np.ix_(order, order)] for g in grams]
        selection = selection.reindexed(order)
    if not np.array_equal(rotation, np.eye(group.width)):
        ResizeGroupsPass(groups, {gid: ChannelTransform(gid, rotation, rotation.T, method="rotation")})(model)
    readouts = {}
    if refit:
        readouts = {s.site: disp.lsq_readout(g, s.keep) for s, g in zip(selection.inputs, grams, strict=True) if s.width < group.width}
    DispPass(layout, writers, selection, readouts)(model)
    return dataclasses.replace(selection, basis="principal" if basis == "pca" else "stream", readers="lsq" if readouts else "select")


def _rotated_input_scores(model: ir.Model, layout: ResidualLayout, grams, rotation: np.ndarray) -> list[np.ndarray]:
    """Wanda input scores in the rotated basis: reader rows ``BᵀW``."""
    scores = []
    for readers, gram in zip(layout.readers, grams, strict=False):
        weight = np.zeros(rotation.shape[1])
        for reader in readers:
            w = np.moveaxis(np.asarray(model.graph.initializers[reader.weight].const_value.numpy(), dtype=np.float64), reader.axis, 0)
            weight += np.square(rotation.T @ w.reshape(w.shape[0], -1)).sum(axis=1)
        scores.append(np.sqrt(np.maximum(np.diag(gram), 0.0)) * np.sqrt(weight))
    return scores


def _rotated_output_scores(model: ir.Model, writers, rotation: np.ndarray) -> list[np.ndarray]:
    """Writer column norms in the rotated basis: ``W·B``."""
    scores = []
    for w in writers:
        array = np.moveaxis(np.asarray(model.graph.initializers[w.weight].const_value.numpy(), dtype=np.float64), w.axis, -1)
        scores.append(np.sqrt(np.square(array.reshape(-1, array.shape[-1]) @ rotation).sum(axis=0)))
    return scores
