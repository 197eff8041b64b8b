"""Calibration: run the model in ONNX Runtime and stream per-group activation statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from graphresize.analysis.groups import WidthGroup
from graphresize.io.ort_utils import make_feeds


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


@dataclasses.dataclass(frozen=True)
class StatRequest:
    """What to accumulate for one group: rows of the sum of each entry of ``values`` (one
    value, or the two inputs of a Skip norm), all entries stacked; with ``unit_rms`` every
    row is first scaled to unit root-mean-square (what a norm junction hands its readers)."""

    key: str
    width: int
    values: tuple[tuple[str, ...], ...]
    unit_rms: bool = False

    @classmethod
    def anchor(cls, group: WidthGroup) -> StatRequest:
        return cls(group.id, group.width, ((group.anchor,),))

    def names(self) -> list[str]:
        return [name for entry in self.values for name in entry]


class _Accumulator:
    """Running ``AᵀA`` in float64 from float32 batch products: memory O(D²), not O(tokens)."""

    def __init__(self, width: int, unit_rms: bool = False) -> None:
        self.gram = np.zeros((width, width))
        self.total = np.zeros(width)
        self.count = 0
        self.unit_rms = unit_rms

    def add(self, activations: np.ndarray) -> None:
        rows = activations.reshape(-1, activations.shape[-1]).astype(np.float32, copy=False)
        if self.unit_rms:
            rows = rows / np.sqrt(np.mean(np.square(rows), axis=1, keepdims=True) + 1e-12)
        self.gram += rows.T @ rows
        self.total += rows.sum(axis=0, dtype=np.float64)
        self.count += rows.shape[0]

    def freeze(self) -> GroupStats:
        return GroupStats(gram=self.gram, total=self.total, count=self.count)


def calibrate(
    session: ort.InferenceSession,
    requests: Sequence[StatRequest],
    windows: np.ndarray,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> Statistics:
    """Statistics of each request over ``windows`` ([n, seq] token ids).

    ``session`` must expose every requested value as an output (``make_session(model, names)``).
    """
    names = list(dict.fromkeys(name for r in requests for name in r.names()))
    accumulators = {r.key: _Accumulator(r.width, r.unit_rms) for r in requests}
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
        ids = windows[start : start + batch_size]
        outputs = dict(zip(names, session.run(names, make_feeds(session, ids)), strict=True))
        for request in requests:
            for entry in request.values:
                accumulators[request.key].add(sum(outputs[name] for name in entry))
    return Statistics(groups={k: a.freeze() for k, a in accumulators.items()}, tokens=int(windows.size))
