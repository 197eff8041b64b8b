"""The segment-by-segment engine (``--engine segment``): sequential statistics in bounded memory.

Data flow (``DESIGN.md``): the side model runs once per window batch (graph inputs → mask,
positions, rotary tables, embedding output); then, for each segment in stream order, its
groups' statistics are accumulated from the input it really receives (every earlier segment
already resized), solved by the method's own ``solve``, written into the model by
``ResizeGroupsPass``, and the rewritten segment is run to make the next segment's input. Only
one segment's ORT session exists at a time; the carried values are per-batch arrays
(memory-mapped on disk when large, ``engine/carry.py``). Statistics are sums over window
batches (``calibrate.statistics``), so a segment's calibration can be sharded.

Groups that span the whole stream (the global residual transforms of dotresize/pca/prune on
``--target residual|all``) cannot be solved segment by segment: one transform serves every
junction. Their statistics are accumulated in a first pass through the *dense* segments (the
same sums the whole-model pass computes, in bounded memory), solved and rewritten first; the
sequential pass for the local (MLP) groups then runs on the stream-resized model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphresize.calibrate.statistics import GroupStats, Statistics, StatRequest, _Accumulator
from graphresize.engine import shards
from graphresize.engine.carry import SPILL_BYTES, Carry, OnDisk
from graphresize.engine.segments import SegmentCut, SegmentError, cut_model
from graphresize.engine.submodel import segment_session
from graphresize.errors import VerificationError
from graphresize.io.ort_utils import cache_head_sizes, make_feeds
from graphresize.io.spill import settle
from graphresize.methods.base import Method, RewriteContext, norm_passes
from graphresize.plan.widths import GroupPlan
from graphresize.solve.transforms import ChannelTransform

_ORT_TYPES = {ir.DataType.INT64: "tensor(int64)", ir.DataType.INT32: "tensor(int32)", ir.DataType.FLOAT: "tensor(float)",
              ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.DOUBLE: "tensor(double)", ir.DataType.BOOL: "tensor(bool)"}


@dataclasses.dataclass(frozen=True, eq=False)
class EngineOutcome:
    """What the engine hands back: the solved transforms, the statistics they were solved
    from, the dense hold-out outputs (for verification), the number of segments and of
    carried arrays spilled to disk."""

    transforms: dict[str, ChannelTransform]  # shapes and info; matrices dropped once written (``_slim``)
    stats: Statistics
    reference: list[np.ndarray]
    segments: int
    spilled: int


@dataclasses.dataclass(frozen=True)
class _Arg:
    """What ``make_feeds`` reads of an ORT input (name, type string, shape)."""

    name: str
    type: str
    shape: list


class _GraphInputs:
    """The model's graph inputs, shaped like an ORT session for ``make_feeds``."""

    def __init__(self, model: ir.Model) -> None:
        self._args = [_Arg(v.name, _ORT_TYPES.get(v.dtype, str(v.dtype)),
                           [d if isinstance(d, int) else None for d in (v.shape or [])]) for v in model.graph.inputs]
        self.graphresize_cache_head_sizes = cache_head_sizes(model)

    def get_inputs(self) -> list[_Arg]:
        return self._args


def _slim(transforms: dict[str, ChannelTransform]) -> dict[str, ChannelTransform]:
    """The transforms once written into the model: shapes and ``info`` kept (the report reads
    them), the matrices replaced by zero-memory broadcasts (O(width²) each, not needed)."""
    return {gid: dataclasses.replace(t, merge=np.broadcast_to(np.float64(0), t.merge.shape),
                                     unmerge=np.broadcast_to(np.float64(0), t.unmerge.shape))
            for gid, t in transforms.items()}


