"""Global allocation on the segment engine (``--engine segment --allocation global``), in
bounded memory.

The math is :mod:`graphresize.plan.allocation`'s; this module only changes where its inputs
come from and how the floor factor's candidates are scored, so that no step holds more than
one segment's weights and one group's Gram:

1. **Curves** (one walk over the *dense* segments, calibration batches carried as in
   ``engine/sequential.py``): each MLP group's solver statistics (its Gram) and the energy of
   the stream its norm reads are accumulated where the segment computing them runs. As soon
   as a group's statistics are complete its loss curve ``E_l(k)`` and stream energy ``S_l``
   (small vectors) are taken, and its Gram is written to a ``.npz`` file in a temporary folder
   and dropped. These are the statistics the whole-model engine computes (the dense model,
   sums over the same window batches), so the curves and the widths are the same.
2. **Budget and candidates**: ``allocation.choose_floor``, the rule of the whole-model
   ``allocate_stage``, with this engine's score: each candidate (more than one floor factor)
   is solved group by group from the stored Grams (dense statistics, as the whole-model engine
   solves them) and rewritten on a clone of the model whose rewritten weights are spilled to
   disk after every group (``io/spill.settle``); its hold-out logits are computed segment by
   segment (``sequential.forward``, spilled to disk) and scored by the mean KL to the dense
   logits, window by window.
3. **Solves kept** (``plan/solved.py``): every solve is written to the temporary folder and
   keyed by group and width, so a width that another candidate already has is read back, not
   solved again.
4. **Final rewrite** (``stats``): ``dense`` — the chosen widths' kept solves (the ones the
   candidate was scored with; solved now only when there was a single candidate) rewritten
   into the model group by group: the whole-model engine's model, in bounded memory.
   ``sequential`` — the chosen widths handed to the segment engine (``sequential.run``), which
   solves each group from the statistics of the input it really receives (every earlier
   segment already narrowed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphresize.calibrate.statistics import GroupStats, Statistics, StatRequest, _Accumulator
from graphresize.engine import sequential, shards
from graphresize.engine.carry import Carry, OnDisk
from graphresize.engine.segments import cut_model
from graphresize.io import spill
from graphresize.plan import allocation as alloc
from graphresize.plan import allocation_inputs
from graphresize.plan.solved import SolveCache
from graphresize.plan.widths import ResizePlan
from graphresize.solve.transforms import ChannelTransform

#: ``AllocationOutcome.stats``: how the chosen widths are solved (module docstring, step 4).
FINAL_STATS = ("dense", "sequential")


@dataclasses.dataclass(frozen=True, eq=False)
class AllocationOutcome:
    """The analysis with the chosen plan, the allocation (with its candidates' hold-out KL),
    the written transforms (matrices dropped), the dense hold-out logits (on disk)."""

    found: object  # pipeline.Analysis
    allocation: alloc.Allocation
    transforms: dict[str, ChannelTransform]
    reference: OnDisk


class _GramStore:
    """Per-group solver statistics in ``.npz`` files of a temporary folder (removed on close)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="graphresize-grams-"))
        self._files: dict[str, Path] = {}

    def put(self, key: str, stats: GroupStats) -> None:
        path = self.folder / f"{len(self._files)}.npz"
        np.savez(path, gram=stats.gram, total=stats.total, count=np.int64(stats.count))
        self._files[key] = path

    def get(self, key: str) -> GroupStats:
        with np.load(self._files[key]) as data:
            return GroupStats(gram=data["gram"], total=data["total"], count=int(data["count"]))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def dense_curves(model: ir.Model, groups: list, requests: dict[str, list[StatRequest]], batches: list[np.ndarray],
                 store: _GramStore, options) -> list[alloc.GroupCurve]:
    """Step 1 of the module docstring: one walk over the dense segments; the curve of every
    group of ``groups`` (``requests[gid]``: its solver's statistics), its solver statistics
    written to ``store``. At most one segment's accumulators are held at a time."""
    streams = {r.key: r for r in allocation_inputs.stream_requests(model, groups)}
    cut = cut_model(model)
    where = sequential._locations(cut)
    wanted: dict[str, list[StatRequest]] = {}
    for group in groups:
        stream = streams.get(allocation_inputs.STREAM_KEY + group.id)
        wanted[group.id] = [*requests[group.id], *([stream] if stream is not None else [])]
    at: dict[int, list[tuple[StatRequest, tuple[str, ...]]]] = {}
    done_at: dict[str, int] = {}  # group -> the segment after which all its statistics are summed
    for gid, reqs in wanted.items():
        for request in reqs:
            for entry in request.values:
                k = max(where[n] for n in entry)
                at.setdefault(k, []).append((request, entry))
                done_at[gid] = max(done_at.get(gid, -1), k)
    acc: dict[str, _Accumulator] = {}
    frozen: dict[str, GroupStats] = {}
    curves: dict[str, alloc.GroupCurve] = {}
    located = {r.key: {max(where[n] for n in e) for e in r.values} for reqs in wanted.values() for r in reqs}

    def add(request: StatRequest, rows: np.ndarray) -> None:
        if request.key not in acc:
            acc[request.key] = _Accumulator(request.width, request.unit_rms)
        acc[request.key].add(rows)

    def finish(k: int) -> None:
        for group in groups:
            if done_at[group.id] != k:
                continue
            stats = {r.key: frozen.pop(r.key) if r.key in frozen else acc.pop(r.key).freeze()
                     for r in wanted[group.id] if r.key in frozen or r.key in acc}
            curves[group.id] = allocation_inputs.curve(model, group, stats)
            for request in requests[group.id]:
                store.put(request.key, stats[request.key])
            del stats

    last = max(at)
    runner = shards.make_runner(options)  # None: no --workers/--ray-address
    with Carry(len(batches)) as carry, contextlib.closing(runner or shards.SerialRunner()):
        sequential._run_side(model, cut, batches, carry, options.provider)
        for request, entry in at.get(-1, []):
            for values in carry.batches:
                add(request, sum(np.asarray(values[n]) for n in entry))
        finish(-1)
        for k in tqdm(range(last + 1), desc="allocation curves", unit="seg", disable=not options.progress, leave=False):
            here = list({id(r): r for r, _ in at.get(k, [])}.values())
            if runner is not None and all(located[r.key] == {k} for r in here):
                # sharded sums of segment k's statistics (engine/shards.py), then the stream moves on
                if here:
                    frozen.update(shards.accumulate(runner, model, cut, k, carry, here, options.provider))
                if k < last:
                    sequential._advance(model, cut, k, carry, options.provider)
                spill.settle(model)
                finish(k)
                continue
            names = sorted({n for _, entry in at.get(k, []) for n in entry})
            later = cut.readers_after(k)
            outputs = sorted((cut.segments[k].produces() & later) | set(names))
            for b, values in sequential._run(model, cut, k, carry, outputs, options.provider):
                for request, entry in at.get(k, []):
                    add(request, sum(values[n] for n in entry))
                for name in outputs:
                    if name in later:
                        carry.put(b, name, values[name])
            carry.keep(later)
            spill.settle(model)
            finish(k)
    return [curves[g.id] for g in groups]


