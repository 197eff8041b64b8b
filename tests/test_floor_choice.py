"""``allocation.choose_floor``: the floor-factor search both engines run, with a scoring
callback in place of their hold-out KL (``pipeline.allocate_stage``, ``engine/allocate.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from graphresize.plan.allocation import GroupCurve, allocate, choose_floor, error_curve

BLOCK = 6 * 64 * 32
FACTORS = (0.0, 0.1, 0.5, 0.9, 0.95)


def _curves() -> list[GroupCurve]:
    """Six MLPs of width 64 whose output energy against the stream grows with depth: at ratio
    0.3 the floor factors 0.0 and 0.1 give one set of widths, 0.5 another, 0.9 and 0.95 a third."""
    rng = np.random.default_rng(0)
    out = []
    for i, energy in enumerate((0.02, 1.0, 1.0, 5.0, 20.0, 50.0)):
        acts = rng.standard_normal((300, 64)) * np.linspace(2.0, 0.2, 64)
        out.append(GroupCurve(f"mlp.{i}", i, 64, 32, error_curve(acts.T @ acts, rng.standard_normal((64, 8))), energy))
    return out


def _widths(factor: float) -> dict[str, int]:
    return allocate(_curves(), 0.3, BLOCK, floor_factor=factor).widths()


def test_the_factors_give_three_width_sets():
    assert _widths(0.0) == _widths(0.1) == {"mlp.0": 64, "mlp.1": 64, "mlp.2": 56, "mlp.3": 48, "mlp.4": 24, "mlp.5": 8}
    assert _widths(0.5) == {"mlp.0": 64, "mlp.1": 56, "mlp.2": 56, "mlp.3": 48, "mlp.4": 24, "mlp.5": 16}
    assert _widths(0.9) == _widths(0.95) == {"mlp.0": 64, **{f"mlp.{i}": 40 for i in range(1, 6)}}


def test_each_width_set_is_scored_once_and_the_least_wins():
    calls = []

    def score(allocation):
        calls.append(allocation.floor_factor)
        return {0.0: 3.0, 0.5: 2.0, 0.9: 1.0}[allocation.floor_factor]

    choice = choose_floor(_curves(), 0.3, BLOCK, FACTORS, score)
    assert calls == [0.0, 0.5, 0.9]  # 0.1 and 0.95 repeat an earlier factor's widths
    assert choice.floor_factor == 0.9 and choice.allocation.widths() == _widths(0.9)
    assert [c.holdout_kl for c in choice.candidates] == [3.0, 3.0, 2.0, 1.0, 1.0]
    assert [c.floor_factor for c in choice.candidates] == list(FACTORS)
    assert [c.widths for c in choice.candidates] == [_widths(f) for f in FACTORS]
    assert all(c.removed == 3840 for c in choice.candidates)  # ⌈0.3·12288⌉ = 3687, one step over
    assert choice.allocation.candidates == tuple(
        {"floor_factor": f, "holdout_kl": kl, "removed": 3840} for f, kl in zip(FACTORS, [3.0, 3.0, 2.0, 1.0, 1.0], strict=True))


def test_a_tie_keeps_the_first_factor_and_its_floors():
    choice = choose_floor(_curves(), 0.3, BLOCK, (0.9, 0.95, 0.5), lambda allocation: 1.0)
    assert choice.floor_factor == 0.9
    assert [e.floor for e in choice.allocation.entries] == [e.floor for e in allocate(_curves(), 0.3, BLOCK, floor_factor=0.9).entries]
    # the best widths first met at a later factor: that factor, not the one after it with the same widths
    choice = choose_floor(_curves(), 0.3, BLOCK, (0.0, 0.9, 0.95), lambda allocation: 2.0 - allocation.floor_factor)
    assert choice.floor_factor == 0.9 and [c.holdout_kl for c in choice.candidates] == [2.0, 1.1, 1.1]


def test_one_factor_is_not_scored():
    def score(allocation):
        raise AssertionError("a single candidate has nothing to be chosen over")

    choice = choose_floor(_curves(), 0.3, BLOCK, (0.5,), score)
    assert choice.floor_factor == 0.5 and choice.allocation.widths() == _widths(0.5)
    assert choice.allocation.candidates == ({"floor_factor": 0.5, "holdout_kl": None, "removed": 3840},)


def test_no_factor_is_an_error():
    with pytest.raises(ValueError, match="no floor factor"):
        choose_floor(_curves(), 0.3, BLOCK, (), lambda allocation: 0.0)