def check(model: ir.Model, entries: Sequence[GroupPlan], groups, requests: dict[str, list[StatRequest]]) -> None:
    """Raise ``SegmentError`` unless the engine can run these groups on this model: the model
    cuts; every local (non-residual) group's statistics come from one segment and its weights
    are read by no earlier segment."""
    cut = cut_model(model)
    where = _locations(cut)
    first_use = _first_use(cut)
    for entry in entries:
        if entry.kind == "residual":
            continue
        k = _segment_of(requests[entry.group_id], where)
        if k < 0:
            raise SegmentError(f"{entry.group_id}: its statistics are side values")
        early = [p.name for p in groups.by_id(entry.group_id).params if first_use.get(p.name, k) < k]
        if early:
            raise SegmentError(f"{entry.group_id}: weight {early[0]} is read before segment {k}")


def run(model: ir.Model, found, windows, method: Method, options, lap: Callable[[str], None], *,
        keep_stats: bool = False) -> EngineOutcome:
    """Calibrate, solve and rewrite every changed group of ``found.plan`` segment by segment
    (the module docstring has the order); ``model`` is rewritten in place, not cleaned up.
    A group's statistics (an O(width²) Gram) are dropped once it is solved unless
    ``keep_stats``."""
    from graphresize.passes import ResizeGroupsPass, RewriteManager

    reference = dense_reference(model, windows.holdout, options.provider)  # read back window by window
    lap("reference")
    entries = list(found.plan.changed())
    requests = {e.group_id: method.stat_requests(found.groups.by_id(e.group_id), found.layouts) for e in entries}
    batches = [windows.calib[i : i + options.batch_size] for i in range(0, len(windows.calib), options.batch_size)]
    stats: dict[str, GroupStats] = {}
    transforms: dict[str, ChannelTransform] = {}
    spilled = 0

    def solve(chosen: list[GroupPlan]) -> dict[str, ChannelTransform]:
        view = Statistics(groups=stats, tokens=int(windows.calib.size))
        solved = {e.group_id: method.solve(e, view, options) for e in chosen}
        if not keep_stats:
            for entry in chosen:
                for request in requests[entry.group_id]:
                    stats.pop(request.key, None)
        return {gid: t for gid, t in solved.items() if t is not None}

    global_entries = [e for e in entries if e.kind == "residual"]
    walked = [e for e in global_entries if getattr(method, "sequential", False) and e.group_id in found.layouts]
    if walked:  # per-junction bases solved in stream order (engine/junction_walk.py), then routed
        from graphresize.engine.junction_walk import walk_bases

        solved = walk_bases(model, found, batches, method, walked, requests, options)
        transforms.update(solved)
        lap("calibrate")
        ctx = RewriteContext(model, found.groups, found.layouts, None, solved, options)
        RewriteManager(method.rewrite_passes(ctx))(model)
        transforms.update(_slim(solved))
        lap("rewrite")
        global_entries = [e for e in global_entries if e not in walked]
    if global_entries:  # one transform for the whole stream: dense statistics, rewritten first
        wanted = [r for e in global_entries for r in requests[e.group_id]]
        stats.update(_dense_statistics(model, batches, wanted, options))
        lap("calibrate")
        solved = solve(global_entries)
        transforms.update(solved)
        lap("solve")
        ctx = RewriteContext(model, found.groups, found.layouts, None, solved, options)
        RewriteManager([ResizeGroupsPass(found.groups, solved), *norm_passes(ctx)])(model)
        transforms.update(_slim(solved))
        settle(model)
        lap("rewrite")
    local = [e for e in entries if e.kind != "residual"]
    cut = cut_model(model)
    if local:
        where = _locations(cut)
        by_segment: dict[int, list[GroupPlan]] = {}
        for entry in local:
            by_segment.setdefault(_segment_of(requests[entry.group_id], where), []).append(entry)
        last = max(by_segment)
        runner = shards.make_runner(options)  # None: no --workers/--ray-address
        with Carry(len(batches)) as carry, contextlib.closing(runner or shards.SerialRunner()):
            _run_side(model, cut, batches, carry, options.provider)
            for k in tqdm(range(last + 1), desc="segments", unit="seg", disable=not options.progress, leave=False):
                mine = by_segment.get(k, [])
                if mine:
                    wanted = [r for e in mine for r in requests[e.group_id]]
                    stats.update(_accumulate(model, cut, k, carry, wanted, options.provider) if runner is None
                                 else shards.accumulate(runner, model, cut, k, carry, wanted, options.provider))
                    lap("calibrate")
                    solved = solve(mine)
                    transforms.update(solved)
                    lap("solve")
                    ResizeGroupsPass(found.groups, solved)(model)
                    transforms.update(_slim(solved))
                    del solved
                    settle(model)  # rewritten weights to disk (when the run spills), maps closed
                    cut = cut_model(model)
                    lap("rewrite")
                if k < last:
                    _advance(model, cut, k, carry, options.provider)
                    settle(model)
                    lap("calibrate")
            spilled = carry.spilled
    return EngineOutcome(transforms, Statistics(groups=stats, tokens=int(windows.calib.size)), reference,
                         len(cut.segments), spilled)


