"""Measurements of a graph in ONNX Runtime: perplexity on a token stream and latency."""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from graphresize.ort_utils import make_feeds


@dataclasses.dataclass(frozen=True)
class Perplexity:
    value: float
    tokens: int
    seq_len: int


@dataclasses.dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    batch: int
    seq_len: int
    runs: int


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(
    session: ort.InferenceSession, stream: np.ndarray, *, seq_len: int = 512, max_tokens: int | None = None, progress: bool = False
) -> Perplexity:
    """Token-level perplexity over non-overlapping windows of ``seq_len`` (the usual protocol:
    each window starts without context; every token but the first of a window is scored)."""
    if max_tokens is not None:
        stream = stream[:max_tokens]
    count = stream.size // seq_len
    if count == 0:
        raise ValueError(f"need at least {seq_len} tokens, got {stream.size}")
    windows = stream[: count * seq_len].reshape(count, seq_len)
    name = session.get_outputs()[0].name
    nll, scored = 0.0, 0
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress, leave=False):
        ids = window[None, :]
        logits = session.run([name], make_feeds(session, ids))[0][0].astype(np.float32)
        logp = _log_softmax(logits[:-1])
        nll -= float(logp[np.arange(seq_len - 1), window[1:]].sum())
        scored += seq_len - 1
    return Perplexity(value=float(np.exp(nll / scored)), tokens=int(scored), seq_len=seq_len)


def latency(
    sessions: dict[str, ort.InferenceSession],
    *,
    batch: int = 1,
    seq_len: int = 128,
    runs: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, Latency]:
    """Median and 90th-percentile wall time of one forward pass (prompt processing) of each
    session, measured side by side: runs alternate between sessions so that load on a
    shared machine hits all of them alike."""
    ids = np.random.default_rng(seed).integers(0, 100, size=(batch, seq_len), dtype=np.int64)
    feeds = {name: make_feeds(s, ids) for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {
        name: Latency(
            median_ms=statistics.median(t),
            p90_ms=sorted(t)[min(len(t) - 1, int(0.9 * len(t)))],
            batch=batch,
            seq_len=seq_len,
            runs=runs,
        )
        for name, t in times.items()
    }
