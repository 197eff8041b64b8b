"""DISP (dimension-independent structural pruning, Gao et al. 2024): per-block subsets of the
residual stream, chosen from calibration importance under one global budget.

Each block input (a norm junction before attention or the MLP) reads its own subset
``S_in`` of the normalised stream; each block writer (``o_proj``, ``down_proj``: a linear map
whose output is added to the stream) writes its own subset ``S_out``. The stream keeps its
full width, so widths may differ from block to block. The final norm (LM head) stays full.

Scores (Wanda-style):

* input feature ``j`` of a junction: ``‖A[:, j]‖ · ‖W[j, :]‖``, ``A`` the unit-RMS stream at the
  junction (from its calibration Gram's diagonal), ``W`` its readers' weights stacked;
* output feature ``j`` of a writer: ``‖O[:, j]‖``, ``O`` the writer's calibrated output
  (the update it adds to the stream); ``‖W[:, j]‖`` when no output statistics are given.

Readers of a junction that keeps ``S`` are refit by least squares on the calibration Gram
(``lsq_readout``): ``n_S·W'`` with ``W' = (G_SS)⁻¹ G_S: W`` best reproduces ``n·W``, so the
kept features stand in for the dropped ones.

Basis: the subsets may be chosen in a rotated basis of the stream (any orthogonal ``B``,
applied exactly to every writer and reader first; ``principal_basis`` concentrates the
stream's energy in the leading features). ``nested`` subsets are prefixes of one global
feature order; permuting the stream into that order (exact, free) makes every subset a
contiguous block (``Slice``, ``Pad``), not an indexed ``GatherElements``
(``range_order`` finds that permutation from the subsets themselves). ``block`` > 1: the
features are grouped into blocks of ``block`` (``block_order``: features that the free
subsets hold at the same sites share a block) and every site keeps whole blocks (block score:
the sum of its features' scores); after the stream is permuted into the block order each
subset is a union of aligned blocks, which ``DispPass`` reads and writes by ``Gather`` on the
block axis of a ``[..., D/block, block]`` view instead of an element-wise ``GatherElements``.

Budget: the scores of each site are divided by their mean (so sites of different scale
compete fairly), pooled over all sites, and the top ``(1 - ratio)`` share is kept; each
site's count is then rounded to ``multiple_of`` (at least ``multiple_of``, at most the full
width) and the site keeps its top-scoring features. The learned selection of the DISP paper
(hypernetwork with Gumbel-sigmoid masks) is not implemented (it needs a GPU).

This module is analysis only; :class:`graphresize.passes.DispPass` rewrites the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphresize.analysis.channels import PRODUCER, reshape_width_constant, resolve_param
from graphresize.analysis.residual import ResidualLayout
from graphresize.io import publish


@dataclasses.dataclass(frozen=True)
class Writer:
    """A linear map ``node`` (weight ``weight``, output features on stored axis ``axis``,
    optional bias initializer ``bias`` added by ``bias_add``, or ``node``'s own ``C`` when
    ``bias_add`` is None) whose output, through an optional ``Reshape`` ``reshape`` with a
    constant last size, the node ``add`` adds to the stream (``add``'s input
    ``stream_index`` is the stream)."""

    node: str
    weight: str
    axis: int
    bias: str | None
    bias_add: str | None
    add: str
    stream_index: int
    reshape: str | None = None


@dataclasses.dataclass(frozen=True)
class Subset:
    """The features one site keeps: ``site`` is a junction output (``kind`` ``in``) or a
    writer node (``kind`` ``out``); ``block`` is ``attn`` or ``mlp``; ``keep`` sorted."""

    site: str
    kind: str
    block: str
    layer: int
    keep: tuple[int, ...]

    @property
    def width(self) -> int:
        return len(self.keep)


@dataclasses.dataclass(frozen=True)
class DispSelection:
    """Input and output subsets of every block of one residual group of width ``width``."""

    group_id: str
    width: int
    ratio: float
    inputs: tuple[Subset, ...]
    outputs: tuple[Subset, ...]
    nested: bool = False  # every subset a prefix of one feature order
    block: int = 1  # every subset a union of aligned blocks of this many features
    order: tuple[int, ...] | None = None  # block > 1: the feature order the blocks were cut from
    basis: str = "stream"  # "stream": the stream's own features; "principal": its PCA rotation
    readers: str = "select"  # "select": kept rows as they are; "lsq": refit by least squares

    def kept_share(self) -> float:
        sites = self.inputs + self.outputs
        return sum(s.width for s in sites) / (self.width * len(sites)) if sites else 1.0

    def profile(self) -> list[dict]:
        """Per layer: attention and MLP input/output widths (a parallel block's one input
        counts as both)."""
        rows: dict[int, dict] = {}
        for s in self.inputs + self.outputs:
            row = rows.setdefault(s.layer, {"layer": s.layer})
            for block in ("attn", "mlp") if s.block == PARALLEL else (s.block,):
                row[f"{block}_{s.kind}"] = s.width
        return [rows[k] for k in sorted(rows)]

    def reindexed(self, order: Sequence[int]) -> DispSelection:
        """The same subsets once the stream is permuted so that new feature ``i`` is old
        feature ``order[i]``."""
        position = np.argsort(np.asarray(order))

        def moved(subsets):
            return tuple(dataclasses.replace(s, keep=tuple(sorted(int(position[j]) for j in s.keep))) for s in subsets)

        moved_order = None if self.order is None else tuple(int(position[j]) for j in self.order)
        return dataclasses.replace(self, inputs=moved(self.inputs), outputs=moved(self.outputs), order=moved_order)

    def as_dict(self) -> dict:
        return {
            "group": self.group_id,
            "width": self.width,
            "ratio": self.ratio,
            "kept_share": round(self.kept_share(), 4),
            "nested": self.nested,
            "block": self.block,
            "basis": self.basis,
            "readers": self.readers,
            "profile": self.profile(),
            "sites": [
                {"site": s.site, "kind": s.kind, "block": s.block, "layer": s.layer, "width": s.width}
                for s in self.inputs + self.outputs
            ],
        }


def block_junctions(layout: ResidualLayout) -> int:
    """How many of the layout's junctions are block inputs: all but the last (final norm)."""
    return max(len(layout.junctions) - 1, 0)


