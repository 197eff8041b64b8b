"""Verification: the rewritten graph runs in ONNX Runtime and stays close to the original."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort

from graphresize.io.ort_utils import make_feeds


@dataclasses.dataclass(frozen=True)
class Verification:
    """Agreement of the first output over the hold-out windows.

    ``relative_error`` = ‖y' − y‖ / ‖y‖; ``cosine_similarity``: mean over positions of the
    cosine between the old and new output vectors (for hidden states: encoders, embedding
    models). ``top1_agreement``: share of positions whose argmax over the last axis (the next
    token) is unchanged; only when the output is logits over the vocabulary (its last axis is
    the vocabulary's width), else None: the argmax of hidden features means nothing.
    """

    windows: int
    tokens: int
    max_abs_error: float
    relative_error: float
    top1_agreement: float | None
    cosine_similarity: float = 1.0
    output: str = "logits"  # "logits" (over the vocabulary) or "hidden" (any other output)
    perplexity_before: float | None = None  # of the original on the hold-out windows (logit outputs only)
    perplexity_after: float | None = None  # of the rewritten graph on the same windows

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def reference_outputs(session: ort.InferenceSession, windows: np.ndarray) -> list[np.ndarray]:
    """The first output of ``session`` for each hold-out window."""
    name = session.get_outputs()[0].name
    return [session.run([name], make_feeds(session, windows[i : i + 1]))[0] for i in range(len(windows))]


def compare(session: ort.InferenceSession, windows: np.ndarray, reference: list[np.ndarray], vocab_size: int | None = None) -> Verification:
    """Run the rewritten graph on the hold-out windows and compare with ``reference``; the
    output is logits when its last axis has ``vocab_size`` entries."""
    return compare_outputs(windows, reference, reference_outputs(session, windows), vocab_size)


def compare_outputs(
    windows: np.ndarray, reference: list[np.ndarray], candidate: list[np.ndarray], vocab_size: int | None = None
) -> Verification:
    """The agreement of ``candidate`` outputs (one per hold-out window) with ``reference``."""
    ref = np.concatenate([r.astype(np.float64).reshape(-1, r.shape[-1]) for r in reference])
    new = np.concatenate([c.astype(np.float64).reshape(-1, c.shape[-1]) for c in candidate])
    if ref.shape != new.shape:
        raise ValueError(f"output shape changed from {ref.shape} to {new.shape}")
    diff = new - ref
    logits = vocab_size is not None and ref.shape[-1] == vocab_size
    before, after = (holdout_perplexity(reference, windows), holdout_perplexity(candidate, windows)) if logits else (None, None)
    norms = np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(new, axis=-1), 1e-30)
    return Verification(
        windows=len(windows),
        tokens=int(windows.size),
        max_abs_error=float(np.abs(diff).max()),
        relative_error=float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
        top1_agreement=float((new.argmax(-1) == ref.argmax(-1)).mean()) if logits else None,
        cosine_similarity=float(np.mean(np.sum(ref * new, axis=-1) / norms)),
        output="logits" if logits else "hidden",
        perplexity_before=before,
        perplexity_after=after,
    )


def mean_kl(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Mean KL(reference ‖ candidate) in nats per position of the softmax over the last axis
    (logits), window by window."""
    total, count = 0.0, 0
    for ref, new in zip(reference, candidate, strict=True):
        p = _log_softmax(ref.astype(np.float64).reshape(-1, ref.shape[-1]))
        q = _log_softmax(new.astype(np.float64).reshape(-1, new.shape[-1]))
        total += float((np.exp(p) * (p - q)).sum())
        count += p.shape[0]
    return total / max(count, 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def holdout_perplexity(outputs: list[np.ndarray], windows: np.ndarray) -> float | None:
    """exp(mean next-token negative log-likelihood) of the logits ``outputs`` (one
    ``[1, T, V]`` array per window) on ``windows``: every position but the last predicts the
    next token. None when the first output is not next-token logits over the vocabulary."""
    nll, count = 0.0, 0
    for i, out in enumerate(outputs):
        ids = windows[i]
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] != ids.size or ids.size < 2 or int(ids.max()) >= out.shape[-1]:
            return None
        logits = out[0, :-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        nll += float((logz - logits[np.arange(ids.size - 1), ids[1:]]).sum())
        count += ids.size - 1
    return float(np.exp(nll / count)) if count else None
