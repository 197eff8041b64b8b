"""Solvers: from a group's calibration statistics to a ``ChannelTransform`` (pure numpy + POT)."""

from __future__ import annotations

import numpy as np

from graphresize.calibrate.statistics import GroupStats
from graphresize.options import DEFAULT_REG
from graphresize.solve.transforms import ChannelTransform

# DEFAULT_REG (graphresize.options): entropic regularisation relative to the median-normalised
# cost. 0 = the exact OT plan with cluster target masses (the nearest-support assignment): on
# SmolLM2 calibration Grams it reconstructs activations best; error grows with reg.
# Two neurons closer than this (relative squared distance) are the same neuron.
DUPLICATE_TOL = 1e-6


def activation_cost(gram: np.ndarray, support: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Cost ``C[i, j]`` between neuron ``i`` and support neuron ``support[j]`` from ``G = AᵀA``.

    ``euclidean``: ``‖A_i − A_s‖² = G_ii + G_ss − 2 G_is``; ``cosine``: ``1 − G_is/√(G_ii G_ss)``.
    """
    diag = np.clip(np.diag(gram), 0.0, None)
    cross = gram[:, support]
    if metric == "euclidean":
        cost = diag[:, None] + diag[support][None, :] - 2.0 * cross
    elif metric == "cosine":
        norms = np.sqrt(diag) + 1e-30
        cost = 1.0 - cross / (norms[:, None] * norms[support][None, :])
    else:
        raise ValueError(f"unknown cost metric {metric!r}")
    return np.clip(cost, 0.0, None)


def distinct_support(gram: np.ndarray, size: int) -> np.ndarray:
    """Indices of ``size`` support neurons: largest activation norm first, skipping a neuron
    that duplicates one already chosen (so a layer of copies keeps one of each)."""
    diag = np.clip(np.diag(gram), 0.0, None)
    order = np.argsort(-diag, kind="stable")
    chosen: list[int] = []
    skipped: list[int] = []
    for i in order:
        if len(chosen) == size:
            break
        if chosen:
            dist = diag[i] + diag[chosen] - 2.0 * gram[i, chosen]
            if np.any(dist <= DUPLICATE_TOL * (diag[i] + diag[chosen] + 1e-30)):
                skipped.append(int(i))
                continue
        chosen.append(int(i))
    chosen.extend(skipped[: size - len(chosen)])
    return np.array(sorted(chosen), dtype=np.int64)


def cluster_mass(cost: np.ndarray) -> np.ndarray:
    """Target masses: the share of neurons whose nearest support neuron is each column
    (every support neuron is nearest to itself, so no mass is zero)."""
    counts = np.bincount(cost.argmin(axis=1), minlength=cost.shape[1]).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    return counts / counts.sum()


def normalized_cost(cost: np.ndarray, scale: str = "median") -> np.ndarray:
    """``cost`` divided by its mean or median, so that ``reg`` means the same in every layer."""
    value = float(np.median(cost) if scale == "median" else cost.mean())
    return cost / value if value > 0 else cost


def _backend_arrays(*arrays: np.ndarray):
    """The arrays as torch tensors when torch is installed (its logsumexp is several times
    faster than numpy's on CPU), else unchanged; POT dispatches on the type."""
    try:
        import torch
    except ImportError:
        return arrays
    return tuple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)) for x in arrays)


def sinkhorn_plan(
    cost: np.ndarray,
    reg: float,
    *,
    target: np.ndarray | None = None,
    tol: float = 1e-5,
    max_iter: int = 3000,
    stages: int = 6,
) -> np.ndarray:
    """Entropic OT plan between uniform masses ``1/D`` (rows) and ``1/d`` (columns).

    ``cost`` is expected normalised (``normalized_cost``). Activation costs are heavy-tailed (``max C / reg`` reaches ~1500 on SmolLM2), beyond what the plain
    Sinkhorn iteration can represent, so POT's log-domain solver is used, with ε-scaling:
    ``reg`` decreases geometrically from 1 in ``stages`` steps, each warm-started from the
    previous potentials (rescaled by the ratio of regularisations). ``tol`` is the relative
    column-marginal error at the final ``reg``.
    """
    rows, cols = cost.shape
    target = np.full(cols, 1.0 / cols) if target is None else target
    a, b, m = _backend_arrays(np.full(rows, 1.0 / rows), target, cost)
    schedule = np.geomspace(1.0, reg, stages) if reg < 1.0 else np.array([reg])
    warm, previous = None, None
    for r in schedule:
        if warm is not None:
            warm = (warm[0] * (previous / r), warm[1] * (previous / r))
        final = r == schedule[-1]
        threshold = (tol if final else 1e-2) / np.sqrt(cols)  # POT checks ‖colsum − b‖₂
        import ot  # POT: imported by the solve stage only (seconds of start-up)

        plan, log = ot.sinkhorn(
            a, b, m, float(r), method="sinkhorn_log", numItermax=max_iter, stopThr=threshold,
            warmstart=warm, log=True, warn=False,
        )
        warm, previous = (log["log_u"], log["log_v"]), r
    plan = np.asarray(plan.numpy() if hasattr(plan, "numpy") else plan, dtype=np.float64)
    if not np.all(np.isfinite(plan)) or plan.sum() <= 0:
        raise FloatingPointError("Sinkhorn produced a non-finite plan")
    return plan


def nearest_plan(cost: np.ndarray) -> np.ndarray:
    """The exact OT plan when each column's mass is its cluster share: every neuron sends its
    whole mass ``1/D`` to its nearest support neuron (each row pays its minimum, so no plan
    can cost less)."""
    rows, cols = cost.shape
    plan = np.zeros((rows, cols))
    plan[np.arange(rows), cost.argmin(axis=1)] = 1.0 / rows
    return plan


