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

from graphresize import modelio, solve, tokens
from graphresize.calibration import calibrate
from graphresize.channels import FLOAT_TYPES
from graphresize.errors import InputError, UnsupportedModelError, UsageError
from graphresize.groups import WidthGroups, find_groups
from graphresize.memory import PeakMemory
from graphresize.ort_utils import make_feeds, make_session
from graphresize.passes import ResizeGroupsPass, cleanup_passes, prepare_passes
from graphresize.plan import ResizePlan, check_ratio, make_plan
from graphresize.transforms import ChannelTransform
from graphresize.verify import Verification, compare, reference_outputs


@dataclasses.dataclass(frozen=True)
class OptimizeOptions:
    """Every knob of ``optimize`` (the CLI flags map one to one)."""

    ratio: float
    method: str = "dotresize"
    unmerge: str = "lsq"
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
    peak_rss_mb: dict[str, float] = dataclasses.field(default_factory=dict)  # peak resident memory per stage


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
    for key in ("calib", "tokenizer"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    return run_optimize(input_path, output_path, OptimizeOptions(ratio=ratio, **options))


def run_optimize(input_path: str | os.PathLike, output_path: str | os.PathLike, options: OptimizeOptions) -> OptimizeResult:
    """Narrow the model at ``input_path`` and write it to ``output_path``; the input is never
    modified and the output appears whole or not at all."""
    input_path, output_path = Path(input_path), Path(output_path)
    check_ratio(options.ratio)
    if options.method not in ("dotresize", "prune") or options.unmerge not in ("lsq", "ot"):
        raise UsageError(f"unknown --method {options.method!r} or --unmerge {options.unmerge!r}")
    if options.tokens < 1 or options.seq_len < 1 or options.batch_size < 1:
        raise UsageError("--tokens, --seq-len and --batch-size must be positive")
    modelio.check_output_path(input_path, output_path, overwrite=options.overwrite)
    clock = _Clock()

    model = load_prepared(input_path)
    params_before = parameter_count(model)
    clock.lap("load")
    groups = find_groups(model)
    mlps = groups.of_kind("mlp")
    if not mlps:
        raise UnsupportedModelError(f"{input_path}: no MLP width group found (see `graphresize analyze`)")
    if not any(g.resizable for g in mlps):
        reasons = "; ".join(sorted({g.frozen for g in mlps}))
        raise UnsupportedModelError(f"{input_path}: every MLP group is frozen ({reasons[:300]})")
    plan = make_plan(groups, options.ratio, kind_ratios=options.kind_ratios, multiple_of=options.multiple_of)
    changed = plan.changed()
    clock.lap("analyze")

    windows = None
    if changed or options.calib is not None:
        windows = _calibration_windows(input_path, groups, options)
    clock.lap("tokenize")

    transforms: dict[str, ChannelTransform] = {}
    reference = None
    if windows is not None:
        changed_groups = [groups.by_id(e.group_id) for e in changed]
        session = make_session(model, [g.anchor for g in changed_groups])
        clock.lap("session")
        reference = reference_outputs(session, windows.holdout)
        if changed_groups:
            stats = calibrate(session, changed_groups, windows.calib, batch_size=options.batch_size, progress=options.progress)
        del session
        clock.lap("calibrate")
        for entry in tqdm(changed, desc="solve", unit="group", disable=not options.progress, leave=False):
            group_stats = stats.groups[entry.group_id]
            if options.method == "prune":
                transforms[entry.group_id] = solve.prune(entry.group_id, group_stats, entry.new_width, unmerge=options.unmerge)
            else:
                transforms[entry.group_id] = solve.ot_merge(
                    entry.group_id, group_stats, entry.new_width, reg=options.reg, metric=options.metric,
                    target_mass=options.target_mass, unmerge=options.unmerge,
                )
        clock.lap("solve")

    ResizeGroupsPass(groups, transforms)(model)
    cleanup_passes()(model)
    clock.lap("rewrite")

    session = make_session(model)
    if reference is not None:
        verification = compare(session, windows.holdout, reference)
    else:
        session.run(None, make_feeds(session, np.zeros((1, 8), dtype=np.int64)))
        verification = None
    del session
    clock.lap("verify")

    files = modelio.save_model_atomic(model, output_path)
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
        peak_rss_mb=clock.peak_rss_mb,
    )


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
        vocab_size=vocab[0].width if vocab else None,
    )
