"""ONNX Runtime's fused operators in a graph, and the check that a fused graph still computes
what the unfused one did."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

#: Operators that exist only as ORT fusions (``com.microsoft`` contrib ops, and
#: ``SimplifiedLayerNormalization`` which ORT registers in the default domain).
FUSED_OPS = frozenset({
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
    "RotaryEmbedding", "GroupQueryAttention", "MultiHeadAttention", "Attention", "FastGelu",
    "BiasGelu", "Gelu", "FusedMatMul", "BiasSoftmax", "GemmFastGelu", "PackedAttention",
})
#: Max |fused - unfused| allowed per output, relative to the output's largest magnitude (at least 1).
#: A correct fusion only reorders fp32 arithmetic, but a resized model can amplify that: the
#: default recipe at 0.3 on SmolLM2 (dynamo) drifts 1.2e-4 under the skip-norm fusion alone,
#: at one token of the left-padded probe row (4e-3 on logits of magnitude 34; the other tokens
#: 1e-6), where 1e-4 refused all 60 skip-norms. A mis-wired fusion differs by O(1) (onnxscript's
#: GQA on left padding: 0.9-1.5), so 1e-3 still refuses every wrong graph seen.
FUSE_TOLERANCE = 1e-3
#: Token ids of the probe batch the fused graph is compared on (batch × sequence).
PROBE_SHAPE = (2, 16)
#: Padding tokens on the left of the probe's second row in its padded run.
PROBE_PADDING = 3
#: New tokens of the probe's multi-token step on a cache (batch 1).
PROBE_STEP_TOKENS = 3


def fused_op_histogram(model: ir.Model) -> dict[str, int]:
    """How many nodes of each ORT-fused operator type the graph holds (subgraphs included),
    sorted by name; ``{}`` for a graph with none."""
    counts = Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type in FUSED_OPS)
    return dict(sorted(counts.items()))


@dataclasses.dataclass(frozen=True)
class FusionOutcome:
    """What ``--fuse`` did: fused-op counts before and after, sites rewritten per onnxscript
    step, steps left out (step -> why), and the probe's largest relative output difference."""

    before: Mapping[str, int]
    after: Mapping[str, int]
    steps: Mapping[str, int]
    skipped: Mapping[str, str]
    max_difference: float | None

    def as_dict(self) -> dict:
        return {"before": dict(self.before), "after": dict(self.after), "steps": dict(self.steps),
                "skipped": dict(self.skipped), "max_relative_difference": self.max_difference}

    def line(self) -> str:
        """``fused ops: SimplifiedLayerNormalization 0 -> 1, ...`` for the summary."""
        names = sorted(set(self.before) | set(self.after))
        text = ", ".join(f"{n} {self.before.get(n, 0)} -> {self.after.get(n, 0)}" for n in names) or "none fired"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return text


def relative_difference(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """max over outputs of ``max|a - b| / max(1, max|a|)`` (inf when shapes differ)."""
    worst = 0.0
    for a, b in zip(reference, outputs, strict=True):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            worst = max(worst, float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a))))))
    return worst


def _probe_vocab(model: ir.Model, default: int = 100) -> int:
    """Token ids of the probe stay below this: ``default``, or less when a ``Gather`` reads a
    smaller table with a graph input (the token embedding)."""
    inputs = set(model.graph.inputs)
    sizes = [
        int(node.inputs[0].shape[0])
        for node in model.graph
        if node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[1] in inputs
        and node.inputs[0] is not None and node.inputs[0].shape is not None and isinstance(node.inputs[0].shape[0], int)
    ]
    return max(1, min([default, *sizes]))


