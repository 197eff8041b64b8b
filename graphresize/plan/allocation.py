"""Allocation: MLP widths per layer under one parameter budget (``--allocation global``).

The rule (pure numpy; inputs from :mod:`graphresize.plan.allocation_inputs`):

* **Loss curve** of MLP group ``l`` kept at width ``k``: the squared output error of the
  group's consumer map ``W`` (down_proj / fc2) when only the ``k`` neurons of largest
  activation norm are kept and read back by least squares (the prune solver's readout),
  summed over the calibration tokens::

      E_l(k) = tr(Wᵀ (G − G_{:S} G_SS⁻¹ G_{S:}) W),   S = the first k neurons by ‖A_i‖

  With the neurons in that order, ``G + δI = L Lᵀ`` (Cholesky) gives every ``k`` at once:
  ``E_l(k) = Σ_{j ≥ k} ‖Wᵀ L[:, j]‖²`` (the Schur complement of the kept block is the sum of
  the remaining Cholesky columns). ``δ`` = 1e-6 × mean diag(G), as in the lsq readout (raised
  tenfold until the factorisation succeeds when float32 accumulation left a rank-deficient
  Gram — fewer calibration tokens than neurons — indefinite by more than ``δ``). The
  same curve stands in for the OT merge (its support is the same neurons).
* **Weight**: ``w_l = 1 / S_l``, with ``S_l`` the energy (Σ‖x‖² over the same tokens) of the
  residual stream at the norm junction the MLP reads. So ``w_l·E_l(k)`` is the error relative
  to the stream it is added to; equivalently the unweighted relative error
  ``E_l(k)/E_l(0)`` times the layer's MLP-output / stream energy ratio ``E_l(0)/S_l``. A layer
  whose MLP output dominates the stream (SmolLM2 layers 0 and 11: 100–200×) keeps its width.
* **Budget**: ``--ratio r`` removes ``r·B`` parameters, ``B`` the transformer-block
  parameters (``allocation_inputs.block_parameters``). Greedy: every group starts at its full
  width; repeatedly take one step of ``multiple_of`` neurons from the group whose weighted loss
  increase per parameter removed, ``w_l (E_l(k−m) − E_l(k)) / (m·p_l)``, is least
  (``p_l`` = parameters per neuron), never below its floor, until at least ``r·B`` are gone.
  The kept parameters never exceed ``B·(1 − r)`` plus the untouched rest; the overshoot is
  less than one step. A budget the floors cannot meet is a usage error.
* **Floor**: ``floor_l = c·u·width_l`` rounded down to the step, ``u`` the share of MLP width
  uniform allocation would keep at the same budget; the factor ``c`` is chosen per run among
  candidates by ``choose_floor``: each candidate's widths scored once by the engine's
  hold-out KL (the whole engine's ``pipeline.allocate_stage``, the segment engine's
  ``engine/allocate.py``), never on an evaluation text; the least wins, ties the first.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from graphresize.errors import UsageError
from graphresize.io import publish

RIDGE = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class GroupCurve:
    """One MLP group's allocation inputs. ``loss[k]``: the unweighted output error kept at
    width ``k`` (``loss[width] = 0``, ``loss[0]`` = the MLP output energy); ``stream_energy``:
    the energy of the stream it is added to (None: not found, the layer weighs 1/mean of the
    others); ``params_per_channel``: parameters one neuron costs."""

    group_id: str
    layer: int | None
    width: int
    params_per_channel: int
    loss: np.ndarray
    stream_energy: float | None

    @property
    def output_energy(self) -> float:
        return float(self.loss[0])


@dataclasses.dataclass(frozen=True)
class AllocationEntry:
    group_id: str
    layer: int | None
    width: int
    new_width: int
    floor: int
    weight: float  # 1 / stream energy
    energy_ratio: float  # MLP output energy / stream energy
    relative_loss: float  # E(new_width) / E(0): the unweighted relative output error


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The widths chosen under one budget, and how (see the module docstring)."""

    entries: tuple[AllocationEntry, ...]
    ratio: float
    block_params: int
    target_removed: int  # ⌈r·B⌉
    removed: int  # parameters the chosen widths remove
    floor_factor: float
    uniform_share: float  # u: the share of MLP width uniform allocation keeps at this budget
    candidates: tuple[dict, ...] = ()  # per floor factor: hold-out score, removed parameters

    def widths(self) -> dict[str, int]:
        return {e.group_id: e.new_width for e in self.entries}

    def as_dict(self) -> dict:
        return {
            "rule": "greedy on the weighted loss per parameter: w_l·(E_l(k−m) − E_l(k))/(m·p_l), w_l = 1/stream energy",
            "ratio": self.ratio,
            "block_params": self.block_params,
            "target_removed": self.target_removed,
            "removed": self.removed,
            "removed_share_of_block": self.removed / self.block_params if self.block_params else 0.0,
            "floor_factor": self.floor_factor,
            "uniform_share": self.uniform_share,
            "candidates": list(self.candidates),
            "layers": [dataclasses.asdict(e) for e in self.entries],
        }


