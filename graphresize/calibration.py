"""Calibration: run the model in ONNX Runtime and stream per-group activation statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from graphresize.groups import WidthGroup
from graphresize.ort_utils import make_feeds


@dataclasses.dataclass(frozen=True, eq=False)
class GroupStats:
    """Over ``count`` token rows ``A`` of a group's anchor: ``gram = AᵀA``, ``total = Σ A``."""

    gram: np.ndarray
    total: np.ndarray
    count: int


@dataclasses.dataclass(frozen=True, eq=False)
class Statistics:
    """Per-group statistics over ``tokens`` calibration tokens."""

    groups: dict[str, GroupStats]
    tokens: int


class _Accumulator:
    """Running ``AᵀA`` in float64 from float32 batch products: memory O(D²), not O(tokens)."""

    def __init__(self, width: int) -> None:
        self.gram = np.zeros((width, width))
        self.total = np.zeros(width)
        self.count = 0

    def add(self, activations: np.ndarray) -> None:
        rows = activations.reshape(-1, activations.shape[-1]).astype(np.float32, copy=False)
        self.gram += rows.T @ rows
        self.total += rows.sum(axis=0, dtype=np.float64)
        self.count += rows.shape[0]

    def freeze(self) -> GroupStats:
        return GroupStats(gram=self.gram, total=self.total, count=self.count)


def calibrate(
    session: ort.InferenceSession,
    groups: Sequence[WidthGroup],
    windows: np.ndarray,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> Statistics:
    """Statistics of each group's anchor over ``windows`` ([n, seq] token ids).

    ``session`` must expose every anchor as an output (``make_session(model, anchors)``).
    """
    anchors = [g.anchor for g in groups]
    accumulators = {g.id: _Accumulator(g.width) for g in groups}
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
        ids = windows[start : start + batch_size]
        outputs = session.run(anchors, make_feeds(session, ids))
        for group, activations in zip(groups, outputs, strict=True):
            accumulators[group.id].add(activations)
    return Statistics(groups={k: a.freeze() for k, a in accumulators.items()}, tokens=int(windows.size))
