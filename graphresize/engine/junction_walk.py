"""Sequential per-junction bases (SliceGPT's ``rotate_and_slice_sequential``) on the segment engine.

Rule. With bases ``Q_0..Q_{k-1}`` fixed and every later junction still at full width, the
routed model's stream entering junction ``k`` is, in the original coordinates,

    s_0 = embedding output,      s_{k+1} = dense_segment_k(Q_k·Q_kᵀ · s_k)

because junction ``k``'s readers read ``Q_kᵀ·W`` through a norm that divides by the full
width (rotation-invariant), its skip carries ``x·Q_kᵀ`` back to the full-width slot ``k+1``,
and the writers into that slot are unchanged. So the walk runs the *dense* segments in stream
order, and at each junction: accumulates the Gram of the carried stream (float64), lets the
method solve ``Q_k`` from it, and replaces the carried stream by its projection
``s·Q_k·Q_kᵀ`` before the segment that reads it runs. One pass over the segments, one
segment's ORT session at a time; the routing itself is applied once, after the walk, by the
method's rewrite (``RouteJunctionsPass``), and computes exactly this recursion.

Written by hand for graphresize (the recursion is derived above; SliceGPT's reference code
slices weights layer by layer in torch instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphresize.calibrate.statistics import GroupStats, StatRequest
from graphresize.engine.carry import Carry
from graphresize.engine.segments import SegmentError, cut_model

#: solve(request index, statistics of the stream it receives) -> basis (D×d, orthonormal columns)
Solver = Callable[[int, GroupStats], np.ndarray]


def stream_stats(arrays, unit_rms: bool = False) -> GroupStats:
    """``AᵀA`` (float64), ``Σ A`` and the row count over the rows of ``arrays`` (with
    ``unit_rms``: each row first scaled to unit root-mean-square, as ``_Accumulator``)."""
    gram, total, count = None, None, 0
    for array in arrays:
        rows = np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])
        if unit_rms:
            rows = rows / np.sqrt(np.mean(np.square(rows), axis=1, keepdims=True) + 1e-12)
        gram = rows.T @ rows if gram is None else gram + rows.T @ rows
        total = rows.sum(axis=0) if total is None else total + rows.sum(axis=0)
        count += rows.shape[0]
    return GroupStats(gram=gram, total=total, count=count)


def walk_junctions(model: ir.Model, batches: Sequence[np.ndarray], requests: Sequence[StatRequest], solve: Solver, *,
                   provider: str = "cpu", progress: bool = False) -> list[tuple[GroupStats, np.ndarray]]:
    """For each request (one junction's stream value, in any order), the statistics of the
    stream it receives when every earlier junction is sliced to its solved basis, and that
    basis; ``model`` is not changed (``Raise SegmentError`` if it does not cut, or a request is
    not one carried stream value)."""
    from graphresize.engine.sequential import _advance, _locations, _run_side

    cut = cut_model(model)
    where = _locations(cut)
    at: dict[int, list[int]] = {}
    for i, request in enumerate(requests):
        if len(request.values) != 1 or len(request.values[0]) != 1:
            raise SegmentError(f"{request.key}: a junction walk needs one stream value per junction")
        name = request.values[0][0]
        if name not in where:
            raise SegmentError(f"statistic value {name} is computed by no segment")
        at.setdefault(where[name], []).append(i)
    last = max(at)
    found: list[tuple[GroupStats, np.ndarray] | None] = [None] * len(requests)
    with Carry(len(batches)) as carry:
        _run_side(model, cut, batches, carry, provider)
        for k in tqdm(range(-1, last + 1), desc="junctions", unit="seg", disable=not progress, leave=False):
            if k >= 0:
                _advance(model, cut, k, carry, provider)
            for i in at.get(k, []):
                request = requests[i]
                name = request.values[0][0]
                if name not in carry.batches[0]:
                    raise SegmentError(f"junction stream {name} is read by no later segment")
                stats = stream_stats([values[name] for values in carry.batches], request.unit_rms)
                basis = solve(i, stats)
                found[i] = (stats, basis)
                if basis.shape[1] < basis.shape[0]:  # the next segment reads the projected stream
                    projector = basis @ basis.T
                    for b, values in enumerate(carry.batches):
                        array = values[name]
                        carry.put(b, name, (np.asarray(array, dtype=np.float64) @ projector).astype(array.dtype))
    return found  # type: ignore[return-value]


def walk_bases(model: ir.Model, found, batches: Sequence[np.ndarray], method, entries, requests: dict, options) -> dict:
    """The transforms of the residual ``entries`` of a per-junction ``method`` (``SliceGPT``):
    the method's stream preparation (``prepare_stream``), then every junction's basis from the
    walk, handed to ``method.adopt`` for its rewrite."""
    for entry in entries:
        method.prepare_stream(model, found.groups.by_id(entry.group_id), found.layouts[entry.group_id])
    order = [(entry, k) for entry in entries for k in range(method.junction_count(entry.group_id))]
    flat = [requests[entry.group_id][k] for entry, k in order]
    widths = {entry.group_id: method.widths(entry, method.junction_count(entry.group_id)) for entry in entries}

    def solve(i: int, stats: GroupStats) -> np.ndarray:
        entry, k = order[i]
        return method.solve_junction(stats, widths[entry.group_id][k], options)

    solved = walk_junctions(model, batches, flat, solve, provider=options.provider, progress=options.progress)
    transforms = {}
    for entry in entries:
        mine = [solved[i] for i, (e, _) in enumerate(order) if e is entry]
        transforms[entry.group_id] = method.adopt(entry, [b for _, b in mine], [s for s, _ in mine], sequential=True)
    return transforms