def error_curve(gram: np.ndarray, consumer: np.ndarray) -> np.ndarray:
    """``E(k)`` for ``k = 0..D`` (see the module docstring): ``gram`` D×D, ``consumer`` the
    D×n map that reads the group (rows = neurons). Neurons are taken in decreasing activation
    norm (ties: index order), the order the prune solver keeps them in."""
    order = np.argsort(-np.clip(np.diag(gram), 0.0, None), kind="stable")
    g = gram[np.ix_(order, order)].astype(np.float64)
    delta = RIDGE * max(float(np.mean(np.diag(g))), 1e-30)
    for _ in range(8):  # a Gram of fewer tokens than neurons, summed in float32, can be indefinite by more than δ
        try:
            lower = np.linalg.cholesky(g + delta * np.eye(len(g)))
            break
        except np.linalg.LinAlgError:
            delta *= 10.0
    else:
        raise np.linalg.LinAlgError("allocation: the calibration Gram is not positive semi-definite")
    contrib = np.square(lower.T @ consumer[order].astype(np.float64)).sum(axis=1)
    tail = np.concatenate([np.cumsum(contrib[::-1])[::-1], [0.0]])
    return tail


def step_of(width: int, multiple_of: int) -> int:
    """Rounding unit of a group's width, as ``plan.widths.narrowed_width`` rounds."""
    return max(1, multiple_of if width >= 4 * multiple_of else 1)


def uniform_share(curves: list[GroupCurve], target_removed: int) -> float:
    """The share of every group's width kept when ``target_removed`` parameters go evenly."""
    total = sum(c.width * c.params_per_channel for c in curves)
    return max(0.0, 1.0 - target_removed / total) if total else 1.0


