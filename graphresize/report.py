"""Reports: the JSON record of a run and the human tables printed by the CLI."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path

from graphresize.groups import WidthGroups
from graphresize.modelio import file_sha256
from graphresize.pipeline import OptimizeResult

_DEPENDENCIES = ("graphresize", "onnx", "onnx-ir", "onnxruntime", "numpy", "pot", "networkx")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _DEPENDENCIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
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


def optimize_report(result: OptimizeResult) -> dict:
    """Everything needed to reproduce and audit a run."""
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
    return {
        "tool": "graphresize",
        "versions": versions(),
        "input": {"path": str(result.input), "sha256": file_sha256(result.input)},
        "output": {"path": str(result.output), "sha256": file_sha256(result.output), "files": [str(f) for f in result.files]},
        "options": options,
        "parameters": {"before": result.params_before, "after": result.params_after},
        "calibration": {"tokens": result.calib_tokens, "source": result.calib_source},
        "verification": result.verification.as_dict() if result.verification else None,
        "timings_s": result.timings,
        "peak_rss_mb": result.peak_rss_mb,
        "groups": groups,
    }


def summary_table(result: OptimizeResult) -> str:
    before, after = result.params_before, result.params_after
    changed = result.plan.changed()
    lines = [
        f"groups resized: {len(changed)} of {len(result.groups)}"
        + (f" (e.g. {changed[0].group_id}: {changed[0].width} -> {changed[0].new_width})" if changed else ""),
        f"parameters: {before:,} -> {after:,} ({100.0 * (1 - after / before):.1f}% fewer)",
    ]
    v = result.verification
    if v is not None:
        lines.append(
            f"hold-out ({v.tokens} tokens): relative output error {v.relative_error:.4f}, "
            f"top-1 agreement {100 * v.top1_agreement:.1f}%"
        )
    lines.append("time: " + ", ".join(f"{k} {s:.1f}s" for k, s in result.timings.items()))
    if result.peak_rss_mb:
        lines.append("peak memory: " + ", ".join(f"{k} {m:.0f} MiB" for k, m in result.peak_rss_mb.items()))
    lines.append(f"wrote {result.output}")
    return "\n".join(lines)


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as JSON atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
