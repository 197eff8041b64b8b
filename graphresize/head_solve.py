"""Which attention heads to keep: scores from calibration, counts from a ratio (pure numpy).

A head's score is its share of the output projection's output over the calibration tokens:
with ``A`` the projection's input ([tokens, H·hd]), ``G = AᵀA`` and ``W_h`` the rows of head
``h``, ``score_h = ‖A_h·W_h‖² = tr(W_hᵀ G_hh W_h)``. Under grouped-query attention the unit
removed is a KV head with its query heads, scored as the sum of its query heads' scores.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from graphresize.heads import AttentionBlock
from graphresize.solve import least_squares_unmerge

METHODS = ("prune",)
# Relative ridge of the output-row refit: heads have no dead features, so only a guard.
REFIT_RIDGE = 1e-9


@dataclasses.dataclass(frozen=True, eq=False)
class HeadSelection:
    """Heads kept in one block (sorted), their scores, and optionally refitted output rows
    (``[kept·hd, out]`` in the weight's ``[in, out]`` orientation)."""

    layer: int
    keep_q: tuple[int, ...]
    keep_kv: tuple[int, ...]
    scores: tuple[float, ...]
    output_rows: np.ndarray | None = None
    method: str = "prune"

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


def head_count(block: AttentionBlock, ratio: float) -> HeadCount:
    """``ratio`` of the block's removable units, rounded half up, at least one unit kept."""
    units = block.num_kv_heads if block.group_size > 1 else block.num_heads
    removed = min(units - 1, math.floor(ratio * units + 0.5))
    return HeadCount(units, max(0, removed))


def rounding_note(blocks: tuple[AttentionBlock, ...], ratio: float) -> str | None:
    """One line when ``ratio`` cannot be met exactly (GQA removes whole KV groups)."""
    notes = []
    for block in blocks:
        count = head_count(block, ratio)
        if abs(count.share - ratio) > 1e-9:
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


def select_heads(
    block: AttentionBlock,
    gram: np.ndarray,
    rows: np.ndarray,
    ratio: float,
    *,
    method: str = "prune",
    refit: bool = True,
) -> HeadSelection:
    """Keep the units of largest score. With ``refit`` the output rows of the kept heads are
    the least-squares readout of the full output, ``(G_SS)⁻¹ G_S: W`` (exactly ``W_S`` when
    the removed heads contribute nothing)."""
    if method not in METHODS:
        raise ValueError(f"unknown head method {method!r}")
    hd, group = block.head_dim, max(block.group_size, 1)
    scores = head_scores(gram, rows, block.num_heads, hd)
    count = head_count(block, ratio)
    unit_scores = scores.reshape(-1, group).sum(axis=1) if group > 1 else scores
    order = np.argsort(-unit_scores, kind="stable")
    kept_units = tuple(sorted(int(u) for u in order[: count.units - count.removed]))
    if group > 1:
        keep_kv = kept_units
        keep_q = tuple(kv * group + r for kv in keep_kv for r in range(group))
    else:
        keep_q = keep_kv = kept_units
    output_rows = None
    if refit and len(keep_q) < block.num_heads:
        features = np.array([h * hd + i for h in keep_q for i in range(hd)])
        selection = np.zeros((gram.shape[0], len(features)))
        selection[features, np.arange(len(features))] = 1.0
        output_rows = least_squares_unmerge(gram, selection, ridge=REFIT_RIDGE) @ rows
    return HeadSelection(block.layer, keep_q, keep_kv, tuple(float(s) for s in scores), output_rows, method)
