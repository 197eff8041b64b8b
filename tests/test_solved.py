"""``plan/solved.py``: every plan entry solved once, the kept transform answered after, in
memory or read back from a folder as it was solved."""

from __future__ import annotations

import numpy as np
import pytest

from graphresize.plan.solved import SolveCache
from graphresize.plan.widths import GroupPlan
from graphresize.solve.transforms import ChannelTransform


def _solve(entry: GroupPlan) -> ChannelTransform | None:
    """A seeded transform per (group, width); group ``skip`` solves to None."""
    if entry.group_id == "skip":
        return None
    rng = np.random.default_rng(entry.new_width)
    merge = rng.standard_normal((entry.width, entry.new_width))
    return ChannelTransform(entry.group_id, merge, np.linalg.pinv(merge), "seeded", {"new_width": entry.new_width})


@pytest.mark.parametrize("on_disk", [False, True])
def test_each_entry_is_solved_once(tmp_path, on_disk):
    calls = []
    cache = SolveCache(lambda entry: calls.append(entry) or _solve(entry), tmp_path if on_disk else None)
    a, b, skip = GroupPlan("mlp.0", "mlp", 16, 8), GroupPlan("mlp.0", "mlp", 16, 12), GroupPlan("skip", "mlp", 16, 8)
    first = cache(a)
    for _ in range(3):
        again = cache(a)
        np.testing.assert_array_equal(again.merge, first.merge)
        np.testing.assert_array_equal(again.unmerge, first.unmerge)
        assert again.info == {"new_width": 8} and again.group_id == "mlp.0"
    assert cache(b).new_width == 12 and cache(b).new_width == 12
    assert cache(skip) is None and cache(skip) is None
    assert calls == [a, b, skip]
    assert (cache.solves, cache.reuses) == (3, 5)
    assert len(list(tmp_path.glob("solved-*.pkl"))) == (2 if on_disk else 0)  # None is kept in memory
    assert (cache(a) is first) is not on_disk  # on disk: a fresh copy per request, nothing held