def allocate(
    curves: list[GroupCurve],
    ratio: float,
    block_params: int,
    *,
    floor_factor: float = 0.0,
    multiple_of: int = 8,
) -> Allocation:
    """New widths removing at least ``ratio·block_params`` parameters from the groups of
    ``curves`` where the weighted loss per parameter is least (module docstring)."""
    target = int(np.ceil(ratio * block_params - 1e-9)) if ratio > 0 else 0
    share = uniform_share(curves, target)
    known = [c.stream_energy for c in curves if c.stream_energy]
    fallback = float(np.mean(known)) if known else 1.0
    weights = [1.0 / (c.stream_energy or fallback) for c in curves]
    steps = [step_of(c.width, multiple_of) for c in curves]
    floors = [min(c.width, int(floor_factor * share * c.width) // s * s) for c, s in zip(curves, steps, strict=True)]
    widths = [c.width for c in curves]

    def push(heap: list, i: int) -> None:
        k, s, c = widths[i], steps[i], curves[i]
        nxt = (k - 1) // s * s  # next multiple below (a width off the grid snaps to it)
        if nxt < max(floors[i], s):
            return
        cost = weights[i] * (c.loss[nxt] - c.loss[k]) / ((k - nxt) * c.params_per_channel)
        heapq.heappush(heap, (float(cost), i, nxt))

    heap: list = []
    for i in range(len(curves)):
        push(heap, i)
    removed = 0
    while removed < target:
        if not heap:
            raise UsageError(
                f"--allocation global: cannot remove {ratio:g} of the {block_params} block parameters from the "
                f"targeted widths (at most {removed} above the floors)"
            )
        _, i, nxt = heapq.heappop(heap)
        removed += (widths[i] - nxt) * curves[i].params_per_channel
        widths[i] = nxt
        push(heap, i)
    entries = tuple(
        AllocationEntry(
            group_id=c.group_id, layer=c.layer, width=c.width, new_width=k, floor=f, weight=w,
            energy_ratio=c.output_energy * w, relative_loss=float(c.loss[k] / c.loss[0]) if c.loss[0] > 0 else 0.0,
        )
        for c, k, f, w in zip(curves, widths, floors, weights, strict=True)
    )
    return Allocation(entries, ratio, block_params, target, removed, floor_factor, share)


@dataclasses.dataclass(frozen=True)
class FloorCandidate:
    """One floor factor's allocation: its widths, the parameters they remove, and the hold-out
    KL of those widths (None: not scored, a single candidate)."""

    floor_factor: float
    widths: dict[str, int]
    removed: int
    holdout_kl: float | None

    def row(self) -> dict:
        """The report's row (``Allocation.candidates``)."""
        return {"floor_factor": self.floor_factor, "holdout_kl": self.holdout_kl, "removed": self.removed}


@dataclasses.dataclass(frozen=True)
class FloorChoice:
    """The chosen floor factor's allocation (its ``candidates`` rows filled) and every
    candidate, in the order of the factors."""

    allocation: Allocation
    candidates: tuple[FloorCandidate, ...]

    @property
    def floor_factor(self) -> float:
        return self.allocation.floor_factor


def choose_floor(
    curves: list[GroupCurve],
    ratio: float,
    block_params: int,
    factors: Sequence[float],
    score: Callable[[Allocation], float | None],
    *,
    multiple_of: int = 8,
) -> FloorChoice:
    """The floor factor of least hold-out score among ``factors``: every factor's allocation
    (``allocate``); each distinct set of widths scored once by ``score`` (lower is better;
    None: not scored), and only when there is more than one factor to choose between; the
    least score wins, an unscored one counting as 0, ties the first factor in order (so the
    chosen allocation's floors are the first factor's that gives those widths)."""
    if not factors:
        raise ValueError("choose_floor: no floor factor to choose from")
    scores: dict[tuple, float | None] = {}
    candidates, best = [], None
    for factor in factors:
        allocation = allocate(curves, ratio, block_params, floor_factor=factor, multiple_of=multiple_of)
        key = tuple(sorted(allocation.widths().items()))
        if key not in scores:
            scores[key] = score(allocation) if len(factors) > 1 else None
        candidates.append(FloorCandidate(factor, allocation.widths(), allocation.removed, scores[key]))
        if best is None or (scores[key] or 0.0) < (scores[best[1]] or 0.0):
            best = (allocation, key)
    chosen = dataclasses.replace(best[0], candidates=tuple(c.row() for c in candidates))
    return FloorChoice(chosen, tuple(candidates))


def plot_profile(allocation: Allocation, path: str | Path) -> Path | None:
    """The kept width of every group per layer, against the uniform width at the same budget,
    as a PNG; None when matplotlib is not installed (the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [e.layer if e.layer is not None else i for i, e in enumerate(allocation.entries)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.3 * len(xs) + 3), 5.5), sharex=True)
    top.bar(xs, [e.new_width / e.width for e in allocation.entries], color="tab:blue", label="kept (global)")
    top.axhline(allocation.uniform_share, color="grey", ls="--", lw=0.9, label="uniform at the same budget")
    top.plot(xs, [e.floor / e.width for e in allocation.entries], "k_", ms=10, label="floor")
    top.set_ylabel("MLP width kept")
    top.set_ylim(0, 1.05)
    top.legend(fontsize="small", loc="lower right")
    top.set_title(f"allocation: {allocation.removed / max(allocation.block_params, 1):.1%} of block parameters removed")
    bottom.semilogy(xs, [max(e.energy_ratio, 1e-12) for e in allocation.entries], "o-", color="tab:red")
    bottom.set_ylabel("MLP out / stream energy")
    bottom.set_xlabel("layer")
    fig.tight_layout()
    written = publish.write_figure(fig, Path(path))
    plt.close(fig)
    return written


def apply(plan, allocation: Allocation):
    """``plan`` (a ``ResizePlan``) with the allocation's widths for its groups."""
    widths = allocation.widths()
    entries = tuple(dataclasses.replace(e, new_width=widths.get(e.group_id, e.new_width)) for e in plan.entries)
    return dataclasses.replace(plan, entries=entries)


def apply_to(found, allocation: Allocation):
    """``found`` (the pipeline's ``Analysis``: a dataclass with a ``plan``) with its plan's
    widths from the allocation (``apply``)."""
    return dataclasses.replace(found, plan=apply(found.plan, allocation))