class InputNotRunnable(VerificationError):
    """ONNX Runtime refused a segment of the *input* model (before any rewrite): the
    pipeline reports it as it reports the whole engine's refusal of the input."""


def dense_reference(model: ir.Model, windows: np.ndarray, provider: str, spill_bytes: int = SPILL_BYTES) -> OnDisk:
    """The input model's outputs on ``windows``, segment by segment, kept on disk; the first
    ORT sessions of a run, so a refusal is the input's (``InputNotRunnable``)."""
    try:
        return OnDisk(forward(model, windows, provider=provider, spill_bytes=spill_bytes))
    except InputNotRunnable:
        raise
    except VerificationError as exc:
        reason = str(exc).split(": ", 1)[-1]
        raise InputNotRunnable(f"ONNX Runtime cannot load the graph: {reason}") from None


def forward(model: ir.Model, windows: np.ndarray, *, batch_size: int = 1, provider: str = "cpu",
            spill_bytes: int = SPILL_BYTES) -> list[np.ndarray]:
    """The first graph output for each batch of ``windows`` (one window per batch by default,
    as ``verify.compare.reference_outputs``), computed segment by segment."""
    cut = cut_model(model)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with Carry(len(batches), spill_bytes) as carry:
        _run_side(model, cut, batches, carry, provider)
        for k in range(len(cut.segments)):
            _advance(model, cut, k, carry, provider)
            settle(model)
        return [np.asarray(values[cut.output]) for values in carry.batches]


def _locations(cut: SegmentCut) -> dict[str, int]:
    """value name -> the segment computing it (-1: the side model or a graph input)."""
    where = {name: -1 for name in cut.side.produces()}
    for seg in cut.segments:
        where.update({name: seg.index for name in seg.produces() if name not in where})
    return where


def _first_use(cut: SegmentCut) -> dict[str, int]:
    """initializer name -> the first segment reading it (-1: the side model)."""
    first: dict[str, int] = {}
    for seg in (cut.side, *cut.segments):
        for name in seg.initializers:
            first.setdefault(name, seg.index)
    return first


def _segment_of(requests: Sequence[StatRequest], where: dict[str, int]) -> int:
    names = [n for r in requests for n in r.names()]
    missing = [n for n in names if n not in where]
    if missing:
        raise SegmentError(f"statistic value {missing[0]} is computed by no segment")
    return max(where[n] for n in names)


def _batch_feeds(model: ir.Model, ids: np.ndarray) -> dict[str, np.ndarray]:
    return make_feeds(_GraphInputs(model), ids)


