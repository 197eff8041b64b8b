"""One orthonormal basis per norm junction of a residual stream (pure numpy).

``JunctionBases`` holds ``Q_k`` (D×d_k, orthonormal columns) for every junction ``k`` of one
residual group, in junction order. The rewrite (``passes/route_junctions.py``) makes the
readers of junction ``k`` read ``Q_kᵀ·W``, the writers into slot ``k`` write ``W·Q_k`` and
each skip from slot ``a`` to slot ``b`` multiply by ``S = Q_aᵀ·Q_b`` (d_a×d_b).

* ``principal_bases``: SliceGPT's rule, ``Q_k`` = the ``d_k`` leading eigenvectors of the
  Gram of the stream entering junction ``k`` (SliceGPT's ``pca_calc`` takes the raw norm
  input; its diagonal damping does not move eigenvectors). A junction left at full width gets
  the identity (any orthogonal map is exact there; the identity leaves its readers as they
  are).
* ``merged_bases``: the DOTResize paper's per-junction ``T_k = Q_k·R_k``: the OT merge of
  junction ``k``'s stream split by QR; the readers read ``Q_kᵀ`` (the ``pinv`` unmerge).
* ``random_bases``: seeded random orthonormal bases (tests: at full width any choice must
  reproduce the model).

Each Gram is one junction's statistic, so a sequential engine can hand them over one at a
time (junction ``k``'s Gram from the model already rewritten up to ``k-1``): ``basis_for``
solves one junction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from graphresize.calibrate.statistics import GroupStats
from graphresize.solve.residual import principal_basis, qr_split, stream_errors


@dataclasses.dataclass(frozen=True, eq=False)
class JunctionBases:
    """The per-junction bases of one residual group and what the solve measured (``info``:
    per junction, the share of calibration energy each basis keeps)."""

    group_id: str
    bases: tuple[np.ndarray, ...]
    method: str
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        widths = {q.shape[0] for q in self.bases}
        if len(widths) != 1:
            raise ValueError(f"{self.group_id}: bases of different stream widths {sorted(widths)}")

    @property
    def width(self) -> int:
        return self.bases[0].shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(q.shape[1] for q in self.bases)

    def skip(self, source: int, target: int) -> np.ndarray:
        """``S = Q_sourceᵀ·Q_target``: the stream in slot ``source`` re-expressed in ``target``."""
        return self.bases[source].T @ self.bases[target]


def basis_for(stats: GroupStats, new_width: int, method: str = "pca", **merge_options) -> np.ndarray:
    """One junction's basis from its stream statistics: ``pca`` (leading eigenvectors) or
    ``dotresize`` (the orthonormal factor of the OT merge); the identity at full width."""
    width = stats.gram.shape[0]
    if new_width == width:
        return np.eye(width)
    if method == "pca":
        return principal_basis(stats.gram, new_width)
    if method == "dotresize":
        from graphresize.solve.merge import ot_merge

        merged = ot_merge("junction", stats, new_width, unmerge="ot", **merge_options)
        return qr_split(merged.merge)[0]
    raise ValueError(f"unknown junction basis method {method!r}")


def solve_bases(group_id: str, stats: Sequence[GroupStats], widths: Sequence[int], method: str = "pca",
                **merge_options) -> JunctionBases:
    """The bases of every junction (``stats[k]``, ``widths[k]``), with each one's kept energy."""
    bases = [basis_for(s, w, method, **merge_options) for s, w in zip(stats, widths, strict=True)]
    return junction_bases(group_id, bases, stats, method)


def junction_bases(group_id: str, bases: Sequence[np.ndarray], stats: Sequence[GroupStats], method: str) -> JunctionBases:
    """``bases`` (solved one at a time, e.g. by a sequential walk) with the share of each
    junction's calibration energy (``stats[k]``) that its basis keeps."""
    energy = [round(stream_errors(s.gram, q, q.T)["energy"], 6) for s, q in zip(stats, bases, strict=True)]
    widths = [q.shape[1] for q in bases]
    return JunctionBases(group_id, tuple(bases), method, {"junction_energy": energy, "junction_widths": widths})


def random_bases(group_id: str, width: int, widths: Sequence[int], seed: int = 0) -> JunctionBases:
    """Seeded random orthonormal ``Q_k`` (width × widths[k])."""
    rng = np.random.default_rng(seed)
    bases = tuple(np.linalg.qr(rng.standard_normal((width, width)))[0][:, :w] for w in widths)
    return JunctionBases(group_id, bases, "random")