#: ``Subset.block`` of a parallel block's one input (attention and MLP read the same norm)
PARALLEL = "attn+mlp"


def site_labels(graph: ir.Graph, layout: ResidualLayout, writers: Sequence[Writer]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]] | str:
    """``(block, layer)`` of every block input and every writer, or why the stream's blocks
    are not recognised. Each writer belongs to the last block input before it in graph
    order. Sequential blocks (one writer per input: attention, then MLP) alternate
    ``attn``/``mlp`` with two inputs per layer; parallel blocks (two writers per input:
    GPT-J / Phi-1/2 style, attention and MLP reading one norm) have one input per layer,
    labelled :data:`PARALLEL`, and writers ``attn``, ``mlp`` in graph order."""
    n = block_junctions(layout)
    position = {node.name: i for i, node in enumerate(graph)}
    values = {v.name: v for node in graph for v in node.outputs}
    starts = []
    for junction in layout.junctions[: n + 1]:
        producer = values[junction.output].producer() if junction.output in values else None
        if producer is None:
            return f"norm output {junction.output} has no producer in the graph"
        starts.append(position[producer.name])
    owner = []
    for w in writers:
        at = position[w.node]
        before = [i for i in range(n) if starts[i] < at]
        if not before or at > starts[n]:
            return f"writer {w.node} is not inside a block"
        owner.append(before[-1])
    counts = [owner.count(i) for i in range(n)]
    if counts == [1] * n and owner == sorted(owner):
        return [(("attn", "mlp")[i % 2], i // 2) for i in range(n)], [(("attn", "mlp")[i % 2], i // 2) for i in owner]
    if counts == [2] * n and owner == sorted(owner):
        return [(PARALLEL, i) for i in range(n)], [(("attn", "mlp")[k % 2], i) for k, i in enumerate(owner)]
    return f"writers per block input {counts} (expected one each, or two for parallel blocks)"


def find_writers(graph: ir.Graph, group) -> tuple[Writer, ...] | str:
    """The block writers of residual ``group`` in graph order, or why they are not
    recognised: ``MatMul``/``Gemm`` with a constant weight whose output axis is in the group,
    then an optional bias ``Add``, then an ``Add`` of the stream."""
    producers = {(p.name, p.axis) for p in group.params if p.role == PRODUCER}
    values = set(group.values)
    found = []
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        view = resolve_param(node.inputs[1])
        if view is None or view.rank != 2:
            continue
        out_axis = 0 if node.attributes.get_int("transB", 0) else 1
        if (view.name, view.perm[out_axis]) not in producers:
            continue
        bias = bias_add = None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = resolve_param(node.inputs[2])
            if c is None or c.shape[-1] != view.shape[out_axis] or (c.rank == 2 and c.shape[0] != 1):
                return f"Gemm {node.name} writes the stream with a bias that is not a row vector"
            bias = c.name
        value = node.outputs[0]
        uses = list(value.uses())
        if bias is None and len(uses) == 1 and uses[0].node.op_type == "Add":
            other = resolve_param(uses[0].node.inputs[1 - uses[0].idx])
            if other is not None and other.rank == 1:
                bias, bias_add = other.name, uses[0].node.name
                value = uses[0].node.outputs[0]
                uses = list(value.uses())
        reshape = None
        if len(uses) == 1 and uses[0].node.op_type == "Reshape" and uses[0].idx == 0:
            if reshape_width_constant(uses[0].node) is None:
                return f"Reshape {uses[0].node.name} after writer {node.name} has no constant last size"
            reshape = uses[0].node.name
            value = uses[0].node.outputs[0]
            uses = list(value.uses())
        if len(uses) != 1 or uses[0].node.op_type != "Add" or uses[0].node.outputs[0].name not in values:
            return f"{node.op_type} {node.name} writes the stream not through a plain residual Add"
        add, idx = uses[0].node, uses[0].idx
        found.append(Writer(node.name, view.name, view.perm[out_axis], bias, bias_add, add.name, 1 - idx, reshape))
    return tuple(found)


def input_scores(graph: ir.Graph, layout: ResidualLayout, grams: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per block junction: ``‖A[:, j]‖ · ‖W[j, :]‖`` with ``W`` its readers' weights."""
    scores = []
    for junction_readers, gram in zip(layout.readers[: block_junctions(layout)], grams, strict=True):
        act = np.sqrt(np.maximum(np.diag(gram), 0.0))
        weight = np.zeros_like(act)
        for reader in junction_readers:
            w = np.moveaxis(np.asarray(graph.initializers[reader.weight].const_value.numpy(), dtype=np.float64), reader.axis, 0)
            weight += np.square(w.reshape(w.shape[0], -1)).sum(axis=1)
        scores.append(act * np.sqrt(weight))
    return scores


def output_scores(graph: ir.Graph, writers: Sequence[Writer], grams: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per writer: ``‖O[:, j]‖`` from its output Gram ``OᵀO`` when ``grams`` are given, else
    ``‖W[:, j]‖`` over output feature ``j``."""
    if grams is not None:
        return [np.sqrt(np.maximum(np.diag(g), 0.0)) for g in grams]
    scores = []
    for w in writers:
        array = np.moveaxis(np.asarray(graph.initializers[w.weight].const_value.numpy(), dtype=np.float64), w.axis, 0)
        scores.append(np.sqrt(np.square(array.reshape(array.shape[0], -1)).sum(axis=1)))
    return scores


def effective_block(width: int, block: int, nested: bool = False) -> int:
    """The block size subsets are cut in: ``block`` when it is above 1, divides ``width`` and
    the subsets are not nested (a prefix is one range already), else 1 (single features)."""
    return block if block > 1 and width % block == 0 and not nested else 1


def allocate(
    scores: Sequence[np.ndarray], ratio: float, multiple_of: int = 8, nested: bool = False, power: float = 1.0, uniform: bool = False,
    block: int = 1, order: Sequence[int] | None = None,
) -> list[tuple[int, ...]]:
    """Keep sets per site under one global budget (see the module docstring). ``nested``:
    each site keeps the first features of one global order (``global_order``); ``power``:
    the budget compares ``score**power`` (2: shares of energy); ``uniform``: every site keeps
    the same count (no global competition); ``block``: each site keeps its top-scoring blocks
    of ``block`` consecutive features of ``order`` (default: ``block_order`` of the free
    subsets), the count rounded to whole blocks (ignored when ``block`` does not divide the
    width)."""
    if not scores:
        return []
    width = len(scores[0])
    shared = global_order(scores)
    normed = [s**power / np.mean(s**power) if s.mean() > 0 else np.ones_like(s) for s in scores]
    pooled = np.concatenate(normed)
    budget = int(round((1.0 - ratio) * pooled.size))
    if budget >= pooled.size:
        return [tuple(range(width)) for _ in scores]
    ranked = np.argsort(-pooled, kind="stable")
    chosen = np.zeros(pooled.size, dtype=bool)
    chosen[ranked[:budget]] = True
    step = max(int(multiple_of), 1)
    block = effective_block(width, block, nested)
    blocks = None
    if block > 1:
        if order is None:
            order = block_cut(scores, ratio, block, multiple_of, power=power, uniform=uniform)
        blocks = np.asarray(order).reshape(-1, block)
        step = max(step, block)
    keeps = []
    for i, s in enumerate(normed):
        count = int(chosen[i * width : (i + 1) * width].sum()) if not uniform else budget / len(scores)
        count = min(max(step * int(round(count / step)), step), width)
        if blocks is not None:
            best = np.argsort(-s[blocks].sum(axis=1), kind="stable")[: count // block]
            top = blocks[best].ravel()
        else:
            top = shared[:count] if nested else np.argsort(-s, kind="stable")[:count]
        keeps.append(tuple(int(j) for j in np.sort(top)))
    return keeps


def global_order(scores: Sequence[np.ndarray]) -> np.ndarray:
    """One order of the stream features for all sites: by the sum of every site's scores
    divided by that site's mean, largest first."""
    total = sum(s / s.mean() if s.mean() > 0 else np.ones_like(s) for s in scores)
    return np.argsort(-total, kind="stable")


def block_order(keeps: Sequence[Sequence[int]], block: int, prefer: Sequence[int]) -> np.ndarray:
    """An order of the stream features cut into consecutive blocks of ``block`` in which the
    features of a block are held by the same sites. The rule: each feature's membership is
    the set of sites whose subset ``keeps`` holds it; walking ``prefer`` (the global order),
    the first feature not yet placed opens a block and takes the ``block - 1`` unplaced
    features whose membership differs from its own at the fewest sites (ties: earlier in
    ``prefer``). Grouping by membership keeps the block subsets close to the free ones: on
    SmolLM2-135M at ratio 0.3 the blocks keep 99.2% of the free subsets' normalised score,
    consecutive features of the global order 98.4%. A greedy pass written here: balanced
    (equal-size) clustering is not in numpy, scipy or networkx."""
    prefer = np.asarray(prefer)
    member = np.zeros((len(keeps), len(prefer)), dtype=np.int32)
    for i, keep in enumerate(keeps):
        member[i, list(keep)] = 1
    left = prefer.copy()
    order: list[int] = []
    while left.size:
        head, rest = left[0], left[1:]
        distance = np.abs(member[:, rest] - member[:, [head]]).sum(axis=0)
        near = np.sort(np.argsort(distance, kind="stable")[: block - 1])
        order += [int(head), *(int(j) for j in rest[near])]
        left = np.delete(rest, near)
    return np.asarray(order)


def block_cut(scores: Sequence[np.ndarray], ratio: float, block: int, multiple_of: int = 8, **allocation) -> np.ndarray:
    """The feature order ``block``-feature blocks are cut from: ``block_order`` of the free
    (single-feature) subsets ``allocate`` gives these scores, walked in ``global_order``."""
    return block_order(allocate(scores, ratio, multiple_of, **allocation), block, global_order(scores))


def range_order(selection: DispSelection, prefer: Sequence[int] | None = None) -> np.ndarray | None:
    """One order of the stream features in which every subset of ``selection`` is a single
    range, or None when this rule finds none. The rule: sort the features by how many
    subsets hold them, most first (ties in the order ``prefer``, default the stream's own);
    when the subsets form a chain under inclusion (``nested``: prefixes of one order, in any
    basis) every subset is then a prefix, and for prefixes of ``prefer`` the result is
    ``prefer`` itself. Without ``prefer``, subsets that are already ranges keep the stream's
    own order (the identity)."""
    sites = selection.inputs + selection.outputs
    identity = np.arange(selection.width)
    if prefer is None and all(_is_range(s.keep) for s in sites):
        return identity
    member = np.zeros((len(sites), selection.width), dtype=np.int64)
    for i, s in enumerate(sites):
        member[i, list(s.keep)] = 1
    base = identity if prefer is None else np.asarray(prefer)
    order = base[np.argsort(-member.sum(axis=0)[base], kind="stable")]
    position = np.argsort(order)
    if all(_is_range(tuple(sorted(int(position[j]) for j in s.keep))) for s in sites):
        return order
    return identity if all(_is_range(s.keep) for s in sites) else None


def _is_range(keep: Sequence[int]) -> bool:
    return not keep or keep[-1] - keep[0] + 1 == len(keep)


def lsq_readout(gram: np.ndarray, keep: Sequence[int], ridge: float = 1e-6) -> np.ndarray:
    """The readout (|S|×D) of the whole normalised stream from its features ``S``: kept
    features read as they are, each dropped feature ``k`` by its least-squares fit from the
    kept ones over the calibration rows, ``(G_SS + δI)⁻¹ G_Sk``; a reader ``W`` becomes
    ``readout·W``. ``δ`` is ``ridge`` times the mean of ``diag(G_SS)`` (large ``δ``: plain
    selection)."""
    keep = np.asarray(keep)
    drop = np.setdiff1d(np.arange(gram.shape[0]), keep)
    hessian = gram[np.ix_(keep, keep)].copy()
    hessian += ridge * max(float(np.mean(np.diag(hessian))), 1e-30) * np.eye(len(keep))
    readout = np.zeros((len(keep), gram.shape[0]))
    readout[:, keep] = np.eye(len(keep))
    if drop.size:
        readout[:, drop] = np.linalg.lstsq(hessian, gram[np.ix_(keep, drop)], rcond=None)[0]
    return readout


def rotate(grams: Sequence[np.ndarray], basis: np.ndarray) -> list[np.ndarray]:
    """The Grams of the stream carried in ``basis`` (``x·B``): ``BᵀGB``."""
    return [basis.T @ g @ basis for g in grams]


def select(
    group_id: str,
    width: int,
    in_scores: Sequence[np.ndarray],
    out_scores: Sequence[np.ndarray],
    in_sites: Sequence[str],
    out_sites: Sequence[str],
    ratio: float,
    multiple_of: int = 8,
    nested: bool = False,
    labels: tuple[Sequence[tuple[str, int]], Sequence[tuple[str, int]]] | None = None,
    **allocation,
) -> DispSelection:
    """Subsets for every site under one global budget ``ratio``. Sites are in graph order;
    ``labels``: the ``(block, layer)`` of every input and output site (``site_labels``),
    default alternating attention, MLP (layer = index // 2)."""
    scores = list(in_scores) + list(out_scores)
    block = effective_block(width, int(allocation.pop("block", 1)), nested)
    order = tuple(int(j) for j in block_cut(scores, ratio, block, multiple_of, **allocation)) if block > 1 else None
    keeps = allocate(scores, ratio, multiple_of, nested, **allocation, block=block, order=order)
    n = len(in_scores)

    if labels is None:
        labels = tuple([(("attn", "mlp")[i % 2], i // 2) for i in range(len(sites))] for sites in (in_sites, out_sites))

    def subsets(sites, kind, found, named):
        return tuple(Subset(site, kind, b, layer, keep) for site, keep, (b, layer) in zip(sites, found, named, strict=True))

    return DispSelection(
        group_id, width, ratio, subsets(in_sites, "in", keeps[:n], labels[0]), subsets(out_sites, "out", keeps[n:], labels[1]),
        nested, block, order,
    )


def plot_profile(selection: DispSelection, path: str | Path) -> Path | None:
    """Draw the per-layer width profile as a PNG; None when matplotlib is not installed
    (the ``bench`` extra) or ``path`` cannot take it (not a regular file, not writable)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    profile = selection.profile()
    layers = [row["layer"] for row in profile]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 3), 3.5))
    for key, marker in (("attn_in", "o"), ("attn_out", "s"), ("mlp_in", "^"), ("mlp_out", "v")):
        ax.plot(layers, [row.get(key, selection.width) for row in profile], marker=marker, label=key)
    ax.axhline(selection.width, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("features kept")
    ax.set_title(f"DISP width profile ({selection.group_id}, ratio {selection.ratio:g})")
    ax.legend(fontsize="small", ncol=4)
    fig.tight_layout()
    written = publish.write_figure(fig, Path(path))
    plt.close(fig)
    return written
