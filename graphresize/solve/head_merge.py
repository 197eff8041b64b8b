"""OT merge of attention heads as units (``--head-method ot``; pure numpy).

The value/output path is linear per head: head ``j`` adds ``A_j·W_j`` to the output, with
``A_j = P_j·X·V_g(j)`` (its attention pattern ``P_j``, the values of its KV head ``g(j)``) and
``W_j`` its output rows. The query/key path goes through the softmax and cannot be merged
exactly, so a merged unit keeps the queries and keys of one *kept* unit (chosen as ``refit``
chooses them) and, assuming the units merged into it attend alike (``P_h ≈ P_k``), takes:

* values ``V' = [V_k | V_h ...]·C``: a combination of the members' values (``hd`` columns),
* output rows from the reduced-rank fit of the members' summed output,
  ``min ‖A_cl·(W_cl − C·W')‖`` over ``C`` and ``W'`` (``A_cl`` the members' features side
  by side, ``W_cl`` their output rows stacked and weighted by the plan): with ``L`` the
  Cholesky factor of ``A_clᵀA_cl`` and ``L·W_cl = U·S·Vᵀ``, ``C = L⁻¹·U_hd``, ``W' = S_hd·V_hdᵀ``.
  Under GQA one ``C`` serves every query head of the group (one value head), ``W'`` is per
  query head, and ``L`` is fitted on the sum of their Grams.

Removed units go to kept ones by the exact OT plan with cluster target masses (as the MLP
solver's default): each joins the kept unit whose pairwise merge loses the least output
energy (the truncated singular values). Balanced target masses would split a removed unit
over all kept ones, also where it matches one of them exactly. A kept unit that receives nothing is unchanged (``C = I``, ``W' = W``). Query-mode (query
heads inside a KV group share values) has nothing to merge beyond the output rows, which
``refit`` already fits best: it is not offered.
"""

from __future__ import annotations

import numpy as np

from graphresize.analysis.attention.heads import AttentionBlock
from graphresize.solve.heads import (
    REFIT_RIDGE,
    HeadSelection,
    greedy_removal,
    head_count,
    head_scores,
)


def _slot_features(unit: int, slot: int, group: int, hd: int) -> list[int]:
    head = unit * group + slot
    return list(range(head * hd, (head + 1) * hd))


def _fit(gram: np.ndarray, rows: np.ndarray, members: list[tuple[int, float]], group: int, hd: int):
    """``(C, [W'_slot], lost)`` for the merge of ``members`` (unit, weight) into one unit."""
    if len(members) == 1 and members[0][1] == 1.0:
        return np.eye(hd), [rows[_slot_features(members[0][0], s, group, hd)] for s in range(group)], 0.0
    grams, targets = [], []
    for slot in range(group):
        feats = [f for unit, _ in members for f in _slot_features(unit, slot, group, hd)]
        grams.append(gram[np.ix_(feats, feats)])
        targets.append(np.concatenate([w * rows[_slot_features(u, slot, group, hd)] for u, w in members]))
    g = sum(grams)
    g = g + REFIT_RIDGE * max(float(np.mean(np.diag(g))), 1e-30) * np.eye(len(g))
    chol = np.linalg.cholesky(g)  # g = L·Lᵀ; ‖A·M‖² ≈ ‖Lᵀ·M‖²
    z = chol.T @ np.concatenate(targets, axis=1)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    c = np.linalg.solve(chol.T, u[:, :hd])
    out = s[:hd, None] * vt[:hd]
    width = rows.shape[1]
    return c, [out[:, i * width : (i + 1) * width] for i in range(group)], float(np.sum(s[hd:] ** 2))


def ot_merge_heads(block: AttentionBlock, gram: np.ndarray, rows: np.ndarray, ratio: float) -> HeadSelection:
    """Merge ``ratio`` of the block's units (KV groups under GQA, else heads) into the rest."""
    hd, group = block.head_dim, max(block.group_size, 1)
    count = head_count(block, ratio)
    scores = tuple(float(s) for s in head_scores(gram, rows, block.num_heads, hd))
    kept_units = list(range(count.units))
    if not count.removed:
        return HeadSelection(block.layer, tuple(range(block.num_heads)), tuple(range(block.num_kv_heads)), scores, method="ot")
    removed = greedy_removal(gram, rows, count.units, group, hd, count.removed)
    kept_units = [u for u in range(count.units) if u not in removed]
    cost = np.array([[_fit(gram, rows, [(k, 1.0), (h, 1.0)], group, hd)[2] for k in kept_units] for h in removed])
    plan = np.zeros_like(cost)  # the exact OT plan with cluster target masses: the cheapest kept unit
    plan[np.arange(len(removed)), np.argmin(cost, axis=1)] = 1.0
    kv_units = block.num_kv_heads if group > 1 else block.num_heads
    value_map = np.zeros((kv_units * hd, len(kept_units) * hd))
    out_rows = []
    for j, k in enumerate(kept_units):
        members = [(k, 1.0)] + [(h, float(plan[i, j])) for i, h in enumerate(removed) if plan[i, j] > 1e-9]
        c, outs, _ = _fit(gram, rows, members, group, hd)
        for m, (unit, _) in enumerate(members):
            value_map[unit * hd : (unit + 1) * hd, j * hd : (j + 1) * hd] = c[m * hd : (m + 1) * hd]
        out_rows.extend(outs)
    keep_q = tuple(u * group + r for u in kept_units for r in range(group))
    keep_kv = tuple(kept_units) if group > 1 else keep_q
    return HeadSelection(block.layer, keep_q, keep_kv, scores, np.concatenate(out_rows), "ot", value_map)
