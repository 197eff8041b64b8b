"""The optimize pipeline: load ─► analyze ─► calibrate ─► plan ─► solve ─► rewrite ─► verify ─► save.

``run_optimize`` is the data-flow diagram of ``DESIGN.md`` as a sequence of stage calls, one
function per stage below it. What differs between methods lives in their strategy
(``graphresize/methods/``), chosen by name from the registry.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphresize.analysis.channels import FLOAT_TYPES
from graphresize.analysis.groups import WidthGroup, WidthGroups, find_groups
from graphresize.analysis.norms import find_norms
from graphresize.analysis.residual import ResidualLayout, residual_layout
from graphresize.calibrate import tokens
from graphresize.calibrate.statistics import Statistics, calibrate
from graphresize.errors import InputError, UnsupportedModelError, UsageError, VerificationError
from graphresize.fusion import FusionOutcome, fuse_for_ort, max_positions_beside
from graphresize.io import graphcheck, modelio, spill, stats_cache
from graphresize.io.ort_utils import make_feeds, make_session, providers_for
from graphresize.memory import PeakMemory
from graphresize.methods import registry
from graphresize.methods.base import Method, RewriteContext
from graphresize.methods.heads import (
    HeadsOutcome,
    check_head_options,
    head_stat_requests,
    heads_stage,
)
from graphresize.options import (
    ALLOCATIONS,
    ENGINES,
    TARGETS,
    UNMERGES,
    OptimizeOptions,
    unmerge_for,
)
from graphresize.passes import (
    DecomposeSkipLayerNormPass,
    FoldNormAffinePass,
    LayerNormToRMSNormPass,
    RewriteManager,
    cleanup_passes,
    prepare_passes,
)
from graphresize.plan.widths import ResizePlan, check_ratio, make_plan
from graphresize.solve import disp
from graphresize.solve.transforms import ChannelTransform
from graphresize.verify import estimate, gate
from graphresize.verify.compare import Verification, compare, reference_outputs
from graphresize.verify.evaluate import weight_flops_per_token

__all__ = ["OptimizeOptions", "OptimizeResult", "analyze", "load_prepared", "optimize", "parameter_count", "run_optimize"]


@dataclasses.dataclass(frozen=True, eq=False)
class OptimizeResult:
    input: Path
    output: Path
    options: OptimizeOptions
    groups: WidthGroups
    plan: ResizePlan
    transforms: dict[str, ChannelTransform]
    verification: Verification | None
    params_before: int
    params_after: int
    calib_tokens: int
    calib_source: str | None
    timings: dict[str, float]
    files: tuple[Path, ...]
    heads: HeadsOutcome | None = None
    peak_rss_mb: dict[str, float] = dataclasses.field(default_factory=dict)  # peak resident memory per stage
    disp: disp.DispSelection | None = None  # --method disp: the per-block subsets
    disp_plot: Path | None = None  # their width profile as a PNG (None: matplotlib missing)
    stats_cached: int = 0  # calibration statistics read from --stats-cache instead of computed
    flops_before: int = 0  # weight FLOPs per token (verify.evaluate.weight_flops_per_token)
    flops_after: int = 0
    ratio_hint: estimate.RatioHint | None = None  # hold-out top-1 below WARN_TOP1: a smaller --ratio, estimated
    stats_rejected: tuple[str, ...] = ()  # --stats-cache entries refused (corrupt, altered), recomputed
    fusion: FusionOutcome | None = None  # --fuse: ORT fused-op counts before/after, steps skipped
    allocation: object | None = None  # --allocation global: plan.allocation.Allocation
    allocation_plot: Path | None = None  # its width profile as a PNG (None: matplotlib missing)
    heal: object | None = None  # --heal-steps N > 0: the recover.distill.HealResult


class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self._memory = PeakMemory()
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(self.timings.get(stage, 0.0) + now - self._last, 3)
        self.peak_rss_mb[stage] = max(self.peak_rss_mb.get(stage, 0.0), self._memory.lap())
        self._last = now


def load_prepared(path: str | os.PathLike) -> ir.Model:
    """Load a model, refuse quantized graphs, and normalise it for analysis."""
    model = modelio.load_model(path)
    graphcheck.check_graph(model, path)
    modelio.check_not_quantized(model)
    try:
        prepare_passes()(model)
    except Exception as exc:
        raise UnsupportedModelError(f"{path}: cannot prepare the graph ({str(exc).splitlines()[0][:200]})") from None
    return model


def analyze(path: str | os.PathLike) -> WidthGroups:
    """Every width group of the model at ``path`` (reads only)."""
    return find_groups(load_prepared(path))


def parameter_count(model: ir.Model) -> int:
    """Elements of all floating-point initializers (weights; shape constants excluded)."""
    return sum(
        int(np.prod(v.const_value.shape))
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.dtype in FLOAT_TYPES
    )


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr)


@dataclasses.dataclass(frozen=True, eq=False)
class Analysis:
    """The analyze stage's findings, computed once and handed on: the width groups (after the
    residual groups were made routable), the plan, the routed residual groups and the layouts
    of the changed ones."""

    groups: WidthGroups
    plan: ResizePlan
    routed: tuple[WidthGroup, ...]
    layouts: dict[str, ResidualLayout]


@dataclasses.dataclass(frozen=True, eq=False)
class Calibrated:
    """The calibrate stage's output: hold-out reference outputs and the statistics."""

    reference: list | None
    stats: Statistics | None
    cached: int = 0
    rejected: tuple[str, ...] = ()  # --stats-cache entries refused (corrupt, altered) and recomputed