def max_positions_beside(model_path) -> int | None:
    """``max_position_embeddings`` from the ``config.json`` beside ``model_path`` (the positions
    the model was built for: the rows of the rotary caches), or None when there is none."""
    import json
    from pathlib import Path

    config = Path(model_path).with_name("config.json")
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def probe_outputs(session, ids: np.ndarray) -> list[np.ndarray]:
    """The outputs the fused graph must reproduce: ``session`` run on ``ids`` (batch × sequence)
    as ``make_feeds`` feeds them; then, for a graph with an ``attention_mask`` input, the same
    ids with the second row left-padded by ``PROBE_PADDING`` tokens (mask 0, position ids
    counting the real tokens only, as transformers' ``generate`` makes them); then, for a graph
    with past key/value inputs, one decode step after the padded prompt through the cache it
    returned, and ``PROBE_STEP_TOKENS`` new tokens at once on its first row's cache (batch 1).
    Outputs of all runs in order."""
    from graphresize.errors import UnsupportedModelError
    from graphresize.io.ort_utils import make_feeds
    from graphresize.verify.evaluate import cache_io

    names = [o.name for o in session.get_outputs()]
    feeds = make_feeds(session, ids)
    outputs = session.run(names, feeds)
    mask = next((k for k in feeds if "attention_mask" in k.lower()), None)
    if mask is None or ids.shape[0] < 2 or ids.shape[1] <= PROBE_PADDING:
        return outputs
    feeds[mask][1, :PROBE_PADDING] = 0
    positions = next((k for k in feeds if "position_ids" in k.lower()), None)
    if positions is not None:
        count = np.cumsum(feeds[mask], axis=1) - 1
        feeds[positions] = np.where(feeds[mask] > 0, count, 1)[:, -ids.shape[1]:].astype(feeds[positions].dtype)
    padded = session.run(names, feeds)
    outputs += padded
    try:
        cache = cache_io(session)
    except UnsupportedModelError:  # cache inputs that no output carries on: no decode step
        return outputs
    if not cache:
        return outputs
    padded_by_name = dict(zip(names, padded, strict=True))
    step = make_feeds(session, ids[:, -1:], past_len=feeds[mask].shape[1])
    step[mask] = np.concatenate([feeds[mask], np.ones_like(feeds[mask][:, :1])], axis=1)
    if positions is not None:
        step[positions] = (np.sum(feeds[mask], axis=1, keepdims=True)).astype(step[positions].dtype)
    step.update({past: padded_by_name[present] for past, present in cache.items()})
    outputs += session.run(names, step)
    if ids.shape[1] < PROBE_STEP_TOKENS:
        return outputs
    # several new tokens on the first row's cache (batch 1: what GroupQueryAttention takes on a past)
    tokens = PROBE_STEP_TOKENS
    several = make_feeds(session, ids[:1, -tokens:], past_len=feeds[mask].shape[1])
    several[mask] = np.concatenate([feeds[mask][:1], np.ones((1, tokens), dtype=feeds[mask].dtype)], axis=1)
    if positions is not None:
        start = int(np.sum(feeds[mask][0]))
        several[positions] = np.arange(start, start + tokens)[None].astype(several[positions].dtype)
    several.update({past: padded_by_name[present][:1] for past, present in cache.items()})
    return outputs + session.run(names, several)


def fuse_for_ort(model: ir.Model, *, provider: str = "cpu", tolerance: float = FUSE_TOLERANCE,
                 max_positions: int | None = None) -> tuple[ir.Model, FusionOutcome]:
    """Apply :class:`~graphresize.passes.fuse_for_ort.FuseForOrtPass` to ``model``, accepting
    a fused graph only if ONNX Runtime loads it and its outputs on the probe (``probe_outputs``: a
    batch, the batch left-padded, a decode step and a 3-token step through the KV cache) match the unfused
    graph's within ``tolerance``. ``max_positions``: rows of the rotary cos/sin caches (the
    model's ``max_position_embeddings``; None computes them in the graph). The parallel
    projections are packed into one MatMul for ``provider="cuda"`` only (``_steps``). Returns the
    (possibly new) model and the outcome."""
    from graphresize.errors import VerificationError
    from graphresize.io.ort_utils import make_session
    from graphresize.passes.fuse_for_ort import FuseForOrtPass

    ids = np.random.default_rng(0).integers(0, _probe_vocab(model), size=PROBE_SHAPE, dtype=np.int64)
    before = fused_op_histogram(model)
    try:
        reference = probe_outputs(make_session(model, provider=provider), ids)
    except Exception as exc:  # ORT's own error types: the unfused graph cannot take the probe
        why = f"the unfused graph does not run on the probe batch: {str(exc).splitlines()[0][:200]}"
        return model, FusionOutcome(before, before, {}, {"all steps": why}, None)
    seen: list[float] = []

    def accept(candidate: ir.Model) -> str | None:
        try:
            outputs = probe_outputs(make_session(candidate, provider=provider), ids)
        except VerificationError as exc:
            return str(exc)
        except Exception as exc:  # ORT's own pybind error types at run time
            return f"ONNX Runtime cannot run the fused graph: {str(exc).splitlines()[0][:200]}"
        difference = relative_difference(reference, outputs)
        if not difference <= tolerance:
            return f"outputs differ by {difference:.2e} (relative), above {tolerance:g}"
        seen.append(difference)
        return None

    fuse = FuseForOrtPass(accept, max_positions=max_positions, pack=provider == "cuda")
    model = fuse(model).model
    outcome = FusionOutcome(before, fused_op_histogram(model), fuse.counts, fuse.skipped, seen[-1] if seen else None)
    return model, outcome
