"""Verification: the rewritten graph runs in ONNX Runtime and stays close to the original."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort

from graphresize.io.ort_utils import make_feeds


@dataclasses.dataclass(frozen=True)
class Verification:
    """Agreement of the first output over the hold-out windows.

    ``relative_error`` = ‖y' − y‖ / ‖y‖; ``top1_agreement``: share of positions whose argmax
    over the last axis (the next token, for logits) is unchanged.
    """

    windows: int
    tokens: int
    max_abs_error: float
    relative_error: float
    top1_agreement: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def reference_outputs(session: ort.InferenceSession, windows: np.ndarray) -> list[np.ndarray]:
    """The first output of ``session`` for each hold-out window."""
    name = session.get_outputs()[0].name
    return [session.run([name], make_feeds(session, windows[i : i + 1]))[0] for i in range(len(windows))]


def compare(session: ort.InferenceSession, windows: np.ndarray, reference: list[np.ndarray]) -> Verification:
    """Run the rewritten graph on the hold-out windows and compare with ``reference``."""
    candidate = reference_outputs(session, windows)
    ref = np.concatenate([r.astype(np.float64).reshape(-1, r.shape[-1]) for r in reference])
    new = np.concatenate([c.astype(np.float64).reshape(-1, c.shape[-1]) for c in candidate])
    if ref.shape != new.shape:
        raise ValueError(f"output shape changed from {ref.shape} to {new.shape}")
    diff = new - ref
    return Verification(
        windows=len(windows),
        tokens=int(windows.size),
        max_abs_error=float(np.abs(diff).max()),
        relative_error=float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
        top1_agreement=float((new.argmax(-1) == ref.argmax(-1)).mean()),
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
