"""Plan: the new width of every resizable group."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from graphresize.analysis.groups import RESIZABLE_KINDS, WidthGroups
from graphresize.errors import UsageError


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    group_id: str
    kind: str
    width: int
    new_width: int

    @property
    def changes(self) -> bool:
        return self.new_width != self.width


@dataclasses.dataclass(frozen=True)
class ResizePlan:
    """New widths for the resizable groups; frozen groups are not listed."""

    entries: tuple[GroupPlan, ...]
    ratios: Mapping[str, float]
    multiple_of: int

    def changed(self) -> tuple[GroupPlan, ...]:
        return tuple(e for e in self.entries if e.changes)

    def width_of(self, group_id: str) -> int:
        return next(e.new_width for e in self.entries if e.group_id == group_id)


def check_ratio(ratio: float, what: str = "--ratio") -> float:
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"{what} must be in [0, 1), got {ratio:g}")
    return float(ratio)


def narrowed_width(width: int, ratio: float, multiple_of: int = 8) -> int:
    """``(1 - ratio)·width`` rounded to a multiple of ``multiple_of`` (tensor-core friendly),
    kept within ``[multiple_of, width]``; ratio 0 keeps the width exactly."""
    if ratio == 0.0:
        return width
    step = max(1, multiple_of if width >= 4 * multiple_of else 1)
    target = round((1.0 - ratio) * width / step) * step
    return int(min(width, max(step, target)))


def make_plan(
    groups: WidthGroups,
    ratio: float,
    *,
    kinds: frozenset[str] | set[str] = RESIZABLE_KINDS,
    kind_ratios: Mapping[str, float] | None = None,
    multiple_of: int = 8,
) -> ResizePlan:
    """One ratio for every resizable group of ``kinds``, overridden per kind by ``kind_ratios``."""
    if multiple_of < 1:
        raise UsageError(f"--multiple-of must be at least 1, got {multiple_of}")
    ratios = {kind: check_ratio(ratio) for kind in kinds}
    for kind, value in (kind_ratios or {}).items():
        if kind not in RESIZABLE_KINDS:
            raise UsageError(f"cannot resize {kind} groups in this version")
        ratios[kind] = check_ratio(value, f"--ratio-{kind}")
    entries = tuple(
        GroupPlan(g.id, g.kind, g.width, narrowed_width(g.width, ratios[g.kind], multiple_of))
        for g in groups.resizable(frozenset(ratios))
    )
    return ResizePlan(entries=entries, ratios=ratios, multiple_of=multiple_of)
