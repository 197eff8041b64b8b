"""The heads stage of ``optimize``: find attention blocks, score heads on calibration windows,
choose the heads to keep and rewrite the graph (one call from the pipeline)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphresize.analysis.attention.find import find_attention
from graphresize.analysis.attention.heads import AttentionBlock
from graphresize.analysis.groups import WidthGroup
from graphresize.calibrate.statistics import Statistics, StatRequest, calibrate
from graphresize.errors import UsageError
from graphresize.io.ort_utils import make_session
from graphresize.passes import ResizeHeadsPass
from graphresize.plan.widths import check_ratio
from graphresize.solve.head_merge import ot_merge_heads
from graphresize.solve.heads import (
    METHODS,
    HeadSelection,
    global_removal,
    head_count,
    rounding_note,
    select_heads,
)


@dataclasses.dataclass(frozen=True, eq=False)
class HeadsOutcome:
    """What the heads stage found and did: every block (recognised or with its reason), the
    selection per changed layer, and a one-line note when the ratio was rounded."""

    ratio: float
    method: str
    blocks: tuple[AttentionBlock, ...]
    selections: dict[int, HeadSelection]
    note: str | None

    def layers(self) -> list[dict]:
        """Per layer: heads and KV heads before and after, and why a layer was left alone."""
        rows = []
        for b in self.blocks:
            sel = self.selections.get(b.layer)
            rows.append(
                {
                    "layer": b.layer,
                    "scope": b.scope,
                    "heads": b.num_heads,
                    "kv_heads": b.num_kv_heads,
                    "head_dim": b.head_dim,
                    "new_heads": len(sel.keep_q) if sel else b.num_heads,
                    "new_kv_heads": len(sel.keep_kv) if sel else b.num_kv_heads,
                    "kept": list(sel.keep_q) if sel else None,
                    "unchanged": b.reason,
                }
            )
        return rows

    def new_counts(self) -> tuple[int, int] | str | None:
        """The query and KV head counts every attention layer has now, or why they differ per
        layer (a sentence); None when no head was removed."""
        rows = self.layers()
        if all(r["new_heads"] == r["heads"] for r in rows):
            return None
        counts = {(r["new_heads"], r["new_kv_heads"]) for r in rows}
        if len(counts) == 1:
            return next(iter(counts))
        if any(r["unchanged"] for r in rows):
            return f"attention layers left unchanged ({', '.join(str(r['layer']) for r in rows if r['unchanged'])})"
        return "head counts differ per layer (" + ", ".join(f"{h}/{kv}" for h, kv in sorted(counts)) + ")"

    def as_dict(self) -> dict:
        return {"ratio": self.ratio, "method": self.method, "note": self.note, "layers": self.layers()}


def check_head_options(ratio: float, method: str) -> None:
    check_ratio(ratio, "--ratio-heads")
    if method not in METHODS:
        raise UsageError(f"unknown --head-method {method!r} (choose from {', '.join(METHODS)})")


def _blocks(model: ir.Model, method: str) -> tuple[AttentionBlock, ...]:
    blocks = find_attention(model)
    if method == "query":  # a layer whose repeat count is computed at run time is left alone
        blocks = tuple(
            dataclasses.replace(b, reason=f"query heads per KV head are fixed: {b.group_fixed}")
            if b.recognised and b.group_size > 1 and b.group_fixed else b
            for b in blocks
        )
    return blocks


def head_stat_requests(model: ir.Model, ratio: float, method: str = "refit") -> list[StatRequest]:
    """The statistics ``heads_stage`` needs (the output projection's input Gram of every
    recognised block), for the pipeline's one calibration pass; none when ``ratio`` is 0."""
    if ratio == 0.0:
        return []
    return [
        StatRequest.anchor(WidthGroup(id=f"attention.{b.layer}", kind="heads", layer=b.layer, width=b.num_heads * b.head_dim,
                                      params=(), values=(), anchor=b.anchor, reshapes=(), scope=b.scope))
        for b in _blocks(model, method) if b.recognised
    ]


def heads_stage(model: ir.Model, windows, ratio: float, *, method: str = "refit", refit: bool = True,
                batch_size: int = 4, progress: bool = False, stats: Statistics | None = None) -> HeadsOutcome | None:
    """Remove ``ratio`` of the heads of every recognised attention block of ``model`` (in
    place), scored on ``windows.calib`` (or on ``stats`` when they hold ``head_stat_requests``,
    gathered on this same graph): the same share in every layer (``prune``, ``refit``, ``ot``)
    or one budget over all layers (``global``). Returns None when ``ratio`` is 0."""
    check_head_options(ratio, method)
    if ratio == 0.0:
        return None
    blocks = _blocks(model, method)
    usable = tuple(b for b in blocks if b.recognised)
    note = rounding_note(usable, ratio, method)
    selections: dict[int, HeadSelection] = {}
    if usable and windows is not None:
        requests = head_stat_requests(model, ratio, method)
        if stats is None or any(r.key not in stats.groups for r in requests):
            session = make_session(model, [n for r in requests for n in r.names()])
            stats = calibrate(session, requests, windows.calib, batch_size=batch_size, progress=progress)
            del session
        items = [(b, stats.groups[f"attention.{b.layer}"].gram, _rows(model, b)) for b in usable]
        removed = global_removal(items, ratio) if method == "global" else {}
        for block, gram, rows in items:
            selections[block.layer] = ot_merge_heads(block, gram, rows, ratio) if method == "ot" else select_heads(
                block, gram, rows, ratio, method=method, refit=refit, removed=removed.get(block.layer)
            )
        if method == "global":
            note = _global_note(items, removed, ratio)
        ResizeHeadsPass(blocks, selections)(model)
    return HeadsOutcome(ratio=ratio, method=method, blocks=blocks, selections=selections, note=note)


def _rows(model: ir.Model, block: AttentionBlock) -> np.ndarray:
    """The output projection's weight as ``[H·hd, out]``."""
    array = model.graph.initializers[block.output_weight].const_value.numpy()
    return np.moveaxis(array.astype(np.float64), block.output_axis, 0)


def _global_note(items, removed: dict[int, list[int]], ratio: float) -> str:
    total = sum(head_count(b, 0.0).units for b, _, _ in items)
    done = sum(len(r) for r in removed.values())
    return f"--ratio-heads {ratio:g} over all layers: {done} of {total} units removed ({done / total:.3g}), per layer " + ",".join(
        str(len(removed[b.layer])) for b, _, _ in items
    )
