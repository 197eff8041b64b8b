"""Residual-stream transforms: a merge ``M`` (D×d) routed through its QR split (pure numpy).

The stream is read through norms, which are invariant to orthogonal maps only, so a general
merge ``M = Q·R`` is split: writers get ``Q`` (the stream carries ``x·Q``), readers get
``R·U`` with ``U`` an unmerge of ``M`` (the triangular part absorbed into the readers).

Readers (``unmerge``):

* ``ot``: ``R·U`` with ``U = (diag(1/a)·P)ᵀ`` from the OT plan (DOTResize);
* ``pinv``: ``R·M⁺ = Qᵀ``, the orthogonal projection onto ``span(M)``;
* ``lsq``: the least-squares readout of the stream from ``x·Q`` over the calibration rows,
  ``(QᵀGQ)⁻¹QᵀG`` (equal to ``R·(MᵀGM)⁻¹MᵀG``: it depends on ``span(M)`` only).

``method="pca"`` takes ``Q`` = the top-``d`` eigenvectors of ``G`` (a single global SliceGPT
rotation), ``"prune"`` a selection of the ``d`` features of largest norm.
"""

from __future__ import annotations

import numpy as np

from graphresize.calibrate.statistics import GroupStats
from graphresize.solve.merge import DEFAULT_REG, distinct_support, ot_merge
from graphresize.solve.transforms import ChannelTransform

METHODS = ("dotresize", "prune", "pca")
UNMERGES = ("lsq", "ot", "pinv")


def qr_split(merge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``M = Q·R`` with orthonormal ``Q`` (D×d) and upper-triangular ``R`` with a non-negative
    diagonal (a unique, deterministic factorisation)."""
    q, r = np.linalg.qr(merge)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return q * signs, r * signs[:, None]


def lsq_reader(gram: np.ndarray, q: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """``(QᵀGQ + δI)⁻¹QᵀG``: the map that best reads the stream back from ``x·Q``."""
    hessian = q.T @ gram @ q
    hessian += ridge * max(float(np.mean(np.diag(hessian))), 1e-30) * np.eye(hessian.shape[0])
    return np.linalg.solve(hessian, q.T @ gram)


def principal_basis(gram: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` leading eigenvectors of ``gram`` (columns), each signed so that its
    largest-magnitude entry is positive."""
    values, vectors = np.linalg.eigh(gram)
    top = vectors[:, np.argsort(-values, kind="stable")[:size]]
    peaks = top[np.abs(top).argmax(axis=0), np.arange(size)]
    return top * np.where(peaks < 0, -1.0, 1.0)


def residual_transform(
    group_id: str,
    stats: GroupStats,
    new_width: int,
    *,
    method: str = "dotresize",
    unmerge: str = "lsq",
    reg: float = DEFAULT_REG,
    metric: str = "euclidean",
    target_mass: str = "cluster",
) -> ChannelTransform:
    """The stream transform: ``merge`` = ``Q`` for the writers, ``unmerge`` = the readers'
    map (d×D). ``stats`` are of the unit-RMS stream rows at every norm junction."""
    if method not in METHODS or unmerge not in UNMERGES:
        raise ValueError(f"unknown residual method {method!r} or unmerge {unmerge!r}")
    gram = stats.gram
    width = gram.shape[0]
    info: dict = {"unmerge": unmerge}
    if method == "pca":
        q = principal_basis(gram, new_width)
        reader = q.T
        info["unmerge"] = "pinv"  # for a principal basis lsq and pinv coincide
    else:
        if method == "prune":
            support = distinct_support(gram, new_width)
            merge = np.zeros((width, new_width))
            merge[support, np.arange(new_width)] = 1.0
            ot_unmerge = merge.T
            info["support"] = support.tolist()
        else:
            merged = ot_merge(group_id, stats, new_width, reg=reg, metric=metric, target_mass=target_mass, unmerge="ot")
            merge, ot_unmerge = merged.merge, merged.unmerge
            info.update({k: merged.info[k] for k in ("reg", "target_mass", "support", "assignment_entropy")})
        q, r = qr_split(merge)
        reader = {"ot": lambda: r @ ot_unmerge, "pinv": lambda: q.T, "lsq": lambda: lsq_reader(gram, q)}[unmerge]()
    info.update(stream_errors(gram, q, reader))
    return ChannelTransform(group_id, q, reader, method=method, info=info)


def stream_errors(gram: np.ndarray, q: np.ndarray, reader: np.ndarray) -> dict[str, float]:
    """Over the calibration rows ``A`` (``G = AᵀA``): the share of ``‖A‖²`` that ``A·Q``
    keeps (``energy``), and the relative error of the readers' reconstruction
    ``‖A − A·Q·reader‖² / ‖A‖²``."""
    total = float(np.trace(gram)) or 1.0
    residual = np.eye(gram.shape[0]) - q @ reader
    return {
        "energy": float(np.trace(q.T @ gram @ q)) / total,
        "reconstruction_error": float(np.trace(residual.T @ gram @ residual)) / total,
    }
