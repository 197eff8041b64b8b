"""The optimize pipeline: load ─► analyze ─► calibrate ─► plan ─► solve ─► rewrite ─► verify ─► save."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphresize import disp, gate, modelio, residual_solve, solve, stats_cache, tokens
from graphresize.calibration import Statistics, StatRequest, calibrate
from graphresize.channels import FLOAT_TYPES
from graphresize.errors import InputError, UnsupportedModelError, UsageError, VerificationError
from graphresize.fusion import FusionOutcome, fuse_for_ort
from graphresize.groups import WidthGroup, WidthGroups, find_groups
from graphresize.head_stage import HeadsOutcome, check_head_options, head_stat_requests, heads_stage
from graphresize.memory import PeakMemory
from graphresize.norms import find_norms
from graphresize.ort_utils import make_feeds, make_session, providers_for
from graphresize.passes import (
    DispPass,
    FoldNormAffinePass,
    LayerNormToRMSNormPass,
    RescaleNormsPass,
    ResizeGroupsPass,
    RetieWeightsPass,
    cleanup_passes,
    prepare_passes,
)
from graphresize.plan import ResizePlan, check_ratio, make_plan
from graphresize.residual import ResidualLayout, residual_layout
from graphresize.transforms import ChannelTransform
from graphresize.verify import Verification, compare, reference_outputs


@dataclasses.dataclass(frozen=True)
class OptimizeOptions:
    """Every knob of ``optimize`` (the CLI flags map one to one)."""

    ratio: float
    target: str = "all"
    method: str = "dotresize"
    unmerge: str = "auto"  # auto: lsq on MLP widths, pinv on the residual stream (see _unmerge)
    calib: Path | None = None
    tokenizer: Path | None = None
    tokens: int = 16384
    seq_len: int = 256
    batch_size: int = 4
    holdout_windows: int = 4
    seed: int = 0
    reg: float = solve.DEFAULT_REG
    metric: str = "euclidean"
    target_mass: str = "cluster"
    multiple_of: int = 8
    kind_ratios: Mapping[str, float] = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True
    provider: str = "cpu"
    verify_tolerance: float | None = None
    min_top1: float | None = None
    head_ratio: float = 0.0
    head_method: str = "refit"
    stats_cache: Path | None = None  # folder of calibration statistics reused across runs
    fuse: bool = True  # emit ORT's fused ops (graphresize/fusion.py), checked against the unfused graph


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
    fusion: FusionOutcome | None = None  # --fuse: ORT fused-op counts before/after, steps skipped


# --target: the kinds of width group a run resizes.
TARGETS = {"mlp": frozenset({"mlp"}), "residual": frozenset({"residual"}), "all": frozenset({"mlp", "residual"})}
METHODS = ("dotresize", "prune", "pca", "disp", "dotresize+disp")
# Methods that give the blocks their own subsets of a full-width stream (graphresize/disp.py).
DISP_METHODS = ("disp", "dotresize+disp")
UNMERGES = ("auto", "lsq", "ot", "pinv")
#: ``--unmerge auto``: the reader map that measured best per kind on SmolLM2. MLP: lsq
#: (PTB 178 against 194 for ot at 0.3); residual: pinv, the orthogonal projection (0.2: 259
#: against 292 for lsq), which also keeps the LM head's fit to the embedding within the re-tie
#: tolerance.
AUTO_UNMERGE = {"mlp": "lsq", "residual": "pinv"}


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
    check_ratio(options.ratio)
    if options.method not in METHODS or options.unmerge not in UNMERGES:
        raise UsageError(f"unknown --method {options.method!r} or --unmerge {options.unmerge!r}")
    kinds = _target_kinds(options)
    if options.tokens < 1 or options.seq_len < 1 or options.batch_size < 1:
        raise UsageError("--tokens, --seq-len and --batch-size must be positive")
    check_head_options(options.head_ratio, options.head_method)
    modelio.check_output_path(input_path, output_path, overwrite=options.overwrite)
    gate.check_options(options)
    providers_for(options.provider)
    clock = _Clock()

    model = load_prepared(input_path)
    # what the statistics depend on, read before folding replaces external tensors
    model_files = [input_path, *modelio.external_files(model)] if options.stats_cache is not None else []
    params_before = parameter_count(model)
    clock.lap("load")
    groups = find_groups(model)
    if not options.head_ratio:
        _check_resizable(input_path, groups, kinds)
    plan = make_plan(groups, options.ratio, kinds=kinds, kind_ratios=options.kind_ratios, multiple_of=options.multiple_of)
    routed = [groups.by_id(e.group_id) for e in plan.changed() if e.kind == "residual"]
    if routed:
        groups = prepare_residual(model, routed)
        plan = make_plan(groups, options.ratio, kinds=kinds, kind_ratios=options.kind_ratios, multiple_of=options.multiple_of)
    changed = plan.changed()
    layouts = _layouts(model, groups, [e.group_id for e in changed if e.kind == "residual"])
    clock.lap("analyze")

    windows = None
    if changed or options.calib is not None or options.head_ratio:
        windows = _calibration_windows(input_path, groups, options)
    clock.lap("tokenize")

    transforms: dict[str, ChannelTransform] = {}
    reference = stats = None
    stats_cached = 0
    if windows is not None:
        requests = [r for e in changed for r in _stat_requests(groups.by_id(e.group_id), layouts, options.method)]
        requests += head_stat_requests(model, options.head_ratio, options.head_method)  # one calibration pass
        cache = None
        if options.stats_cache is not None and requests:
            cache = stats_cache.open_cache(Path(options.stats_cache), model_files, [g.id for g in routed], windows.calib,
                                           provider=options.provider, batch_size=options.batch_size)
        cached = cache.load(requests) if cache is not None else {}
        missing = [r for r in requests if r.key not in cached]
        stats_cached = len(cached)
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
        for entry in tqdm(changed, desc="solve", unit="group", disable=not options.progress, leave=False):
            if entry.kind == "residual" and options.method in DISP_METHODS:
                continue  # subsets are chosen at the rewrite, from the weights left by the MLP solve
            group_stats = stats.groups[entry.group_id]
            if entry.kind == "residual":
                transforms[entry.group_id] = residual_solve.residual_transform(
                    entry.group_id, group_stats, entry.new_width, method=options.method, unmerge=_unmerge(options, "residual"),
                    reg=options.reg, metric=options.metric, target_mass=options.target_mass,
                )
            elif options.method == "prune":
                transforms[entry.group_id] = solve.prune(entry.group_id, group_stats, entry.new_width, unmerge=_unmerge(options, "mlp"))
            else:
                transforms[entry.group_id] = solve.ot_merge(
                    entry.group_id, group_stats, entry.new_width, reg=options.reg, metric=options.metric,
                    target_mass=options.target_mass, unmerge=_unmerge(options, "mlp"),
                )
        clock.lap("solve")

    heads = heads_stage(model, windows, options.head_ratio, method=options.head_method, refit=_unmerge(options, "mlp") == "lsq",
                        batch_size=options.batch_size, progress=options.progress, stats=stats)
    if heads is not None:
        _say(f"heads: {heads.note}", options.progress and heads.note is not None)
        clock.lap("heads")

    ResizeGroupsPass(groups, transforms)(model)
    selection = None
    if options.method in DISP_METHODS and layouts:
        selection = _apply_disp(model, groups, layouts, stats, options)
        # the stream keeps its width; the per-block widths are in ``selection``
        plan = dataclasses.replace(plan, entries=tuple(
            dataclasses.replace(e, new_width=e.width) if e.group_id in layouts else e for e in plan.entries))
    stats = cached = None  # the Grams (O(width²) each, in both) are not needed past here
    if layouts:
        widths = {gid: (t.width, t.new_width) for gid, t in transforms.items() if gid in layouts}
        RescaleNormsPass([layouts[gid] for gid in widths], widths)(model)
        RetieWeightsPass()(model)
    cleanup_passes()(model)
    clock.lap("rewrite")
    fusion = None
    if options.fuse:
        model, fusion = fuse_for_ort(model, provider=options.provider)
        clock.lap("fuse")

    session = make_session(model, provider=options.provider)
    if reference is not None:
        verification = compare(session, windows.holdout, reference)
    else:
        session.run(None, make_feeds(session, np.zeros((1, 8), dtype=np.int64)))
        verification = None
    del session
    gate.check(verification, options)
    clock.lap("verify")

    files = modelio.save_model_atomic(model, output_path)
    plot = disp.plot_profile(selection, output_path.with_name(output_path.stem + ".disp.png")) if selection else None
    clock.lap("save")
    return OptimizeResult(
        input=input_path,
        output=output_path,
        options=options,
        groups=groups,
        plan=plan,
        transforms=transforms,
        verification=verification,
        params_before=params_before,
        params_after=parameter_count(model),
        calib_tokens=windows.calib_tokens if windows is not None else 0,
        calib_source=windows.source if windows is not None else None,
        timings=clock.timings,
        files=tuple(files),
        heads=heads,
        peak_rss_mb=clock.peak_rss_mb,
        disp=selection,
        disp_plot=plot,
        stats_cached=stats_cached,
        fusion=fusion,
    )


def _unmerge(options: OptimizeOptions, kind: str) -> str:
    """The reader map for groups of ``kind``: ``--unmerge``, or the kind's best under ``auto``."""
    return AUTO_UNMERGE[kind] if options.unmerge == "auto" else options.unmerge


