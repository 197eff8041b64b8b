"""Verification: the rewritten graph runs in ONNX Runtime and stays close to the original."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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
    windows: np.ndarray, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], vocab_size: int | None = None
) -> Verification:
    """The agreement of ``candidate`` outputs (one per hold-out window) with ``reference``.

    Streamed: one window at a time (``reference`` may be a list read from disk), in blocks of
    ``_ROWS`` positions converted to float64, so the memory is one window's outputs, not all
    of them in float64 (sums of squares and counts are accumulated; the results equal the
    all-at-once formulas to float64 rounding)."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} outputs for {len(reference)} reference windows")
    max_abs, diff_sq, ref_sq, cos_sum, agree, rows, width = 0.0, 0.0, 0.0, 0.0, 0, 0, None
    for i in range(len(reference)):
        r_all, c_all = np.asarray(reference[i]), np.asarray(candidate[i])
        r2, c2 = r_all.reshape(-1, r_all.shape[-1]), c_all.reshape(-1, c_all.shape[-1])
        width = width or r2.shape[-1]
        if r2.shape != c2.shape or r2.shape[-1] != width:
            raise ValueError(f"output shape changed from {r_all.shape} to {c_all.shape}")
        for start in range(0, r2.shape[0], _ROWS):
            ref = r2[start : start + _ROWS].astype(np.float64)
            new = c2[start : start + _ROWS].astype(np.float64)
            diff = new - ref
            max_abs = max(max_abs, float(np.abs(diff).max(initial=0.0)))
            diff_sq += float(np.einsum("ij,ij->", diff, diff))
            ref_sq += float(np.einsum("ij,ij->", ref, ref))
            norms = np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(new, axis=-1), 1e-30)
            cos_sum += float(np.sum(np.einsum("ij,ij->i", ref, new) / norms))
            agree += int((new.argmax(-1) == ref.argmax(-1)).sum())
            rows += ref.shape[0]
            del ref, new, diff
    logits = vocab_size is not None and width == vocab_size
    before, after = (holdout_perplexity(reference, windows), holdout_perplexity(candidate, windows)) if logits else (None, None)
    return Verification(
        windows=len(windows),
        tokens=int(windows.size),
        max_abs_error=max_abs,
        relative_error=float(np.sqrt(diff_sq) / max(np.sqrt(ref_sq), 1e-30)),
        top1_agreement=float(agree / rows) if logits else None,
        cosine_similarity=float(cos_sum / rows),
        output="logits" if logits else "hidden",
        perplexity_before=before,
        perplexity_after=after,
    )


#: Positions per float64 block in ``compare_outputs``.
_ROWS = 64


def mean_kl(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Mean KL(reference ‖ candidate) in nats per position of the softmax over the last axis
    (logits), window by window, in blocks of ``_ROWS`` positions converted to float64 (the
    float64 temporaries are one block's, not one window's)."""
    total, count = 0.0, 0
    for ref_all, new_all in zip(reference, candidate, strict=True):
        r2 = np.asarray(ref_all).reshape(-1, ref_all.shape[-1])
        c2 = np.asarray(new_all).reshape(-1, new_all.shape[-1])
        for start in range(0, r2.shape[0], _ROWS):
            p = _log_softmax(r2[start : start + _ROWS].astype(np.float64))
            q = _log_softmax(c2[start : start + _ROWS].astype(np.float64))
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
    for i in range(len(outputs)):
        out, ids = np.asarray(outputs[i]), windows[i]
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] != ids.size or ids.size < 2 or int(ids.max()) >= out.shape[-1]:
            return None
        for start in range(0, ids.size - 1, _ROWS):  # blocks of positions, as compare_outputs
            stop = min(start + _ROWS, ids.size - 1)
            logits = out[0, start:stop].astype(np.float64)
            top = logits.max(-1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
            nll += float((logz - logits[np.arange(stop - start), ids[start + 1 : stop + 1]]).sum())
        count += ids.size - 1
    return float(np.exp(nll / count)) if count else None