def stored_solver(store: _GramStore, method, options, requests: dict[str, list[StatRequest]], tokens: int) -> SolveCache:
    """Solves of plan entries from the stored dense statistics, each kept in ``store``'s folder
    (``plan/solved.py``): a group solved at one width while scoring a candidate is not solved
    again for another candidate or for the final rewrite."""

    def solve(entry):
        view = Statistics(groups={r.key: store.get(r.key) for r in requests[entry.group_id]}, tokens=tokens)
        return method.solve(entry, view, options)

    return SolveCache(solve, store.folder)


def rewrite_stored(model: ir.Model, found, plan: ResizePlan, solve: SolveCache) -> dict[str, ChannelTransform]:
    """Every changed group of ``plan`` solved by ``solve`` and rewritten into ``model``, one
    group at a time (its rewritten weights spilled before the next); the transforms with their
    matrices dropped."""
    from graphresize.passes import ResizeGroupsPass

    written: dict[str, ChannelTransform] = {}
    for entry in plan.changed():
        transform = solve(entry)
        if transform is None:
            continue
        ResizeGroupsPass(found.groups, {entry.group_id: transform})(model)
        written.update(sequential._slim({entry.group_id: transform}))
        del transform
        spill.settle(model)
    return written


def holdout_kl(model: ir.Model, windows: np.ndarray, reference, provider: str) -> float:
    """Mean KL(dense ‖ model) per position on the hold-out ``windows``: logits computed segment
    by segment and spilled to disk, then read back and scored one window at a time."""
    from graphresize.verify.compare import mean_kl

    outputs = sequential.forward(model, windows, provider=provider, spill_bytes=0)
    total, count = 0.0, 0
    for i in range(len(outputs)):
        new = np.array(outputs[i])
        outputs[i] = None  # unmap the window's file
        positions = int(np.prod(new.shape[:-1]))
        total += mean_kl([reference[i]], [new]) * positions
        count += positions
        del new
    return total / max(count, 1)