def _target_kinds(options: OptimizeOptions) -> frozenset[str]:
    """The group kinds this run resizes: ``--target`` plus any kind given its own ratio."""
    if options.target not in TARGETS:
        raise UsageError(f"unknown --target {options.target!r}; choose one of {', '.join(TARGETS)}")
    kinds = TARGETS[options.target] | {k for k, r in options.kind_ratios.items() if r}
    if options.method in DISP_METHODS and "residual" not in kinds:
        raise UsageError(f"--method {options.method} selects subsets of the residual stream: use --target residual or all")
    if options.method in DISP_METHODS and options.kind_ratios.get("residual", options.ratio) <= 0:
        raise UsageError(f"--method {options.method} needs a positive residual ratio")
    if options.method == "pca" and "mlp" in kinds and options.kind_ratios.get("mlp", options.ratio) > 0:
        raise UsageError("--method pca rotates the residual stream only: use --target residual (or --ratio-mlp 0)")
    return kinds


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
    readers, LayerNorms turned into RMS norms over a mean-centred stream; then analyse the
    model again (new nodes, untied weights)."""
    norms = find_norms(model.graph)
    layouts = [residual_layout(model.graph, g, norms) for g in residual]
    FoldNormAffinePass(layouts)(model)
    layer = [(g, layout) for g, layout in zip(residual, layouts, strict=True) if layout.kind == "layer"]
    if layer:
        LayerNormToRMSNormPass(layer)(model)
    prepare_passes()(model)
    return find_groups(model)


def _layouts(model: ir.Model, groups: WidthGroups, group_ids: list[str]) -> dict[str, ResidualLayout]:
    norms = find_norms(model.graph)
    return {gid: residual_layout(model.graph, groups.by_id(gid), norms) for gid in group_ids}


def _stat_request(group: WidthGroup, layouts: Mapping[str, ResidualLayout]) -> StatRequest:
    """MLP groups: the anchor's rows. Residual groups: the unit-RMS stream at every junction."""
    if group.id in layouts:
        streams = tuple(j.stream for j in layouts[group.id].junctions)
        return StatRequest(group.id, group.width, streams, unit_rms=True)
    return StatRequest.anchor(group)


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


