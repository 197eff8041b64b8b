"""Which attention heads to keep: scores from calibration, counts from a ratio (pure numpy).

A head's score is its share of the output projection's output over the calibration tokens:
with ``A`` the projection's input ([tokens, H·hd]), ``G = AᵀA`` and ``W_h`` the rows of head
``h``, ``score_h = ‖A_h·W_h‖² = tr(W_hᵀ G_hh W_h)``. Under grouped-query attention the unit
removed is a KV head with its query heads, scored as the sum of its query heads' scores.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np

from graphresize.analysis.attention.heads import AttentionBlock
from graphresize.solve.merge import least_squares_unmerge

METHODS = ("prune", "refit", "global", "query", "ot")  # ot: graphresize.solve.head_merge
# Relative ridge of the output-row refit: heads have no dead features, so only a guard.
REFIT_RIDGE = 1e-9


@dataclasses.dataclass(frozen=True, eq=False)
class HeadSelection:
    """Heads kept in one block (sorted), their scores, and optionally refitted output rows
    (``[kept·hd, out]`` in the weight's ``[in, out]`` orientation) and a map of the value
    features (``[Hv·hd, kept_v·hd]``, merged heads) used in place of keeping columns."""

    layer: int
    keep_q: tuple[int, ...]
    keep_kv: tuple[int, ...]
    scores: tuple[float, ...]
    output_rows: np.ndarray | None = None
    method: str = "prune"
    value_map: np.ndarray | None = None

    def changes(self, block: AttentionBlock) -> bool:
        return len(self.keep_q) != block.num_heads


@dataclasses.dataclass(frozen=True)
class HeadCount:
    """How many units (KV groups under GQA, else heads) one block removes."""

    units: int
    removed: int

    @property
    def share(self) -> float:
        return self.removed / self.units if self.units else 0.0


def head_count(block: AttentionBlock, ratio: float, method: str = "prune") -> HeadCount:
    """``ratio`` of the block's removable units, rounded half up, at least one unit kept. Units
    are KV groups under GQA, or (``method="query"``) the query heads of one KV group."""
    if method == "query" and block.group_size > 1:
        units = block.group_size
    else:
        units = block.num_kv_heads if block.group_size > 1 else block.num_heads
    removed = min(units - 1, math.floor(ratio * units + 0.5))
    return HeadCount(units, max(0, removed))


def rounding_note(blocks: tuple[AttentionBlock, ...], ratio: float, method: str = "prune") -> str | None:
    """One line when ``ratio`` cannot be met exactly (GQA removes whole KV groups, or the same
    number of query heads from every KV group)."""
    notes = []
    for block in blocks:
        count = head_count(block, ratio, method)
        if method == "query" and block.group_size > 1 and abs(count.share - ratio) > 1e-9:
            text = (
                f"--ratio-heads {ratio:g} cannot be met exactly with {block.group_size} query heads per KV head:"
                f" rounded to {count.share:.3g} ({count.removed} of every {block.group_size} query heads removed,"
                f" {block.num_heads - count.removed * block.num_kv_heads} of {block.num_heads} kept)"
            )
            if text not in notes:
                notes.append(text)
        elif abs(count.share - ratio) > 1e-9:
            unit = "KV groups" if block.group_size > 1 else "heads"
            kept = block.num_heads - count.removed * max(block.group_size, 1)
            text = (
                f"--ratio-heads {ratio:g} cannot be met exactly with {count.units} {unit}"
                + (f" of {block.group_size} query heads" if block.group_size > 1 else "")
                + f": rounded to {count.share:.3g} ({count.removed} of {count.units} {unit} removed,"
                f" {kept} of {block.num_heads} query heads kept)"
            )
            if text not in notes:
                notes.append(text)
    return "; ".join(notes) if notes else None


def head_scores(gram: np.ndarray, rows: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """``tr(W_hᵀ G_hh W_h)`` per head; ``rows`` is the output weight as ``[H·hd, out]``."""
    scores = np.empty(num_heads)
    for h in range(num_heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        scores[h] = float(np.sum((gram[sl, sl] @ rows[sl]) * rows[sl]))
    return scores


def removal_error(gram: np.ndarray, rows: np.ndarray, kept: np.ndarray) -> float:
    """``min_W' ‖A·W − A_S·W'‖²`` over the calibration rows: the output energy lost when only
    features ``kept`` remain and the output rows are refitted,
    ``tr(Wᵀ (G − G_:S G_SS⁻¹ G_S:) W)``."""
    full = float(np.sum((gram @ rows) * rows))
    if len(kept) == 0:
        return full
    g_ss = gram[np.ix_(kept, kept)]
    g_ss = g_ss + REFIT_RIDGE * max(float(np.mean(np.diag(g_ss))), 1e-30) * np.eye(len(kept))
    cross = gram[kept] @ rows
    return max(0.0, full - float(np.sum(cross * np.linalg.solve(g_ss, cross))))


def unit_features(unit: int, group: int, head_dim: int) -> list[int]:
    """Features of unit ``unit`` (a KV group of ``group`` query heads, or one head)."""
    return list(range(unit * group * head_dim, (unit + 1) * group * head_dim))


def greedy_removal(gram: np.ndarray, rows: np.ndarray, units: int, group: int, head_dim: int, count: int) -> list[int]:
    """Remove ``count`` units one at a time, each time the one whose removal (with refitted
    output rows) loses the least output energy; returns the removed units in order."""
    removed: list[int] = []
    for _ in range(count):
        best = None
        for u in range(units):
            if u in removed:
                continue
            kept = np.array([f for k in range(units) if k != u and k not in removed for f in unit_features(k, group, head_dim)])
            err = removal_error(gram, rows, kept)
            if best is None or err < best[0]:
                best = (err, u)
        removed.append(best[1])
    return removed


def select_heads(
    block: AttentionBlock,
    gram: np.ndarray,
    rows: np.ndarray,
    ratio: float,
    *,
    method: str = "refit",
    refit: bool = True,
    removed: list[int] | None = None,
) -> HeadSelection:
    """Keep the units of largest score (``prune``: output energy of the unit) or of least
    loss when removed with refitted output rows (``refit``, greedy); ``removed`` overrides
    the choice (``global`` allocation). With ``refit`` the output rows of the kept heads are
    the least-squares readout of the full output, ``(G_SS)⁻¹ G_S: W`` (exactly ``W_S`` when
    the removed heads contribute nothing)."""
    if method not in METHODS or method == "ot":
        raise ValueError(f"head method {method!r} is not a selection (ot: graphresize.solve.head_merge.ot_merge_heads)")
    hd, group = block.head_dim, max(block.group_size, 1)
    scores = head_scores(gram, rows, block.num_heads, hd)
    if method == "query" and group > 1:
        keep_q = tuple(sorted(_query_removal(gram, rows, block, head_count(block, ratio, method).removed)))
        return _selection(block, gram, rows, keep_q, tuple(range(block.num_kv_heads)), scores, method, refit)
    count = head_count(block, ratio)
    if removed is None and method == "prune":
        unit_scores = scores.reshape(-1, group).sum(axis=1) if group > 1 else scores
        order = np.argsort(-unit_scores, kind="stable")
        removed = [int(u) for u in order[count.units - count.removed :]]
    elif removed is None:
        removed = greedy_removal(gram, rows, count.units, group, hd, count.removed)
    kept_units = tuple(u for u in range(count.units) if u not in removed)
    if group > 1:
        keep_kv = kept_units
        keep_q = tuple(kv * group + r for kv in keep_kv for r in range(group))
    else:
        keep_q = keep_kv = kept_units
    return _selection(block, gram, rows, keep_q, keep_kv, scores, method, refit)


def _selection(block, gram, rows, keep_q, keep_kv, scores, method, refit) -> HeadSelection:
    hd = block.head_dim
    output_rows = None
    if refit and len(keep_q) < block.num_heads:
        features = np.array([h * hd + i for h in keep_q for i in range(hd)])
        selection = np.zeros((gram.shape[0], len(features)))
        selection[features, np.arange(len(features))] = 1.0
        output_rows = least_squares_unmerge(gram, selection, ridge=REFIT_RIDGE) @ rows
    return HeadSelection(block.layer, keep_q, keep_kv, tuple(float(s) for s in scores), output_rows, method)


def _query_removal(gram: np.ndarray, rows: np.ndarray, block: AttentionBlock, per_group: int) -> list[int]:
    """Query heads kept when ``per_group`` are removed from every KV group, one round at a
    time, each group losing the head whose removal (refitted) loses least."""
    group, hd = block.group_size, block.head_dim
    kept = list(range(block.num_heads))
    for _ in range(per_group):
        for kv in range(block.num_kv_heads):
            best = None
            for h in [h for h in kept if h // group == kv]:
                rest = np.array([h2 * hd + i for h2 in kept if h2 != h for i in range(hd)])
                err = removal_error(gram, rows, rest)
                if best is None or err < best[0]:
                    best = (err, h)
            kept.remove(best[1])
    return kept


def global_removal(items: list[tuple[AttentionBlock, np.ndarray, np.ndarray]], ratio: float) -> dict[int, list[int]]:
    """One budget over all layers: ``ratio`` of all units, removed one at a time where the
    refitted output loses least (each layer keeps at least one unit). Output energies are in
    residual-stream units, so losses of different layers compare directly."""
    units = {b.layer: head_count(b, 0.0).units for b, _, _ in items}
    budget = min(math.floor(ratio * sum(units.values()) + 0.5), sum(u - 1 for u in units.values()))
    removed: dict[int, list[int]] = {layer: [] for layer in units}
    loss = {b.layer: 0.0 for b, _, _ in items}
    data = {b.layer: (b, g, r) for b, g, r in items}

    def step(layer: int) -> tuple[float, int, int, float] | None:
        block, gram, rows = data[layer]
        group, n = max(block.group_size, 1), units[layer]
        if n - len(removed[layer]) <= 1:
            return None
        best = None
        for u in range(n):
            if u in removed[layer]:
                continue
            kept = np.array([f for k in range(n) if k != u and k not in removed[layer] for f in unit_features(k, group, block.head_dim)])
            err = removal_error(gram, rows, kept)
            if best is None or err < best[3]:
                best = (err - loss[layer], layer, u, err)
        return best

    heap = [c for c in (step(layer) for layer in units) if c is not None]
    heapq.heapify(heap)
    for _ in range(budget):
        _, layer, unit, err = heapq.heappop(heap)
        removed[layer].append(unit)
        loss[layer] = err
        nxt = step(layer)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return removed