def optimize(
    input_path: str | os.PathLike, output_path: str | os.PathLike, ratio: float = 0.3, **options
) -> OptimizeResult:
    """Python entry point: ``optimize("m.onnx", "m.small.onnx", ratio=0.3, calib="text.txt")``;
    keyword options are the fields of ``OptimizeOptions``."""
    for key in ("calib", "tokenizer", "stats_cache"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    return run_optimize(input_path, output_path, OptimizeOptions(ratio=ratio, **options))


def run_optimize(input_path: str | os.PathLike, output_path: str | os.PathLike, options: OptimizeOptions) -> OptimizeResult:
    """Narrow the model at ``input_path`` and write it to ``output_path``; the input is never
    modified and the output appears whole or not at all."""
    input_path, output_path = Path(input_path), Path(output_path)
    method, kinds = check_options(input_path, output_path, options)
    clock = _Clock()
    workspace = spill.Workspace() if options.engine == "segment" else None
    try:
        return _run_optimize(input_path, output_path, options, method, kinds, clock, workspace)
    finally:
        if workspace is not None:
            workspace.close()


def _load_bounded(input_path: Path, workspace: spill.Workspace | None) -> tuple[ir.Model, bool]:
    """``load_prepared``; with a ``workspace`` (``--engine segment``), weights stay on disk:
    an input with weights inside its protobuf is first copied to external data there
    (``io/spill.py``), the model's read memory maps are closed, and the engine spills
    rewritten weights into the workspace. Also returns whether the input was copied (its
    weights were inline: the output is then written inline too, streamed)."""
    source = input_path
    if workspace is not None:
        try:
            if spill.has_embedded_weights(input_path):
                source = spill.externalize(input_path, workspace.folder)
        except Exception:  # not a readable protobuf: load_prepared names the problem
            source = input_path
    try:
        model = load_prepared(source)
    except (InputError, UnsupportedModelError) as exc:
        raise type(exc)(str(exc).replace(str(source), str(input_path))) from None
    if workspace is not None:
        spill.read_from_disk(model)
        model.meta[spill.META_KEY] = spill.WeightSpill(workspace.folder)
    return model, source != input_path


def _run_optimize(input_path: Path, output_path: Path, options: OptimizeOptions, method, kinds, clock: _Clock,
                  workspace: spill.Workspace | None) -> OptimizeResult:
    model, inline_input = _load_bounded(input_path, workspace)
    input_files = [input_path, *modelio.external_files(model)]
    # what the statistics depend on, read before folding replaces external tensors
    model_files = [input_path, *modelio.external_files(model)] if options.stats_cache is not None else []
    params_before, flops_before = parameter_count(model), weight_flops_per_token(model)
    clock.lap("load")
    found = analyze_stage(input_path, model, options, kinds)
    clock.lap("analyze")
    windows = tokenize_stage(input_path, model, found, options)
    clock.lap("tokenize")
    segmented = _segment_engine(model, found, windows, method, options)
    if segmented:  # calibrate ─► solve ─► rewrite per segment
        from graphresize.engine import stages as segment_stages
        from graphresize.engine.sequential import InputNotRunnable

        try:
            transforms, ctx, reference, found, allocation = segment_stages.calibrate_solve_rewrite(
                model, found, windows, method, options, clock.lap)
        except InputNotRunnable as exc:  # the input itself does not load: not the rewrite's fault
            raise _input_not_runnable(input_path, exc) from None
        calibrated, heads = Calibrated(reference, None), None
    else:
        calibrated = calibrate_stage(input_path, model, found, windows, method, options, model_files, clock)
        found, allocation, transforms = allocate_stage(model, found, calibrated, windows, method, options)
        if transforms is None:
            transforms = solve_stage(found, calibrated.stats, method, options)
        if calibrated.stats is not None:
            clock.lap("solve")
        heads = heads_stage(model, windows, options.head_ratio, method=options.head_method, refit=unmerge_for(options, "mlp") == "lsq",
                            batch_size=options.batch_size, progress=options.progress, stats=calibrated.stats)
        if heads is not None:
            _say(f"heads: {heads.note}", options.progress and heads.note is not None)
            clock.lap("heads")
        ctx = RewriteContext(model, found.groups, found.layouts, calibrated.stats, transforms, options)
        rewrite_stage(method, ctx)
    plan = method.final_plan(found.plan, ctx)
    clock.lap("rewrite")
    healed = heal_stage(input_path, model, windows, options, found.groups)
    if healed is not None:
        clock.lap("heal")
    params_after = parameter_count(model)  # the resized weights; fusion only re-expresses them
    fusion = None
    if options.fuse:
        model, fusion = fuse_for_ort(model, provider=options.provider, max_positions=max_positions_beside(input_path))
        clock.lap("fuse")
    if segmented and not options.fuse:  # a fused graph is no longer cut at its norms: verify it whole
        verification = segment_stages.verify(model, found.groups, windows, calibrated.reference, options)
    else:
        verification = verify_stage(model, found.groups, windows, calibrated.reference, options)
    hint = estimate.ratio_hint(verification, found.plan, calibrated.stats, options.ratio)
    clock.lap("verify")
    files = modelio.save_model_atomic(model, output_path, overwrite=options.overwrite, keep=input_files,
                                      inline=inline_input)
    plot = (disp.plot_profile(ctx.selection, output_path.with_name(output_path.stem + ".disp.png"))
            if ctx.selection and options.plots else None)
    alloc_plot = _plot_allocation(allocation, output_path) if options.plots else None
    clock.lap("save")
    return OptimizeResult(
        input=input_path,
        output=output_path,
        options=options,
        groups=found.groups,
        plan=plan,
        transforms=transforms,
        verification=verification,
        params_before=params_before,
        params_after=params_after,
        calib_tokens=windows.calib_tokens if windows is not None else 0,
        calib_source=windows.source if windows is not None else None,
        timings=clock.timings,
        files=tuple(files),
        heads=heads,
        peak_rss_mb=clock.peak_rss_mb,
        disp=ctx.selection,
        disp_plot=plot,
        stats_cached=calibrated.cached,
        flops_before=flops_before,
        flops_after=weight_flops_per_token(model),
        ratio_hint=hint,
        stats_rejected=calibrated.rejected,
        fusion=fusion,
        allocation=allocation,
        allocation_plot=alloc_plot,
        heal=healed,
    )


def _segment_engine(model: ir.Model, found: Analysis, windows, method: Method, options: OptimizeOptions) -> bool:
    """Whether this run takes the segment engine: ``--engine segment`` or a method whose
    statistics are sequential by definition (``slicegpt``), something to calibrate, and a run
    it supports (else a note, and the whole-model engine with dense statistics)."""
    if windows is None or (options.engine != "segment" and not getattr(method, "sequential", False)):
        return False  # a sequential method (slicegpt) takes this engine unless it cannot run
    from graphresize.engine import stages as segment_stages

    reason = segment_stages.unsupported(model, found, method, options)
    _say(f"--engine segment: {reason}; calibrating the whole model instead", reason is not None and options.progress)
    return reason is None


def check_options(input_path: Path, output_path: Path, options: OptimizeOptions) -> tuple[Method, frozenset[str]]:
    """Refuse bad options before any work (``UsageError``, exit 2); the method's strategy and
    the group kinds the run resizes."""
    check_ratio(options.ratio)
    if options.method not in registry.names() or options.unmerge not in UNMERGES:
        raise UsageError(f"unknown --method {options.method!r} or --unmerge {options.unmerge!r}")
    method = registry.get(options.method)
    kinds = _target_kinds(options)
    method.check(options, kinds)
    if options.tokens < 1 or options.seq_len < 1 or options.batch_size < 1:
        raise UsageError("--tokens, --seq-len and --batch-size must be positive")
    if not isinstance(options.holdout_windows, int) or options.holdout_windows < 1:
        raise UsageError(f"holdout_windows must be a positive number of windows, got {options.holdout_windows!r}")
    check_head_options(options.head_ratio, options.head_method)
    if options.engine not in ENGINES:
        raise UsageError(f"unknown --engine {options.engine!r}; choose one of {', '.join(ENGINES)}")
    _check_allocation(options, kinds)
    if options.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {options.workers}")
    if (options.workers or options.ray_address) and options.engine != "segment":
        raise UsageError("--workers/--ray-address shard the segment engine's calibration: add --engine segment")
    if options.workers or options.ray_address:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UsageError("--workers/--ray-address need Ray: pip install 'graphresize[ray]'")
    if options.allocation_stats not in ("dense", "sequential"):
        raise UsageError(f"allocation_stats must be dense or sequential, got {options.allocation_stats!r}")
    check_heal_options(options)
    modelio.check_output_path(input_path, output_path, overwrite=options.overwrite)
    gate.check_options(options)
    providers_for(options.provider)
    return method, kinds


def analyze_stage(input_path: Path, model: ir.Model, options: OptimizeOptions, kinds: frozenset[str]) -> Analysis:
    """Width groups, the plan; changed residual groups made routable (the model is re-analysed
    after), and their layouts."""
    groups = find_groups(model)
    gate.check_top1_applies(model, groups, options)
    if not options.head_ratio:
        _check_resizable(input_path, groups, kinds)
    plan = make_plan(groups, options.ratio, kinds=kinds, kind_ratios=options.kind_ratios, multiple_of=options.multiple_of)
    routed = [groups.by_id(e.group_id) for e in plan.changed() if e.kind == "residual"]
    if routed:
        groups = prepare_residual(model, routed)
        plan = make_plan(groups, options.ratio, kinds=kinds, kind_ratios=options.kind_ratios, multiple_of=options.multiple_of)
    layouts = residual_layouts(model, groups, [e.group_id for e in plan.changed() if e.kind == "residual"])
    return Analysis(groups, plan, tuple(routed), layouts)


def tokenize_stage(input_path: Path, model: ir.Model, found: Analysis, options: OptimizeOptions) -> tokens.TokenWindows | None:
    """Calibration and hold-out windows, when anything is resized or --calib is given."""
    if found.plan.changed() or options.calib is not None or options.head_ratio:
        if not [v for v in model.graph.inputs if not v.is_initializer()]:
            raise UnsupportedModelError(f"{input_path}: the graph has no inputs, so calibration cannot feed it tokens")
        return _calibration_windows(input_path, found.groups, options)
    return None


def calibrate_stage(
    input_path: Path, model: ir.Model, found: Analysis, windows, method: Method, options: OptimizeOptions,
    model_files: list[Path], clock: _Clock,
) -> Calibrated:
    """Hold-out reference outputs and the statistics every changed group's method asks for
    (plus the heads stage's), from ``--stats-cache`` where stored, else one ONNX Runtime pass."""
    if windows is None:
        return Calibrated(None, None)
    requests = [r for e in found.plan.changed() for r in method.stat_requests(found.groups.by_id(e.group_id), found.layouts)]
    requests += head_stat_requests(model, options.head_ratio, options.head_method)  # one calibration pass
    if options.allocation == "global":
        from graphresize.plan.allocation_inputs import mlp_groups, stream_requests

        requests += stream_requests(model, mlp_groups(found.groups, found.plan))
    cache = None
    if options.stats_cache is not None and requests:
        cache = stats_cache.open_cache(Path(options.stats_cache), model_files, [g.id for g in found.routed], windows.calib,
                                       provider=options.provider, batch_size=options.batch_size)
    read = cache.read(requests) if cache is not None else stats_cache.CacheRead({})
    cached = read.found
    missing = [r for r in requests if r.key not in cached]
    _say(f"calibration: {len(cached)} of {len(requests)} statistics from {options.stats_cache}", cache is not None and options.progress)
    try:
        session = make_session(model, list(dict.fromkeys(n for r in missing for n in r.names())), provider=options.provider)
    except VerificationError as exc:  # the input itself does not load: not the rewrite's fault
        raise _input_not_runnable(input_path, exc) from None
    clock.lap("session")
    reference = reference_outputs(session, windows.holdout)
    stats = Statistics(groups=dict(cached), tokens=windows.calib_tokens)
    if missing:
        fresh = calibrate(session, missing, windows.calib, batch_size=options.batch_size, progress=options.progress)
        stats.groups.update(fresh.groups)
        if cache is not None:
            cache.store(missing, fresh.groups)
    del session
    clock.lap("calibrate")
    return Calibrated(reference, stats, len(cached), read.rejected)


def solve_stage(found: Analysis, stats: Statistics | None, method: Method, options: OptimizeOptions,
                solve=None) -> dict[str, ChannelTransform]:
    """One channel transform per changed group, from the method (None: chosen at the rewrite);
    ``solve`` (a ``plan.solved.SolveCache``) answers in place of ``method.solve`` when given."""
    transforms: dict[str, ChannelTransform] = {}
    if stats is None:
        return transforms
    solve = solve or (lambda entry: method.solve(entry, stats, options))
    for entry in tqdm(found.plan.changed(), desc="solve", unit="group", disable=not options.progress, leave=False):
        transform = solve(entry)
        if transform is not None:
            transforms[entry.group_id] = transform
    return transforms


def allocate_stage(
    model: ir.Model, found: Analysis, calibrated: Calibrated, windows, method: Method, options: OptimizeOptions,
) -> tuple[Analysis, object | None, dict[str, ChannelTransform] | None]:
    """``--allocation global``: the MLP widths from one budget (``plan/allocation.py``), the
    floor factor chosen among ``options.allocation_floors`` (``allocation.choose_floor``) by
    the mean KL to the original on the hold-out windows, each candidate solved and rewritten
    on a copy of the model; every group solved once per width (``plan/solved.py``), so the
    chosen candidate's transforms are the ones it was scored with. The analysis with that
    plan, the allocation and its transforms (None: solve as usual). Uniform allocation, or
    nothing to resize: the analysis unchanged."""
    if options.allocation != "global" or calibrated.stats is None or not found.plan.changed():
        return found, None, None
    from graphresize.plan import allocation as alloc
    from graphresize.plan import allocation_inputs
    from graphresize.plan.solved import SolveCache
    from graphresize.verify.compare import mean_kl

    curves = allocation_inputs.curves(model, allocation_inputs.mlp_groups(found.groups, found.plan), calibrated.stats.groups)
    block = allocation_inputs.block_parameters(model, found.groups)
    solved = SolveCache(lambda entry: method.solve(entry, calibrated.stats, options))

    def holdout_kl(allocation: alloc.Allocation) -> float | None:
        if calibrated.reference is None:
            return None
        candidate = alloc.apply_to(found, allocation)
        transforms = solve_stage(candidate, calibrated.stats, method, options, solved)
        copy = model.clone()  # tensors shared (external data stays readable); the rewrite replaces, never mutates, them
        rewrite_stage(method, RewriteContext(copy, candidate.groups, candidate.layouts, calibrated.stats, transforms, options))
        session = make_session(copy, provider=options.provider)
        score = mean_kl(calibrated.reference, reference_outputs(session, windows.holdout))
        del session, copy
        _say(f"allocation: floor factor {allocation.floor_factor:g}: hold-out KL {score:.4f}", options.progress)
        return score

    choice = alloc.choose_floor(curves, options.ratio, block, options.allocation_floors, holdout_kl,
                                multiple_of=options.multiple_of)
    chosen = alloc.apply_to(found, choice.allocation)
    transforms = solve_stage(chosen, calibrated.stats, method, options, solved)
    _say(f"allocation: {solved.solves} solves, {solved.reuses} reused", options.progress)
    return chosen, choice.allocation, transforms


def _check_allocation(options: OptimizeOptions, kinds: frozenset[str]) -> None:
    if options.allocation not in ALLOCATIONS:
        raise UsageError(f"unknown --allocation {options.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if options.allocation == "global":
        if kinds != {"mlp"}:
            raise UsageError("--allocation global places MLP widths only in this version: use it with --target mlp")
        if not options.allocation_floors or not all(0.0 <= f <= 1.0 for f in options.allocation_floors):
            raise UsageError("allocation_floors must be a non-empty list of factors in [0, 1]")


def _plot_allocation(allocation, output_path: Path) -> Path | None:
    if allocation is None:
        return None
    from graphresize.plan.allocation import plot_profile

    return plot_profile(allocation, output_path.with_name(output_path.stem + ".alloc.png"))


def rewrite_stage(method: Method, ctx: RewriteContext) -> RewriteManager:
    """The method's rewrite passes, then the cleanup, as one pass manager run in list order."""
    manager = RewriteManager([*method.rewrite_passes(ctx), cleanup_passes()])
    manager(ctx.model)
    ctx.stats = None  # the Grams (O(width²) each) are not needed past here
    return manager


def check_heal_options(options: OptimizeOptions) -> None:
    """``--heal-steps``: a whole number of steps, positive rates, and torch installed (a
    one-line usage error before any work)."""
    if not isinstance(options.heal_steps, int) or options.heal_steps < 0:
        raise UsageError(f"--heal-steps must be a whole number of steps, 0 or more, got {options.heal_steps!r}")
    if options.heal_steps:
        if not options.heal_lr > 0 or not isinstance(options.heal_batch_size, int) or options.heal_batch_size < 1:
            raise UsageError("--heal-lr and --heal-batch-size must be positive")
        if not isinstance(options.heal_threads, int) or options.heal_threads < 0:
            raise UsageError(f"--heal-threads must be 0 (torch's default) or a positive whole number, got {options.heal_threads!r}")
        if not isinstance(options.heal_tokens, int) or options.heal_tokens < 0:
            raise UsageError(f"--heal-tokens must be 0 (the calibration windows) or a positive whole number, got {options.heal_tokens!r}")
        if options.heal_precision not in ("auto", "bf16", "fp32"):
            raise UsageError(f"--heal-precision must be auto, bf16 or fp32, got {options.heal_precision!r}")
        from graphresize.recover import require_torch

        require_torch()


def heal_stage(input_path: Path, model: ir.Model, windows, options: OptimizeOptions, groups: WidthGroups | None = None):
    """``--heal-steps N``: train the rewritten model's changed initializers toward the dense
    model's next-token distribution on the calibration windows (KL measured on the hold-out
    windows, never trained on), and write them back in place (``recover``). The dense model
    is read again from ``input_path`` and prepared as the resize saw it (the calibration
    session and statistics are gone by now); ``heal_model`` drops it once its targets are computed, before the training. ``N = 0``: nothing happens (``None``).
    ``--heal-tokens T`` above ``--tokens``: the training windows are drawn again with ``T``
    tokens from the same text and seed, a superset of the calibration windows; the hold-out
    windows are the same ones (``make_windows`` takes both from one seeded permutation)."""
    if not options.heal_steps or windows is None:
        return None
    if options.heal_tokens > options.tokens and groups is not None:
        more = _calibration_windows(input_path, groups, dataclasses.replace(options, tokens=options.heal_tokens))
        assert np.array_equal(more.holdout, windows.holdout)
        windows = more
    from graphresize.recover import apply_weights, heal_model

    result = heal_model(input_path, model, windows.calib, steps=options.heal_steps, lr=options.heal_lr,
                        batch_size=options.heal_batch_size, seed=options.seed, threads=options.heal_threads,
                        precision=options.heal_precision, check_windows=windows.holdout,
                        provider=options.provider, progress=options.progress)
    apply_weights(model, result)
    _say(f"heal: {result.steps} steps, hold-out KL {result.kl_before:.4f} -> {result.kl_after:.4f}", options.progress)
    return result


def verify_stage(model: ir.Model, groups: WidthGroups, windows, reference, options: OptimizeOptions) -> Verification | None:
    """Hold-out outputs of the rewritten model against the original's (or one run when
    nothing was calibrated), then the quality gates."""
    session = make_session(model, provider=options.provider)
    if reference is not None:
        vocab = groups.of_kind("vocab")  # top-1 agreement only for logits over a vocabulary
        verification = compare(session, windows.holdout, reference, vocab_size=max(g.width for g in vocab) if vocab else None)
    else:
        session.run(None, make_feeds(session, np.zeros((1, 8), dtype=np.int64)))
        verification = None
    del session
    gate.check(verification, options)
    return verification


def _target_kinds(options: OptimizeOptions) -> frozenset[str]:
    """The group kinds this run resizes: ``--target`` plus any kind given its own ratio."""
    if options.target not in TARGETS:
        raise UsageError(f"unknown --target {options.target!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[options.target] | {k for k, r in options.kind_ratios.items() if r}


def _check_resizable(path: Path, groups: WidthGroups, kinds: frozenset[str]) -> None:
    """At least one group of a targeted kind can be resized, or say why not."""
    targeted = [g for g in groups if g.kind in kinds]
    if not targeted:
        raise UnsupportedModelError(f"{path}: no {'/'.join(sorted(kinds))} width group found (see `graphresize analyze`)")
    if not any(g.resizable for g in targeted):
        reasons = "; ".join(sorted({g.frozen for g in targeted}))
        raise UnsupportedModelError(f"{path}: every {'/'.join(sorted(kinds))} group is frozen ({reasons[:300]})")


def prepare_residual(model: ir.Model, residual: list[WidthGroup]) -> WidthGroups:
    """Make the residual groups routable, exactly: norm gains and biases folded into their
    readers, LayerNorms (ORT's SkipLayerNormalization split into Add + LayerNormalization
    first) turned into RMS norms over a mean-centred stream; then analyse the
    model again (new nodes, untied weights)."""
    norms = find_norms(model.graph)
    routed = {name for g in residual for name in g.values}
    fused = [j.node for j in norms if j.form == "SkipLayerNormalization" and set(j.stream) & routed]
    if fused:  # split into Add + LayerNormalization, then find the (renamed) groups again
        DecomposeSkipLayerNormPass(fused)(model)
        prepare_passes()(model)
        ids = {g.id for g in residual}
        residual = [g for g in find_groups(model).of_kind("residual") if g.id in ids]
        norms = find_norms(model.graph)
    layouts = [residual_layout(model.graph, g, norms) for g in residual]
    FoldNormAffinePass(layouts)(model)
    layer = [(g, layout) for g, layout in zip(residual, layouts, strict=True) if layout.kind == "layer"]
    if layer:
        LayerNormToRMSNormPass(layer)(model)
    prepare_passes()(model)
    return find_groups(model)


def residual_layouts(model: ir.Model, groups: WidthGroups, group_ids: list[str]) -> dict[str, ResidualLayout]:
    """The residual layout of each of ``group_ids`` (norm junctions, readers)."""
    norms = find_norms(model.graph)
    return {gid: residual_layout(model.graph, groups.by_id(gid), norms) for gid in group_ids}


def _input_not_runnable(input_path: Path, exc: VerificationError) -> Exception:
    """ONNX Runtime refused the input model: corrupt (exit 1), or a kernel it lacks (exit 3;
    its CPU provider has no bfloat16 kernels for most ops)."""
    reason = str(exc).removeprefix("ONNX Runtime cannot load the graph: ")
    if "bfloat16" in reason:
        return UnsupportedModelError(
            f"{input_path}: ONNX Runtime's CPU provider cannot run this bfloat16 model, so it cannot be "
            f"calibrated; resize the fp32 or fp16 model and convert after ({reason})"
        )
    message = f"{input_path}: ONNX Runtime cannot load the input model ({reason})"
    return UnsupportedModelError(message) if "NOT_IMPLEMENTED" in reason else InputError(message)


def _calibration_windows(input_path: Path, groups: WidthGroups, options: OptimizeOptions) -> tokens.TokenWindows:
    shipped = options.calib is None  # the default text in the package
    calib = tokens.default_calibration() if shipped else Path(options.calib)
    if not calib.is_file():
        raise InputError(f"{calib}: calibration file not found")
    purpose = "the default calibration text (no --calib given)" if shipped else ""
    tokenizer = None if calib.suffix == ".npy" else tokens.find_tokenizer(input_path, options.tokenizer, purpose=purpose)
    stream = tokens.read_token_stream(calib, tokenizer)
    vocab = groups.of_kind("vocab")
    return tokens.make_windows(
        stream,
        seq_len=options.seq_len,
        tokens=options.tokens,
        holdout_windows=options.holdout_windows,
        seed=options.seed,
        source=tokens.DEFAULT_CALIB_SOURCE if shipped else str(calib),
        tokenizer=str(tokenizer) if tokenizer else None,
        vocab_size=max(g.width for g in vocab) if vocab else None,  # word table, not positions
    )