def _stat_requests(group: WidthGroup, layouts: Mapping[str, ResidualLayout], method: str) -> list[StatRequest]:
    """DISP methods: one unit-RMS request per block junction (keys ``GROUP#jN``)."""
    if method not in DISP_METHODS or group.id not in layouts:
        return [_stat_request(group, layouts)]
    layout = layouts[group.id]
    return [
        StatRequest(f"{group.id}#j{i}", group.width, (j.stream,), unit_rms=True)
        for i, j in enumerate(layout.junctions[: disp.block_junctions(layout)])
    ]


def _apply_disp(
    model: ir.Model, groups: WidthGroups, layouts: Mapping[str, ResidualLayout], stats, options,
    *, basis: str | None = None, nested: bool | None = None, refit: bool = False, **allocation,
) -> disp.DispSelection:
    """Choose the DISP subsets of the (single) residual group and rewrite the graph.

    ``--method disp``: subsets of the stream's own features under one global budget.
    ``dotresize+disp``: the stream is first rotated (exactly) into the principal basis of its
    calibration Gram, and every block keeps a prefix of it (nested subsets: ``Slice`` and
    ``Pad`` only), all of the same width ``(1 - ratio)·D``. Writers are scored by
    their calibrated outputs when ``stats`` hold them (``GROUP#wN``, requested by measurement
    scripts), else by weight norms; ``refit``: readers refit by least squares
    (``disp.lsq_readout``). ``basis``/``nested``/``allocation`` override the method's choices
    (measurements in the README: the defaults are the best found).
    """
    if len(layouts) != 1:
        raise UnsupportedModelError(f"--method {options.method} handles one residual stream, found {len(layouts)}")
    ((gid, layout),) = layouts.items()
    group = groups.by_id(gid)
    writers = disp.find_writers(model.graph, group)
    n = disp.block_junctions(layout)
    if isinstance(writers, str) or len(writers) != n:
        why = writers if isinstance(writers, str) else f"{len(writers)} writers for {n} block inputs"
        raise UnsupportedModelError(f"--method {options.method}: residual stream not recognised ({why})")
    composed = options.method == "dotresize+disp"
    basis = basis or ("pca" if composed else "identity")
    nested = composed if nested is None else nested
    if composed:  # measured on SmolLM2: in the principal basis one width for all blocks beats the global budget
        allocation.setdefault("uniform", True)
    grams = [stats.groups[f"{gid}#j{i}"].gram for i in range(n)]
    outs = [stats.groups[f"{gid}#w{i}"].gram for i in range(n)] if f"{gid}#w0" in stats.groups else None
    rotation = residual_solve.principal_basis(sum(grams), group.width) if basis == "pca" else np.eye(group.width)
    grams = disp.rotate(grams, rotation)
    outs = disp.rotate(outs, rotation) if outs is not None else None
    ratio = options.kind_ratios.get("residual", options.ratio)
    in_scores = disp.input_scores(model.graph, layout, grams) if basis == "identity" else _rotated_input_scores(model, layout, grams, rotation)
    out_scores = disp.output_scores(model.graph, writers, outs) if outs is not None else _rotated_output_scores(model, writers, rotation)
    selection = disp.select(
        gid, group.width, in_scores, out_scores,
        [j.output for j in layout.junctions[:n]], [w.node for w in writers], ratio, options.multiple_of, nested, **allocation,
    )
    if nested:  # permute the stream into the shared order: every subset becomes a prefix
        order = disp.global_order(list(in_scores) + list(out_scores))
        rotation = rotation[:, order]
        grams = [g[np.ix_(order, order)] for g in grams]
        selection = selection.reindexed(order)
    if not np.array_equal(rotation, np.eye(group.width)):
        ResizeGroupsPass(groups, {gid: ChannelTransform(gid, rotation, rotation.T, method="rotation")})(model)
    readouts = {}
    if refit:
        readouts = {s.site: disp.lsq_readout(g, s.keep) for s, g in zip(selection.inputs, grams, strict=True) if s.width < group.width}
    DispPass(layout, writers, selection, readouts)(model)
    return dataclasses.replace(selection, basis="principal" if basis == "pca" else "stream", readers="lsq" if readouts else "select")


