"""The ``optimize`` flags that make it a pipeline step, and the glue that applies them.

``--config FILE`` supplies any option (see :mod:`graphresize.cli.config`); the run writes
``OUT.report.json`` beside the output unless ``--report`` names another path or
``--no-report`` is given; the tokenizer and config files (and a rewritten
``genai_config.json``) and the width-profile plots follow the output unless ``--no-sidecars``; ``--verify-tolerance`` and ``--min-top1`` are the quality gates of
:mod:`graphresize.verify.gate`; ``--provider`` picks the ONNX Runtime execution provider of the
calibration and verification sessions.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from graphresize.cli import config
from graphresize.errors import InputError, UsageError
from graphresize.methods.defaults import DEFAULT_RECIPE, MLP_ONLY_SETTINGS, Recipe


def add_optimize_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline step")
    group.add_argument("--config", type=Path, metavar="FILE", help="TOML, JSON or YAML file of optimize options (keys: flag names such as seq_len, or OptimizeOptions fields); flags on the command line win")
    group.add_argument("--verify-tolerance", type=float, default=None, metavar="X", help="fail (exit 4, nothing written) when the hold-out relative output error exceeds X")
    group.add_argument("--min-top1", type=float, default=None, metavar="A", help="fail (exit 4, nothing written) when the hold-out top-1 agreement is below A, in [0, 1]; logits only (an encoder's hidden states: --min-cosine)")
    group.add_argument("--min-cosine", type=float, default=None, metavar="C", help="fail (exit 4, nothing written) when the hold-out mean cosine similarity of the output vectors is below C")
    group.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider for calibration and verification (default cpu)")
    group.add_argument("--no-report", action="store_true", help="do not write the JSON report (default: OUT.report.json beside the output)")
    group.add_argument("--no-sidecars", action="store_true", help="do not write files beside the output other than the report: no tokenizer/config files, genai_config.json, or width-profile plots (OUT.alloc.png, OUT.disp.png)")


def add_heal_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recovery (healing; needs torch: pip install 'graphresize[heal]')")
    group.add_argument("--heal", action="store_true", help="heal with the measured recipe (graphresize/recover/recipe.py: --heal-steps 256 --heal-tokens 262144 --heal-lr 0.0003 --heal-batch-size 4); any --heal-* flag given wins over the recipe's value. On SmolLM2-135M: 256 steps plus the dense targets of 1024 windows, ~40 min on 2 idle CPU cores, ~1.5-2 h on 2 loaded ones; peak RSS ~4 GB (benchmarks/heal.md, \"Heal memory\")")
    group.add_argument("--heal-steps", type=int, default=0, metavar="N", help="after the rewrite, train the narrowed weights for N steps toward the input model's next-token distribution on the calibration windows (KL distillation; default 0: no healing). Costs minutes per step on a 135M model on CPU")
    group.add_argument("--heal-lr", type=float, default=3e-4, metavar="LR", help="peak AdamW learning rate of the healing (linear warm-up, cosine to 0; default 3e-4)")
    group.add_argument("--heal-batch-size", type=int, default=4, metavar="B", help="calibration windows per healing step (default 4)")
    group.add_argument("--heal-tokens", type=int, default=0, metavar="T", help="train on T tokens of windows from the calibration text (default 0: the --tokens calibration windows); more windows, same hold-out windows")
    group.add_argument("--heal-threads", type=int, default=1, metavar="THREADS", help="torch/ONNX Runtime threads of the healing (default 1: on 2 shared cores 3x faster per step than 2; 0: torch's default)")
    group.add_argument("--heal-precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto (default): matrix products in bf16 (torch.autocast) where the CPU has native bf16 (AVX512-BF16/AMX), else fp32; weights, optimizer and the written model stay fp32")


def apply_heal_recipe(args: argparse.Namespace, merge: config.Merge) -> None:
    """``--heal`` (or ``heal = true`` in ``--config``): fill each ``--heal-*`` setting of the
    healing recipe that the command line and the config file left unset (source ``recipe``).
    ``--heal`` with ``--heal-steps 0`` contradicts itself: a usage error."""
    if not getattr(args, "heal", False):
        return
    from graphresize.recover.recipe import HEAL_RECIPE

    given = _given(merge)
    if "heal_steps" in given and not args.heal_steps:
        raise UsageError("--heal asks for healing but --heal-steps is 0: drop one of them")
    _fill_unset(args, merge, HEAL_RECIPE.settings, given)


def default_report_path(output: Path) -> Path:
    """``small.onnx`` -> ``small.report.json``."""
    return output.with_name(output.stem + ".report.json") if output.suffix == ".onnx" else output.with_name(output.name + ".report.json")


def default_output_path(model: Path, ratio: float) -> Path:
    """No ``-o``: ``model.onnx`` at ``--ratio 0.3`` -> ``model.r30.onnx`` beside the input (the
    number is the ratio in percent: ``r12.5`` for 0.125)."""
    stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{stem}.r{round(100 * ratio, 4):g}.onnx")


def apply_recipe(args: argparse.Namespace, merge: config.Merge, recipe: Recipe) -> None:
    """Fill each setting of ``recipe`` that neither the command line nor the config file set
    (source ``recipe`` in the report); see :mod:`graphresize.methods.defaults` for the rule."""
    given = _given(merge)
    settings = dict(recipe.settings)
    if "method" in given and "target" not in given and not _accepts_target(args, settings.get("target")):
        settings.pop("target", None)
    target = args.target if "target" in given else settings.get("target", args.target)
    per_kind = getattr(args, "ratio_mlp", None) is not None or getattr(args, "ratio_residual", None) is not None
    if target != "mlp" or per_kind:
        # the recipe's global allocation places MLP widths only, with --ratio as its one budget:
        # a per-kind width ratio (--ratio-mlp/--ratio-residual) asks for the uniform rule
        for dest in MLP_ONLY_SETTINGS:
            settings.pop(dest, None)
    if {"ratio_heads", "stats_cache"} & given and (getattr(args, "ratio_heads", 0) or getattr(args, "stats_cache", None)):
        settings.pop("engine", None)  # whole-model statistics (heads, a statistics cache): the whole engine
    filled = _fill_unset(args, merge, settings, given)
    # what the recipe decided beyond the flag defaults (the summary names it)
    applied = {dest: value for dest, value in filled.items() if value != merge.flags[dest].default}
    args.recipe = dataclasses.replace(recipe, settings=applied) if applied else None


def _given(merge: config.Merge) -> set[str]:
    """The settings the command line or the config file set (a recipe never overrides them)."""
    return {k for k, v in merge.sources.items() if v in ("cli", "config")}


def _fill_unset(args: argparse.Namespace, merge: config.Merge, settings: dict, given: set[str]) -> dict:
    """Set each of ``settings`` that is an optimize flag and not in ``given`` on ``args`` and
    in ``merge`` (source ``recipe``); returns the settings filled."""
    filled = {dest: value for dest, value in settings.items() if dest not in given and dest in merge.flags}
    for dest, value in filled.items():
        setattr(args, dest, value)
        merge.values[dest] = value
        merge.sources[dest] = "recipe"
    return filled


def _accepts_target(args: argparse.Namespace, target: str | None) -> bool:
    """Whether ``--method`` (given) runs on ``target``: its strategy's own check decides."""
    if target is None:
        return True
    from graphresize.methods import registry
    from graphresize.options import TARGETS, OptimizeOptions

    probe = OptimizeOptions(ratio=args.ratio if args.ratio else 0.3, target=target, method=args.method)
    try:
        registry.get(args.method).check(probe, TARGETS[target])
    except (UsageError, KeyError):
        return False
    return True


def prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> config.Merge:
    """Merge ``--config`` into ``args`` (command line first; ``parser`` tells which flags were
    given), check that the required options are set, and choose the report path."""
    merge = config.merge_optimize_args(args, parser, getattr(args, "argv", None))
    for dest, flag in (("model", "MODEL"), ("ratio", "--ratio")):
        if getattr(args, dest, None) is None:
            raise UsageError(f"{flag} is required (on the command line or as {dest!r} in --config)")
    for dest, flag in (("output", "-o/--output"), ("report", "--report")):
        if getattr(args, dest, None) is not None and getattr(args, dest).name in ("", ".", ".."):
            raise UsageError(f"{flag} must name a file, got {str(getattr(args, dest))!r}")
    apply_recipe(args, merge, DEFAULT_RECIPE)
    apply_heal_recipe(args, merge)
    if args.output is None:
        args.output = default_output_path(args.model, args.ratio)
        merge.values["output"] = args.output
        merge.sources["output"] = "default"
        if args.output.exists() and not args.overwrite:
            raise InputError(f"{args.output}: already exists (name another file with -o/--output, or pass --overwrite to replace it)")
        if not args.quiet:
            print(f"output: {args.output} (no -o given)", file=sys.stderr)
    if args.report is None and not args.no_report:
        args.report = default_report_path(args.output)
    merge.values["report"] = args.report
    return merge


def add_sidecars(args: argparse.Namespace, result, data: dict) -> None:
    """Copy the serving files beside the output (see :mod:`graphresize.io.sidecars`) and record
    them in the report ``data``."""
    from graphresize.io.sidecars import copy_sidecars

    if args.no_sidecars:
        return
    changed = {e.kind for e in result.plan.changed()}
    heads = result.heads.new_counts() if result.heads is not None else None
    widths: dict[str, list[tuple[int, int]]] = {}
    for entry in result.plan.changed():
        widths.setdefault(entry.kind, []).append((entry.width, entry.new_width))
    data["output"]["sidecars"] = copy_sidecars(result.input, result.output, changed, heads=heads, widths=widths)
    for skipped in data["output"]["sidecars"]["skipped"]:
        if skipped.startswith("genai_config.json (attention") and not args.quiet:
            print(f"warning: {skipped.replace(' (', ' not written: ', 1)[:-1]}", file=sys.stderr)