def _clone(model: ir.Model) -> ir.Model:
    """A copy of the graph sharing the weights (the rewrite replaces them, never mutates them),
    spilling its rewritten weights into the same store as ``model``."""
    copy = model.clone()
    store = model.meta.get(spill.META_KEY)
    if store is not None:
        copy.meta[spill.META_KEY] = store
    return copy


def run(model: ir.Model, found, windows, method, options, lap: Callable[[str], None], *,
        stats: str = "dense") -> AllocationOutcome:
    """Steps 1-4 of the module docstring; ``model`` is rewritten in place (not cleaned up)."""
    if stats not in FINAL_STATS:
        raise ValueError(f"stats must be one of {FINAL_STATS}, got {stats!r}")
    say = (lambda m: tqdm.write(m)) if options.progress else (lambda m: None)
    reference = sequential.dense_reference(model, windows.holdout, options.provider, spill_bytes=0)
    lap("reference")
    mlp = allocation_inputs.mlp_groups(found.groups, found.plan)
    requests = {e.group_id: method.stat_requests(found.groups.by_id(e.group_id), found.layouts) for e in found.plan.changed()}
    batches = [windows.calib[i : i + options.batch_size] for i in range(0, len(windows.calib), options.batch_size)]
    tokens = int(windows.calib.size)
    store = _GramStore()
    try:
        curves = dense_curves(model, mlp, requests, batches, store, options)
        lap("calibrate")
        block = allocation_inputs.block_parameters(model, found.groups)
        solved = stored_solver(store, method, options, requests, tokens)

        def score(allocation: alloc.Allocation) -> float:
            copy = _clone(model)
            rewrite_stored(copy, found, alloc.apply(found.plan, allocation), solved)
            kl = holdout_kl(copy, windows.holdout, reference, options.provider)
            say(f"allocation: floor factor {allocation.floor_factor:g}: hold-out KL {kl:.4f}")
            return kl

        choice = alloc.choose_floor(curves, options.ratio, block, options.allocation_floors, score,
                                    multiple_of=options.multiple_of)
        allocation = choice.allocation
        chosen = alloc.apply_to(found, allocation)
        lap("solve")
        if stats == "dense":
            transforms = rewrite_stored(model, chosen, chosen.plan, solved)
            say(f"allocation: {solved.solves} solves, {solved.reuses} reused")
            lap("rewrite")
        else:
            store.close()
            outcome = sequential.run(model, chosen, windows, method, options, lap)
            transforms = outcome.transforms
    finally:
        store.close()
    return AllocationOutcome(chosen, allocation, transforms, reference)
