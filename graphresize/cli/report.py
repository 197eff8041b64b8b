"""Reports: the JSON record of a run and the human tables printed by the CLI."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
from pathlib import Path

from graphresize.analysis.groups import WidthGroups
from graphresize.io import publish
from graphresize.io.modelio import file_sha256
from graphresize.pipeline import OptimizeResult

_DEPENDENCIES = (
    "graphresize", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy", "pot",
    "networkx", "tokenizers", "torch", "transformers",
)
#: Version of the report layout; bumped when a key changes meaning or goes away.
REPORT_SCHEMA = 2


def versions() -> dict[str, str]:
    """Python, the platform and each dependency's installed version (``None``: not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _DEPENDENCIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def groups_table(groups: WidthGroups) -> str:
    """One line per group: id, kind, layer, width, scope, weights, and why a group is frozen."""
    lines = [f"{'group':<12} {'kind':<9} {'layer':>5} {'width':>6}  {'scope / weights'}"]
    for g in groups:
        layer = "" if g.layer is None else str(g.layer)
        weights = ", ".join(f"{p.name}[{p.axis}]:{p.role}" for p in g.params[:6])
        more = f" (+{len(g.params) - 6} more)" if len(g.params) > 6 else ""
        lines.append(f"{g.id:<12} {g.kind:<9} {layer:>5} {g.width:>6}  {g.scope}")
        lines.append(f"{'':<36}weights: {weights}{more}")
        if g.frozen:
            lines.append(f"{'':<36}frozen: {g.frozen}")
    counts = ", ".join(f"{n} {k}" for k, n in groups.counts().items())
    lines.append(f"{len(groups)} groups ({counts}); {len(groups.resizable())} resizable")
    return "\n".join(lines)


def groups_json(groups: WidthGroups) -> list[dict]:
    return [
        {
            "id": g.id,
            "kind": g.kind,
            "layer": g.layer,
            "width": g.width,
            "scope": g.scope,
            "anchor": g.anchor,
            "frozen": g.frozen,
            "params": [dataclasses.asdict(p) for p in g.params],
        }
        for g in groups
    ]


def layer_profile(result: OptimizeResult) -> list[dict]:
    """Per layer: each group kind's width before and after (the width profile of the run)."""
    new_widths = {e.group_id: e.new_width for e in result.plan.entries}
    layers: dict[int, dict] = {}
    for g in result.groups:
        if g.layer is None:
            continue
        row = layers.setdefault(g.layer, {"layer": g.layer, "widths": {}})
        row["widths"].setdefault(g.kind, []).append({"group": g.id, "before": g.width, "after": new_widths.get(g.id, g.width)})
    return [layers[k] for k in sorted(layers)]


def optimize_report(result: OptimizeResult, config: dict | None = None) -> dict:
    """Everything needed to reproduce and audit a run; ``config`` is the effective
    configuration (:meth:`graphresize.cli.config.Merge.effective`)."""
    options = {
        k: (str(v) if isinstance(v, Path) else dict(v) if k == "kind_ratios" else v)
        for k, v in dataclasses.asdict(result.options).items()
    }
    new_widths = {e.group_id: e.new_width for e in result.plan.entries}
    groups = groups_json(result.groups)
    for item in groups:
        item["new_width"] = new_widths.get(item["id"], item["width"])
        transform = result.transforms.get(item["id"])
        if transform is not None:
            item["solve"] = {k: v for k, v in transform.info.items() if k != "support"}
    before, after = result.params_before, result.params_after
    verification = result.verification.as_dict() if result.verification else None
    if verification is not None:
        verification["verify_tolerance"] = getattr(result.options, "verify_tolerance", None)
        verification["min_top1"] = getattr(result.options, "min_top1", None)
        verification["min_cosine"] = result.options.min_cosine
    return {
        "tool": "graphresize",
        "schema": REPORT_SCHEMA,
        "status": "ok",
        "versions": versions(),
        "config": config,
        "input": {"path": str(result.input), "sha256": file_sha256(result.input), "bytes": result.input.stat().st_size},
        "output": {
            "path": str(result.output),
            "sha256": file_sha256(result.output),
            "bytes": sum(Path(f).stat().st_size for f in result.files),
            "files": [{"path": str(f), "sha256": file_sha256(f)} for f in result.files],
        },
        "options": options,
        "parameters": {"before": before, "after": after, "removed": 1.0 - after / before if before else 0.0},
        "flops_per_token": _flops(result),
        "quality": quality(result),
        "calibration": {"tokens": result.calib_tokens, "source": result.calib_source, "stats_cached": result.stats_cached,
                        "stats_rejected": list(result.stats_rejected)},
        "verification": verification,
        "timings_s": {**result.timings, "total": round(sum(result.timings.values()), 3)},
        "summary": kind_summary(result),
        "profile": layer_profile(result),
        "peak_rss_mb": result.peak_rss_mb,
        "disp": _disp_report(result),
        "allocation": _allocation_report(result),
        "groups": groups,
        "heads": result.heads.as_dict() if result.heads is not None else None,
        "fusion": result.fusion.as_dict() if getattr(result, "fusion", None) is not None else None,
        "heal": heal_json(getattr(result, "heal", None)),
    }


