"""SliceGPT (Ashkboos et al., 2024) in graphresize: one principal basis per norm junction, the
change of basis on every skip path as a ``d_a×d_b`` shortcut matrix, residual groups only.

Junction ``k``'s basis ``Q_k`` is the top-``d`` eigenvectors of the Gram of the stream entering
its norm (SliceGPT's ``pca_calc`` on the raw norm input; ``unit_rms = True`` scales every row
to unit RMS first, what the norm hands its readers). As in SliceGPT's defaults the LM head is
not sliced: the final norm keeps the full width (its basis is the identity, so the head is
the folded original and the last skip matrix is ``Q_{L-1}ᵀ``). The tied embedding and LM head
are untied by the γ folding that routing needs; ``RetieWeightsPass`` re-ties them only where a
``d×d`` map in front of the head fits within its tolerance (the parameter count shows which).

Statistics are requested per junction (keys ``GROUP/jN``), each solved on its own
(``solve_junction``). ``sequential = True`` (SliceGPT's ``rotate_and_slice_sequential``):
the segment engine walks the junctions in stream order and solves junction ``k`` from the
stream that the model already sliced at junctions ``< k`` produces (``engine/junction_walk``);
through the whole-model engine (``--stats-cache``, a graph that does not cut) every junction
is solved from the dense model's stream instead, in one pass. As SliceGPT's layernorm fusion,
each embedding row is first centred (``center_embedding``). SliceGPT's other defaults need no
counterpart: its ``final_orientation = random`` turns each kept basis by a random rotation
inside its span, which the next norm (dividing by ``D``, rotation-invariant) and every reader,
writer and skip absorb exactly; its diagonal damping does not move eigenvectors.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphresize.analysis.groups import WidthGroup
from graphresize.analysis.residual import ResidualLayout
from graphresize.calibrate.statistics import GroupStats, Statistics, StatRequest
from graphresize.errors import UnsupportedModelError, UsageError
from graphresize.methods.base import Method, RewriteContext
from graphresize.options import OptimizeOptions
from graphresize.plan.widths import GroupPlan
from graphresize.solve.transforms import ChannelTransform


def junction_key(group_id: str, k: int) -> str:
    return f"{group_id}/j{k}"


class SliceGPT(Method):
    #: how each junction's basis is solved (``solve.junctions.basis_for``)
    basis_method = "pca"
    #: Gram of unit-RMS rows (the norm's output) instead of the raw norm input (SliceGPT)
    unit_rms = False
    #: slice the final junction too (SliceGPT's ``--slice-head``; default: full-width head)
    slice_head = False
    #: junction ``k`` solved from the stream of the model already sliced before ``k``
    sequential = True
    #: subtract each embedding row's mean before calibrating (SliceGPT's layernorm fusion does
    #: it on every model, RMSNorm ones included, which changes their function slightly: SmolLM2
    #: dense PTB 59.02 -> 59.065). On, the peer's table is reproduced (PTB 458.18 against its
    #: 458.2 at width 456); off, the same run gives 442.6 (benchmarks/slicegpt.md)
    center_embedding = True

    def __init__(self) -> None:
        self._bases: dict = {}
        self._junctions: dict[str, int] = {}

    def check(self, options: OptimizeOptions, kinds: frozenset[str]) -> None:
        if "mlp" in kinds and options.kind_ratios.get("mlp", options.ratio) > 0:
            raise UsageError(f"--method {options.method} slices the residual stream only: use --target residual (or --ratio-mlp 0)")

    def stat_requests(self, group: WidthGroup, layouts: Mapping[str, ResidualLayout]) -> list[StatRequest]:
        if group.id not in layouts:
            return super().stat_requests(group, layouts)
        junctions = layouts[group.id].junctions
        self._junctions[group.id] = len(junctions)
        return [StatRequest(junction_key(group.id, k), group.width, (j.stream,), unit_rms=self.unit_rms)
                for k, j in enumerate(junctions)]

    def widths(self, entry: GroupPlan, count: int) -> list[int]:
        """``d`` at every junction, the final one kept at ``D`` unless ``slice_head``."""
        widths = [entry.new_width] * count
        if not self.slice_head:
            widths[-1] = entry.width
        return widths

    def solve(self, entry: GroupPlan, stats: Statistics, options: OptimizeOptions) -> ChannelTransform | None:
        if entry.kind != "residual":
            return super().solve(entry, stats, options)
        count = self._junctions[entry.group_id]
        widths = self.widths(entry, count)
        bases = [self.solve_junction(stats.groups[junction_key(entry.group_id, k)], widths[k], options) for k in range(count)]
        return self.adopt(entry, bases, [stats.groups[junction_key(entry.group_id, k)] for k in range(count)],
                          sequential=False)

    def prepare_stream(self, model: ir.Model, group: WidthGroup, layout: ResidualLayout) -> list[str]:
        """With ``center_embedding``: every writer into the first junction's slot (the token
        and position tables) centred over its stream axis, so each embedding row has zero mean;
        the names changed (sequential walk only, before its statistics)."""
        if not self.center_embedding:
            return []
        from graphresize.analysis.junctions import junction_route
        from graphresize.passes.edit import set_initializer

        route = junction_route(model.graph, group, layout)
        if route.frozen:
            raise UnsupportedModelError(f"{group.id} cannot be routed per junction: {route.frozen}")
        names = [w for w in route.writers if w.slot == 0]
        for writer in names:
            array = model.graph.initializers[writer.name].const_value.numpy().astype(np.float64)
            set_initializer(model.graph, writer.name, array - array.mean(axis=writer.axis, keepdims=True))
        return [w.name for w in names]

    def junction_count(self, group_id: str) -> int:
        """The number of junctions of ``group_id`` (known once ``stat_requests`` ran)."""
        return self._junctions[group_id]

    def solve_junction(self, stats: GroupStats, width: int, options: OptimizeOptions) -> np.ndarray:
        """One junction's basis (D×``width``) from the stream statistics it receives."""
        from graphresize.solve.junctions import basis_for

        merge_options = {"reg": options.reg, "metric": options.metric, "target_mass": options.target_mass}
        return basis_for(stats, width, self.basis_method, **(merge_options if self.basis_method == "dotresize" else {}))

    def adopt(self, entry: GroupPlan, bases: list[np.ndarray], stats: list[GroupStats], *, sequential: bool) -> ChannelTransform:
        """Keep the solved bases of ``entry``'s group for the rewrite; its transform (the first
        junction's basis, with the per-junction energies in ``info``)."""
        from graphresize.solve.junctions import junction_bases

        solved = junction_bases(entry.group_id, bases, stats, self.basis_method)
        self._bases[entry.group_id] = solved
        first = solved.bases[0]
        info = {"junctions": len(bases), "unit_rms": self.unit_rms, "slice_head": self.slice_head,
                "statistics": "sequential" if sequential else "dense",
                "center_embedding": self.center_embedding, **solved.info}
        return ChannelTransform(entry.group_id, first, first.T, method=f"{self.basis_method}/junction", info=info)

    def rewrite_passes(self, ctx: RewriteContext) -> list[ir.passes.PassBase]:
        from graphresize.analysis.junctions import junction_route
        from graphresize.passes import ResizeGroupsPass, RetieWeightsPass
        from graphresize.passes.route_junctions import RouteJunctionsPass

        routed = [gid for gid in self._bases if gid in ctx.layouts]
        routes = [junction_route(ctx.model.graph, ctx.groups.by_id(gid), ctx.layouts[gid]) for gid in routed]
        for route in routes:
            if route.frozen:
                raise UnsupportedModelError(f"{route.group_id} cannot be routed per junction: {route.frozen}")
        others = {gid: t for gid, t in ctx.transforms.items() if gid not in self._bases}
        passes: list[ir.passes.PassBase] = [ResizeGroupsPass(ctx.groups, others)] if others else []
        if routes:
            passes += [RouteJunctionsPass(routes, [self._bases[gid] for gid in routed]), RetieWeightsPass()]
        return passes


class JunctionDotResize(SliceGPT):
    """The DOTResize paper's per-junction ``T_k = Q_k·R_k``: each junction's OT merge split by
    QR, readers by the orthogonal projection (``Q_kᵀ``), the same shortcut matrices."""

    basis_method = "dotresize"
    unit_rms = True
    center_embedding = False
