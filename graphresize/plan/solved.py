"""Solves kept by plan entry, so that no group is solved twice at one width in a run.

The rule: a group's transform depends only on its plan entry (group, kind, width, new width),
the run's options and the statistics it is solved from. Where those statistics are fixed for
the run (the dense statistics global allocation scores its floor factors with), the first
solve of an entry is kept and every later request for it (another candidate with the same
width for that group, the final rewrite of the chosen candidate) is answered from it. With a
``folder``, each kept transform is written to a file there and read back on request, so that
the segment engine holds no more than one transform at a time; without, they stay in memory.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

from graphresize.plan.widths import GroupPlan
from graphresize.solve.transforms import ChannelTransform

Solve = Callable[[GroupPlan], ChannelTransform | None]


class SolveCache:
    """``cache(entry)``: ``solve(entry)`` the first time, the kept result after. ``solves``:
    how many times ``solve`` ran; ``reuses``: how many requests were answered without it."""

    def __init__(self, solve: Solve, folder: str | Path | None = None) -> None:
        self._solve = solve
        self._folder = Path(folder) if folder is not None else None
        self._kept: dict[GroupPlan, ChannelTransform | None | Path] = {}
        self.solves = 0
        self.reuses = 0

    def __call__(self, entry: GroupPlan) -> ChannelTransform | None:
        if entry in self._kept:
            self.reuses += 1
            kept = self._kept[entry]
            if isinstance(kept, Path):
                with open(kept, "rb") as f:
                    return pickle.load(f)
            return kept
        transform = self._solve(entry)
        self.solves += 1
        if self._folder is not None and transform is not None:
            path = self._folder / f"solved-{len(self._kept)}.pkl"
            with open(path, "wb") as f:
                pickle.dump(transform, f, protocol=pickle.HIGHEST_PROTOCOL)
            self._kept[entry] = path
        else:
            self._kept[entry] = transform
        return transform