def _run_side(model: ir.Model, cut: SegmentCut, batches: list[np.ndarray], carry: Carry, provider: str) -> None:
    """Graph inputs and side values of every batch into ``carry``."""
    session = segment_session(model, cut.side, cut.side_outputs, provider=provider) if cut.side_outputs else None
    needed = {name for seg in cut.segments for name in seg.inputs}
    for b, ids in enumerate(batches):
        feeds = _batch_feeds(model, ids)
        for name, array in feeds.items():
            if name in needed:
                carry.put(b, name, array)
        if session is not None:
            outputs = session.run(list(cut.side_outputs), {n: feeds[n] for n in cut.side.inputs})
            for name, array in zip(cut.side_outputs, outputs, strict=True):
                carry.put(b, name, array)
    del session


def _run(model: ir.Model, cut: SegmentCut, k: int, carry: Carry, outputs: list[str], provider: str):
    """Yield (batch, {output: array}) for segment ``k`` over every carried batch."""
    seg = cut.segments[k]
    session = segment_session(model, seg, outputs, provider=provider)
    for b, values in enumerate(carry.batches):
        result = session.run(outputs, {n: np.ascontiguousarray(values[n]) for n in seg.inputs})
        yield b, dict(zip(outputs, result, strict=True))


def _advance(model: ir.Model, cut: SegmentCut, k: int, carry: Carry, provider: str) -> None:
    """Run segment ``k`` on every batch: its values that later segments read (the first
    graph output for the head) replace what no later segment reads."""
    later = cut.readers_after(k)
    seg = cut.segments[k]
    outputs = sorted(seg.produces() & later) if k + 1 < len(cut.segments) else [cut.output]
    for b, values in _run(model, cut, k, carry, outputs, provider):
        for name, array in values.items():
            carry.put(b, name, array)
    carry.keep(later | set(outputs) if k + 1 == len(cut.segments) else later)


def _accumulate(model: ir.Model, cut: SegmentCut, k: int, carry: Carry, requests: list[StatRequest],
                provider: str) -> dict[str, GroupStats]:
    """Statistics of ``requests`` (all computed by segment ``k``) over every carried batch."""
    names = list(dict.fromkeys(n for r in requests for n in r.names()))
    acc = {r.key: _Accumulator(r.width, r.unit_rms) for r in requests}
    for _, values in _run(model, cut, k, carry, names, provider):
        for request in requests:
            for entry in request.values:
                acc[request.key].add(sum(values[name] for name in entry))
    return {key: a.freeze() for key, a in acc.items()}


def _dense_statistics(model: ir.Model, batches: list[np.ndarray], requests: list[StatRequest], options) -> dict[str, GroupStats]:
    """``requests`` over the unchanged model, walking its segments in order: each entry is
    accumulated where the segment that computes all its values runs (the side model for the
    embedding output)."""
    cut = cut_model(model)
    where = _locations(cut)
    acc = {r.key: _Accumulator(r.width, r.unit_rms) for r in requests}
    at: dict[int, list[tuple[str, tuple[str, ...]]]] = {}
    for request in requests:
        for entry in request.values:
            at.setdefault(max(where[n] for n in entry), []).append((request.key, entry))
    last = max(at)
    with Carry(len(batches)) as carry:
        _run_side(model, cut, batches, carry, options.provider)
        for key, entry in at.get(-1, []):
            for values in carry.batches:
                acc[key].add(sum(np.asarray(values[n]) for n in entry))
        for k in tqdm(range(last + 1), desc="stream statistics", unit="seg", disable=not options.progress, leave=False):
            names = sorted({n for _, entry in at.get(k, []) for n in entry})
            later = cut.readers_after(k)
            outputs = sorted((cut.segments[k].produces() & later) | set(names))
            for b, values in _run(model, cut, k, carry, outputs, options.provider):
                for key, entry in at.get(k, []):
                    acc[key].add(sum(values[n] for n in entry))
                for name in outputs:
                    if name in later:
                        carry.put(b, name, values[name])
            carry.keep(later)
            settle(model)
    return {key: a.freeze() for key, a in acc.items()}