def ot_merge(
    group_id: str,
    stats: GroupStats,
    new_width: int,
    *,
    reg: float = DEFAULT_REG,
    metric: str = "euclidean",
    target_mass: str = "cluster",
    unmerge: str = "lsq",
) -> ChannelTransform:
    """DOTResize merge of a group between two linear maps.

    Support = ``new_width`` distinct neurons of largest activation norm. Plan ``P`` between
    all neurons (mass ``1/D`` each) and the support: target masses ``b`` are the cluster shares
    (``target_mass="cluster"``) or uniform ``1/d`` (``"uniform"``, as in the paper); ``reg > 0``
    solves the entropic problem with Sinkhorn, ``reg = 0`` takes the exact plan (closed form
    for cluster masses). Merge ``M = P·diag(1/b)`` (each new neuron a weighted average of old
    ones), unmerge ``U = (diag(1/a)·P)ᵀ`` (each old neuron read back from the new ones), with
    ``a`` and ``b`` the plan's actual marginals. ``unmerge="lsq"`` replaces ``U`` by the
    least-squares readout of the old neurons from the merged ones (``least_squares_unmerge``).
    """
    gram = stats.gram
    width = gram.shape[0]
    support = distinct_support(gram, new_width)
    cost = normalized_cost(activation_cost(gram, support, metric))
    if target_mass not in ("cluster", "uniform"):
        raise ValueError(f"unknown target mass {target_mass!r}")
    if reg > 0:
        plan = sinkhorn_plan(cost, reg, target=cluster_mass(cost) if target_mass == "cluster" else None)
    elif target_mass == "cluster":
        plan = nearest_plan(cost)
    else:
        import ot

        plan = ot.emd(np.full(width, 1.0 / width), np.full(new_width, 1.0 / new_width), cost)
    row_mass = plan.sum(axis=1, keepdims=True)
    col_mass = plan.sum(axis=0, keepdims=True)
    merge = plan / np.where(col_mass > 0, col_mass, 1.0)
    readout = (plan / np.where(row_mass > 0, row_mass, 1.0)).T
    if unmerge == "lsq":
        readout = least_squares_unmerge(gram, merge)
    elif unmerge == "pinv":
        readout = np.linalg.pinv(merge)
    elif unmerge != "ot":
        raise ValueError(f"unknown unmerge {unmerge!r}")
    info = {
        "reg": reg,
        "unmerge": unmerge,
        "metric": metric,
        "target_mass": target_mass,
        "support": support.tolist(),
        "marginal_error": float(np.abs(row_mass[:, 0] - 1.0 / width).max() * width),
        "assignment_entropy": float(_mean_row_entropy(plan)),
        "transport_cost": float((plan * cost).sum()),
    }
    return ChannelTransform(group_id, merge, readout, method="dotresize", info=info)


def least_squares_unmerge(gram: np.ndarray, merge: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """``U = (MᵀGM + δI)⁻¹ MᵀG``: the linear map that best reads every old neuron back from
    the new ones, ``min_U ‖A − A·M·U‖²`` over the calibration rows (``G = AᵀA``). ``δ`` is
    ``ridge`` times the mean of ``diag(MᵀGM)``, only to keep dead neurons solvable."""
    support = _selection_support(merge)
    if support is not None:  # a 0/1 selection: the same numbers by indexing, not O(D²·k) products
        hessian = gram[np.ix_(support, support)].copy()
        across = gram[support, :]
    else:
        hessian = merge.T @ gram @ merge
        across = merge.T @ gram
    hessian += ridge * max(float(np.mean(np.diag(hessian))), 1e-30) * np.eye(hessian.shape[0])
    return np.linalg.solve(hessian, across)


def _selection_support(merge: np.ndarray) -> np.ndarray | None:
    """The kept row of each column when ``merge`` is a 0/1 selection (one 1 per column, at
    most one per row), else None. Products with such a matrix only copy entries, so indexing
    gives bit-identical results."""
    if merge.ndim != 2 or np.count_nonzero(merge) != merge.shape[1]:
        return None
    rows = np.argmax(merge != 0, axis=0)
    if not np.all(merge[rows, np.arange(merge.shape[1])] == 1.0) or len(set(rows.tolist())) != len(rows):
        return None
    return rows


def prune(group_id: str, stats: GroupStats, new_width: int, *, unmerge: str = "lsq") -> ChannelTransform:
    """Activation-norm pruning on the same machinery: keep the support neurons (``M`` a 0/1
    selection); their consumers read them as they are (``unmerge="ot"``: ``U = Mᵀ``) or with
    the least-squares readout that also stands in for the dropped ones (``"lsq"``)."""
    support = distinct_support(stats.gram, new_width)
    selection = np.zeros((stats.gram.shape[0], new_width))
    selection[support, np.arange(new_width)] = 1.0
    if unmerge not in ("lsq", "ot", "pinv"):
        raise ValueError(f"unknown unmerge {unmerge!r}")
    readout = least_squares_unmerge(stats.gram, selection) if unmerge == "lsq" else selection.T  # pinv = ot here
    info = {"unmerge": unmerge, "support": support.tolist()}
    return ChannelTransform(group_id, selection, readout, method="prune", info=info)


def _mean_row_entropy(plan: np.ndarray) -> float:
    """Mean entropy (nats) of each old neuron's distribution over new ones: 0 for a hard map."""
    rows = plan / plan.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(rows > 0, rows * np.log(rows), 0.0).sum(axis=1)
    return float(ent.mean())
