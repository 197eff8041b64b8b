"""The result of a solve: how one width group's channels map to its new, narrower channels."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelTransform:
    """Linear maps for one group of width ``D`` narrowed to ``d``.

    ``merge`` (D×d) is applied on every axis that *writes* the group's features (producer
    columns, biases, per-channel vectors): ``W' = W·merge``. ``unmerge`` (d×D) is applied on
    every axis that *reads* them (consumer rows): ``W' = unmerge·W``. ``unmerge·merge`` need
    not be the identity; for a pure selection both are 0/1 matrices.
    """

    group_id: str
    merge: np.ndarray
    unmerge: np.ndarray
    method: str
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        width, new_width = self.merge.shape
        if self.unmerge.shape != (new_width, width):
            raise ValueError(
                f"{self.group_id}: merge {self.merge.shape} and unmerge {self.unmerge.shape} disagree"
            )

    @property
    def width(self) -> int:
        return self.merge.shape[0]

    @property
    def new_width(self) -> int:
        return self.merge.shape[1]
