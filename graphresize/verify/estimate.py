"""A smaller ``--ratio`` that should pass the quality warning, estimated from the calibration
statistics the solve already has (no extra forward pass).

Rule (an estimate, stated as one wherever it is shown):

* each changed group ``g`` loses, when it keeps the ``k`` features of largest calibrated norm
  and its readers are refit by least squares, the share
  ``e_g(k) = tr(G_DD − G_DK G_KK⁻¹ G_KD) / tr(G)`` of its activation energy (``G`` its Gram
  matrix, ``K`` the kept and ``D`` the dropped features). One Cholesky factor of ``G`` in norm
  order gives ``e_g(k)`` for every ``k`` at once: the Schur complement of the leading ``k``
  block is ``L₂₂L₂₂ᵀ``, so its trace is the sum of the squared columns ``j ≥ k`` of ``L``;
* the run's measured hold-out top-1 is taken to fall as ``top1 = exp(−a·√S(r))`` with the
  summed lost energy ``S(r) = Σ_g e_g(k_g(r))``: to first order the logit error is linear in
  the groups' output errors and KL quadratic in it, and on the benchmark rows
  ``−ln(top1) ≈ 0.58·√KL`` (``prune-mlp`` 0.1-0.5: 0.55, 0.58, 0.59, 0.61, 0.61); the
  exponential keeps the estimate in (0, 1] where agreement is near zero. So
  ``ln top1(r') ≈ ln top1(r)·√(S(r')/S(r))``, every group's removed share scaled by ``r'/r``;
* the suggestion is the largest multiple of 0.05 below ``--ratio`` whose estimated top-1 is at
  least the threshold. Without usable statistics (no resized group with a Gram: heads only)
  ``ln top1`` is scaled linearly with the ratio instead.

For pruned MLP groups ``e_g`` is the solve's own reconstruction error on the anchor; for merged
(OT) or rotated (residual) groups it is a proxy. Head removal is not modelled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

#: Below this hold-out top-1 agreement the run prints a warning with a smaller ratio.
WARN_TOP1 = 0.6
STEP = 0.05


@dataclasses.dataclass(frozen=True)
class RatioHint:
    """A suggested ``--ratio`` (None: none of the candidates is estimated to pass) and the
    estimated top-1 agreement there; ``basis``: ``lost-energy`` or ``linear``."""

    ratio: float | None
    estimated_top1: float
    threshold: float
    basis: str

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "estimate": True}


def lost_energy_curve(gram: np.ndarray) -> np.ndarray:
    """``e(k)`` for ``k = 0..D``: the share of activation energy least squares cannot recover
    from the ``k`` features of largest norm (``e(0) = 1``, ``e(D) = 0``). Hand-written (one
    Cholesky factor, see the module rule)."""
    gram = np.asarray(gram, dtype=np.float64)
    order = np.argsort(-np.diag(gram), kind="stable")
    g = gram[np.ix_(order, order)]
    total = float(np.trace(g))
    if total <= 0:
        return np.zeros(g.shape[0] + 1)
    ridge = 1e-9 * total / g.shape[0]
    for _ in range(6):
        try:
            factor = np.linalg.cholesky(g + ridge * np.eye(g.shape[0]))
            break
        except np.linalg.LinAlgError:
            ridge *= 100
    else:
        return np.linspace(1.0, 0.0, g.shape[0] + 1)
    columns = np.square(factor).sum(axis=0)
    suffix = np.concatenate([np.cumsum(columns[::-1])[::-1], [0.0]])
    return np.clip(suffix / suffix[0], 0.0, 1.0)


def candidates(ratio: float) -> list[float]:
    """Multiples of ``STEP`` below ``ratio``, largest first (``ratio/2`` when there are none)."""
    below = [round(STEP * k, 4) for k in range(int(np.ceil(ratio / STEP - 1e-9)) - 1, 0, -1)]
    return below or [round(ratio / 2, 4)]


def suggest_ratio(
    top1: float, ratio: float, groups: Sequence[tuple[np.ndarray, int, int]], threshold: float = WARN_TOP1
) -> RatioHint:
    """The largest candidate ratio estimated to reach ``threshold``. ``groups``: per changed
    group its lost-energy curve, width and new width at ``ratio``."""
    log_top1 = float(np.log(max(top1, 1e-3)))

    def lost(scale: float) -> float:
        total = 0.0
        for curve, width, new_width in groups:
            removed = int(round((width - new_width) * scale))
            total += float(curve[min(width, max(0, width - removed))])
        return total

    now = lost(1.0) if groups else 0.0
    basis = "lost-energy" if now > 0 else "linear"
    estimate = 0.0
    for candidate in candidates(ratio):
        scale = candidate / ratio
        estimate = float(np.exp(log_top1 * (np.sqrt(lost(scale) / now) if basis == "lost-energy" else scale)))
        if estimate >= threshold:
            return RatioHint(candidate, float(estimate), threshold, basis)
    return RatioHint(None, float(estimate), threshold, basis)


def ratio_hint(verification, plan, stats, ratio: float, threshold: float = WARN_TOP1) -> RatioHint | None:
    """The hint for a run whose hold-out top-1 is below ``threshold`` (None otherwise), from the
    plan's changed groups and their calibration Grams."""
    top1 = getattr(verification, "top1_agreement", None)
    if top1 is None or top1 >= threshold or ratio <= 0:
        return None
    groups = []
    for entry in plan.changed():
        gs = stats.groups.get(entry.group_id) if stats is not None else None
        if gs is not None and gs.gram.shape == (entry.width, entry.width):
            groups.append((lost_energy_curve(gs.gram), entry.width, entry.new_width))
    return suggest_ratio(verification.top1_agreement, ratio, groups, threshold)