def heal_json(heal) -> dict | None:
    """``--heal-steps``: the settings, the hold-out KL before and after, and the cost."""
    if heal is None:
        return None
    return {
        "steps": heal.steps,
        "lr": heal.settings.lr,
        "batch_size": heal.settings.batch_size,
        "seed": heal.settings.seed,
        "temperature": heal.settings.temperature,
        "top_k": heal.settings.top_k,
        "threads": heal.settings.threads,
        "precision": "bf16" if heal.settings.bf16 else "fp32",
        "kl_before": heal.kl_before,
        "kl_after": heal.kl_after,
        "kl_windows": heal.kl_windows,
        "loss_first": heal.loss_first,
        "loss_last": heal.loss_last,
        "tokens_seen": heal.tokens_seen,
        "params_trained": heal.params_trained,
        "tensors_trained": len(heal.weights),
        "seconds": round(heal.seconds, 3),
        "seconds_per_step": round(heal.seconds_per_step, 3),
        "teacher_seconds": round(heal.teacher_seconds, 3),
        "peak_rss_mb": round(heal.peak_rss_mb, 1),
    }


def heal_line(heal) -> str:
    """``heal: 24 steps, 55.6M parameters trained, hold-out KL 0.524 -> 0.478 nats/token, 2010 s``."""
    return (f"{'heal:':<13}{heal.steps} steps (lr {heal.settings.lr:g}), {heal.params_trained:,} parameters trained, "
            f"hold-out KL {heal.kl_before:.4f} -> {heal.kl_after:.4f} nats/token, {heal.seconds:.1f}s "
            f"({heal.seconds_per_step:.2f}s/step)")


def _allocation_report(result: OptimizeResult) -> dict | None:
    """``--allocation global``: the budget, the floor factor and its hold-out scores, every
    layer's width, weight and relative error, and the PNG."""
    allocation = getattr(result, "allocation", None)
    if allocation is None:
        return None
    plot = getattr(result, "allocation_plot", None)
    return {**allocation.as_dict(), "plot": str(plot) if plot else None,
            "plot_note": None if plot else "matplotlib not installed (extra [bench]): no PNG drawn"}


def _flops(result: OptimizeResult) -> dict | None:
    before, after = getattr(result, "flops_before", 0), getattr(result, "flops_after", 0)
    if not before:
        return None
    return {"before": before, "after": after, "removed": 1.0 - after / before,
            "counted": "2*K*N per MatMul/Gemm with a constant KxN weight (attention score products not counted)"}


