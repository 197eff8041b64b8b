"""The pipeline's hook for ``--engine segment``: which runs it takes, its calibrate ─► solve ─►
rewrite stages, and verification segment by segment.

Supported: methods whose rewrite is the default one transform per group (``dotresize``,
``prune``, ``pca``) and the per-junction methods that walk the junctions (``slicegpt``:
``sequential = True``, ``engine/junction_walk.py``), without ``--ratio-heads`` (the heads stage reads whole-model statistics)
and without ``--stats-cache`` (sequential statistics depend on the earlier solves), on graphs
that cut into segments (``engine/segments.py``). Anything else runs the whole-model engine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphresize.engine import sequential
from graphresize.engine.segments import SegmentError
from graphresize.methods.base import Method, RewriteContext
from graphresize.verify import gate
from graphresize.verify.compare import Verification, compare_outputs


def unsupported(model: ir.Model, found, method: Method, options) -> str | None:
    """Why the segment engine cannot run this optimize (None: it can)."""
    if type(method).rewrite_passes is not Method.rewrite_passes and not getattr(method, "sequential", False):
        return f"--method {options.method} chooses its widths at the rewrite"
    if options.head_ratio:
        return "--ratio-heads needs whole-model statistics"
    if options.stats_cache is not None:
        return "--stats-cache stores whole-model statistics"
    entries = list(found.plan.changed())
    requests = {e.group_id: method.stat_requests(found.groups.by_id(e.group_id), found.layouts) for e in entries}
    try:
        sequential.check(model, entries, found.groups, requests)
    except SegmentError as exc:
        return str(exc)
    return None


def calibrate_solve_rewrite(model: ir.Model, found, windows, method: Method, options,
                            lap: Callable[[str], None]) -> tuple[dict, RewriteContext, list[np.ndarray], object, object | None]:
    """Every changed group solved and rewritten segment by segment, then the cleanup; the
    transforms, the rewrite context (for ``final_plan``), the dense hold-out outputs, the
    analysis (its plan the allocation's under ``--allocation global``) and the allocation
    (None: uniform; ``engine/allocate.py``)."""
    from graphresize.passes import cleanup_passes

    allocation = None
    if options.allocation == "global" and any(e.kind == "mlp" for e in found.plan.changed()):
        from graphresize.engine import allocate

        chosen = allocate.run(model, found, windows, method, options, lap, stats=options.allocation_stats)
        found, allocation, transforms, reference = chosen.found, chosen.allocation, chosen.transforms, chosen.reference
    else:
        outcome = sequential.run(model, found, windows, method, options, lap)
        transforms, reference = outcome.transforms, outcome.reference
    cleanup_passes()(model)
    ctx = RewriteContext(model, found.groups, found.layouts, None, transforms, options)
    return transforms, ctx, reference, found, allocation


def verify(model: ir.Model, groups, windows, reference: list[np.ndarray], options) -> Verification:
    """The rewritten model's hold-out outputs, segment by segment, against ``reference``;
    then the quality gates."""
    candidate = sequential.forward(model, windows.holdout, provider=options.provider)
    vocab = groups.of_kind("vocab")  # top-1 agreement only for logits over a vocabulary
    verification = compare_outputs(windows.holdout, reference, candidate, max(g.width for g in vocab) if vocab else None)
    gate.check(verification, options)
    return verification