def _rotated_input_scores(model: ir.Model, layout: ResidualLayout, grams, rotation: np.ndarray) -> list[np.ndarray]:
    """Wanda input scores in the rotated basis: reader rows ``BᵀW``."""
    scores = []
    for readers, gram in zip(layout.readers, grams, strict=False):
        weight = np.zeros(rotation.shape[1])
        for reader in readers:
            w = np.moveaxis(np.asarray(model.graph.initializers[reader.weight].const_value.numpy(), dtype=np.float64), reader.axis, 0)
            weight += np.square(rotation.T @ w.reshape(w.shape[0], -1)).sum(axis=1)
        scores.append(np.sqrt(np.maximum(np.diag(gram), 0.0)) * np.sqrt(weight))
    return scores


def _rotated_output_scores(model: ir.Model, writers, rotation: np.ndarray) -> list[np.ndarray]:
    """Writer column norms in the rotated basis: ``W·B``."""
    scores = []
    for w in writers:
        array = np.moveaxis(np.asarray(model.graph.initializers[w.weight].const_value.numpy(), dtype=np.float64), w.axis, -1)
        scores.append(np.sqrt(np.square(array.reshape(-1, array.shape[-1]) @ rotation).sum(axis=0)))
    return scores


def _calibration_windows(input_path: Path, groups: WidthGroups, options: OptimizeOptions) -> tokens.TokenWindows:
    if options.calib is None:
        raise UsageError("calibration data is required to resize: pass --calib FILE (.txt with a tokenizer, or .npy token ids)")
    calib = Path(options.calib)
    if not calib.is_file():
        raise InputError(f"{calib}: calibration file not found")
    tokenizer = None if calib.suffix == ".npy" else tokens.find_tokenizer(input_path, options.tokenizer)
    stream = tokens.read_token_stream(calib, tokenizer)
    vocab = groups.of_kind("vocab")
    return tokens.make_windows(
        stream,
        seq_len=options.seq_len,
        tokens=options.tokens,
        holdout_windows=options.holdout_windows,
        seed=options.seed,
        source=str(calib),
        tokenizer=str(tokenizer) if tokenizer else None,
        vocab_size=max(g.width for g in vocab) if vocab else None,  # word table, not positions
    )