def quality(result: OptimizeResult) -> dict | None:
    """The hold-out quality in plain terms, the warning threshold and, below it, the
    estimated smaller ratio (:mod:`graphresize.verify.estimate`)."""
    from graphresize.verify.estimate import WARN_TOP1

    v = result.verification
    if v is None or v.top1_agreement is None:  # hidden-state outputs: no next-token quality
        return None
    hint = getattr(result, "ratio_hint", None)
    change = None
    if v.perplexity_before and v.perplexity_after:
        change = v.perplexity_after / v.perplexity_before - 1.0
    return {
        "holdout_tokens": v.tokens,
        "top1_agreement": v.top1_agreement,
        "perplexity_before": v.perplexity_before,
        "perplexity_after": v.perplexity_after,
        "perplexity_change": change,
        "warn_below_top1": WARN_TOP1,
        "warning": v.top1_agreement < WARN_TOP1,
        "suggested_ratio": hint.as_dict() if hint is not None else None,
    }


def quality_lines(result: OptimizeResult) -> list[str]:
    """What a user reads: hold-out agreement and perplexity change, and the warning."""
    v = result.verification
    if v is None or v.top1_agreement is None:
        return []
    text = (f"{'quality:':<13}on {v.tokens:,} held-out calibration tokens the new model picks the original's next "
            f"token at {100 * v.top1_agreement:.1f}% of positions")
    if v.perplexity_before and v.perplexity_after:
        change = 100 * (v.perplexity_after / v.perplexity_before - 1)
        text += f"; perplexity {v.perplexity_before:.2f} -> {v.perplexity_after:.2f} ({change:+.0f}%)"
    lines = [text]
    q = quality(result)
    if q and q["warning"]:
        hint = getattr(result, "ratio_hint", None)
        warn = f"warning: top-1 agreement {100 * v.top1_agreement:.1f}% is below {100 * q['warn_below_top1']:.0f}%: the model may not be worth serving"
        if hint is not None and hint.ratio is not None:
            warn += (f"; --ratio {hint.ratio:g} is estimated to reach {100 * hint.estimated_top1:.0f}% (an estimate from the "
                     f"calibration statistics, not measured: {'lost activation energy' if hint.basis == 'lost-energy' else 'linear in the ratio'})")
        elif hint is not None:
            warn += f"; even --ratio {min(0.05, result.options.ratio / 2):g} is estimated below it (an estimate, not measured)"
        lines.append(warn)
    return lines


def _disp_report(result: OptimizeResult) -> dict | None:
    """``--method disp``: per-layer attention/MLP input and output widths, and the PNG."""
    selection = getattr(result, "disp", None)
    if selection is None:
        return None
    plot = getattr(result, "disp_plot", None)
    return {**selection.as_dict(), "plot": str(plot) if plot else None,
            "plot_note": None if plot else "matplotlib not installed (extra [bench]): no PNG drawn"}


def kind_summary(result: OptimizeResult) -> list[dict]:
    """One row per group kind: how many groups, how many were resized, widths before and after."""
    new_widths = {e.group_id: e.new_width for e in result.plan.entries}
    rows: dict[str, dict] = {}
    for g in result.groups:
        row = rows.setdefault(g.kind, {"kind": g.kind, "groups": 0, "resized": 0, "frozen": 0, "before": [], "after": []})
        after = new_widths.get(g.id, g.width)
        row["groups"] += 1
        row["resized"] += after != g.width
        row["frozen"] += g.frozen is not None
        row["before"].append(g.width)
        row["after"].append(after)
    for row in rows.values():
        row["before"], row["after"] = _span(row["before"]), _span(row["after"])
    return list(rows.values())


def _span(widths: list[int]) -> str:
    low, high = min(widths), max(widths)
    return str(low) if low == high else f"{low}-{high}"


def summary_table(result: OptimizeResult, report_path: str | os.PathLike | None = None, recipe=None) -> str:
    """The human summary printed on stderr: widths by kind, then parameters, hold-out
    agreement, timings and the files written."""
    lines = [f"{'kind':<10} {'groups':>6} {'resized':>7} {'frozen':>6}  {'width':>11} -> {'new width'}"]
    for row in kind_summary(result):
        lines.append(
            f"{row['kind']:<10} {row['groups']:>6} {row['resized']:>7} {row['frozen']:>6}  {row['before']:>11} -> {row['after']}"
        )
    before, after = result.params_before, result.params_after
    share = 100.0 * (1 - after / before) if before else 0.0
    if recipe is not None:
        lines.append(f"{'recipe:':<13}{recipe.describe()}: the default recipe, as no flag set these ({recipe.evidence})")
    lines.append(f"{'parameters:':<13}{_count(before)} -> {_count(after)} ({_count(before - after)} removed, {share:.1f}%)")
    fb, fa = getattr(result, "flops_before", 0), getattr(result, "flops_after", 0)
    if fb:
        lines.append(f"{'FLOPs/token:':<13}{_count(fb)} -> {_count(fa)} weight FLOPs per token ({100 * (1 - fa / fb):.1f}% fewer)")
    if result.heads is not None:
        lines.append(_heads_line(result.heads))
    v = result.verification
    if v is not None:
        gates = [
            f"tolerance {t:g}" for t in [getattr(result.options, "verify_tolerance", None)] if t is not None
        ] + [f"min top-1 {t:g}" for t in [getattr(result.options, "min_top1", None)] if t is not None] + [
            f"min cosine {t:g}" for t in [result.options.min_cosine] if t is not None]
        lines.append(
            f"{'hold-out:':<13}{v.tokens} tokens, relative output error {v.relative_error:.4f}, "
            + (f"top-1 agreement {100 * v.top1_agreement:.1f}%" if v.top1_agreement is not None
               else f"cosine similarity {v.cosine_similarity:.4f} (hidden states)")
            + (f" (passed {', '.join(gates)})" if gates else "")
        )
    if getattr(result, "fusion", None) is not None:
        lines.append(f"{'fused ops:':<13}{result.fusion.line()}")
    lines.extend(quality_lines(result))
    if getattr(result, "heal", None) is not None:
        lines.append(heal_line(result.heal))
    lines.append(f"{'calibration:':<13}{result.calib_tokens} tokens" + (f" from {result.calib_source}" if result.calib_source else ""))
    if result.stats_rejected:
        lines.append(f"{'stats cache:':<13}{len(result.stats_rejected)} damaged entries recomputed and replaced ({'; '.join(result.stats_rejected[:3])})")
    total = sum(result.timings.values())
    lines.append(f"{'time:':<13}" + ", ".join(f"{k} {t:.1f}s" for k, t in result.timings.items()) + f"; total {total:.1f}s")
    if result.peak_rss_mb:
        lines.append(f"{'peak memory:':<13}" + ", ".join(f"{k} {m:.0f} MiB" for k, m in result.peak_rss_mb.items()))
    lines.append(f"{'wrote:':<13}{result.output}" + (f", report {report_path}" if report_path else ""))
    return "\n".join(lines)


def _count(n: int) -> str:
    """``134.5M`` from a million up, else the number with separators."""
    return f"{n / 1e6:.1f}M" if abs(n) >= 1e6 else f"{n:,}"


def _heads_line(heads) -> str:
    """``heads: 9/3 -> 6/2 in 30 of 30 layers`` (query/KV heads), and layers left unchanged."""
    rows = heads.layers()
    changed = [r for r in rows if r["new_heads"] != r["heads"]]
    counts = sorted({f"{r['heads']}/{r['kv_heads']} -> {r['new_heads']}/{r['new_kv_heads']}" for r in changed})
    text = f"heads (query/KV): {', '.join(counts) or 'unchanged'} in {len(changed)} of {len(rows)} attention layers"
    skipped = [r for r in rows if r["unchanged"]]
    if skipped:
        text += f"; {len(skipped)} not recognised (e.g. layer {skipped[0]['layer']}: {skipped[0]['unchanged']})"
    return text


def write_json(data: dict, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Write ``data`` as JSON under :mod:`graphresize.io.publish`'s rules: whole or not at all,
    never onto a non-regular file, and only onto an existing one when ``overwrite``."""
    text = json.dumps(data, indent=2) + "\n"
    publish.write_bytes(text.encode(), Path(path), overwrite=overwrite)
