"""The math of the solve, on synthetic statistics (no graph)."""

import numpy as np
import pytest
from graphresize.passes.resize_groups import transform_axis

from graphresize.calibrate.statistics import GroupStats
from graphresize.plan.widths import narrowed_width
from graphresize.solve.merge import (
    activation_cost,
    distinct_support,
    ot_merge,
    prune,
    sinkhorn_plan,
)


def _stats(acts: np.ndarray) -> GroupStats:
    return GroupStats(gram=acts.T @ acts, total=acts.sum(0), count=len(acts))


@pytest.mark.parametrize("unmerge", ["ot", "lsq"])
@pytest.mark.parametrize(("reg", "mass"), [(0.0, "cluster"), (0.0, "uniform"), (0.05, "cluster"), (0.05, "uniform")])
def test_duplicated_neurons_merge_exactly(reg, mass, unmerge):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(512, 16))
    acts = np.concatenate([base, base], axis=1)[:, rng.permutation(32)]  # every neuron twice
    w_down = rng.normal(size=(32, 8))
    t = ot_merge("g", _stats(acts), 16, reg=reg, target_mass=mass, unmerge=unmerge)
    merged = acts @ t.merge  # the new neurons
    np.testing.assert_allclose(merged @ t.unmerge @ w_down, acts @ w_down, rtol=1e-5, atol=1e-5)
    assert t.info["assignment_entropy"] < 1e-4


def test_exact_plan_is_the_nearest_assignment_and_beats_entropic():
    rng = np.random.default_rng(5)
    acts = rng.normal(size=(400, 48)) * rng.gamma(1.0, size=48)
    stats = _stats(acts)
    exact = ot_merge("g", stats, 32, unmerge="ot")
    blurred = ot_merge("g", stats, 32, reg=0.5, unmerge="ot")
    support = np.array(exact.info["support"])
    cost = activation_cost(stats.gram, support)
    assert (exact.unmerge.argmax(axis=0) == cost.argmin(axis=1)).all()
    assert exact.info["assignment_entropy"] == 0.0 and blurred.info["assignment_entropy"] > 0.1
    assert exact.info["transport_cost"] < blurred.info["transport_cost"]


def test_support_skips_duplicates_and_prefers_large_norms():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(256, 4)) * np.array([4.0, 3.0, 2.0, 1.0])
    acts = np.concatenate([base, base], axis=1)  # columns j and j+4 are copies
    support = distinct_support(acts.T @ acts, 4)
    assert sorted(set(support % 4)) == [0, 1, 2, 3]
    # Without copies, the largest norms win.
    assert list(distinct_support(base.T @ base, 2)) == [0, 1]


def test_plan_marginals_and_merge_columns_are_averages():
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(300, 40))
    t = ot_merge("g", _stats(acts), 24, unmerge="ot")
    assert t.merge.shape == (40, 24) and t.unmerge.shape == (24, 40)
    np.testing.assert_allclose(t.merge.sum(axis=0), 1.0, atol=1e-9)  # weighted averages
    np.testing.assert_allclose(t.unmerge.sum(axis=0), 1.0, atol=1e-9)  # each old neuron read back once
    assert np.all(t.merge >= 0)


def test_cost_matches_pairwise_distances():
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(50, 6))
    cost = activation_cost(acts.T @ acts, np.array([1, 4]))
    expected = ((acts[:, :, None] - acts[:, [1, 4]][:, None, :]) ** 2).sum(0)
    np.testing.assert_allclose(cost, expected, rtol=1e-9, atol=1e-9)


def test_sinkhorn_small_reg_is_a_hard_assignment():
    cost = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    plan = sinkhorn_plan(cost, reg=0.01)
    np.testing.assert_allclose(plan, [[0.25, 0], [0, 0.25], [0.25, 0], [0, 0.25]], atol=1e-12)


def test_transform_axis_reads_and_writes():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(5, 7))
    m = rng.normal(size=(7, 3))
    u = rng.normal(size=(3, 5))
    np.testing.assert_allclose(transform_axis(w, 1, m, reads=False), w @ m)
    np.testing.assert_allclose(transform_axis(w, 0, u, reads=True), u @ w)
    bias = rng.normal(size=7)
    np.testing.assert_allclose(transform_axis(bias, 0, m, reads=False), bias @ m)


@pytest.mark.parametrize(
    ("width", "ratio", "multiple", "expected"),
    [(1536, 0.0, 8, 1536), (1536, 0.3, 8, 1072), (128, 0.5, 8, 64), (100, 0.3, 8, 72), (20, 0.5, 8, 10), (7, 0.0, 8, 7)],
)
def test_narrowed_width(width, ratio, multiple, expected):
    assert narrowed_width(width, ratio, multiple) == expected


def test_prune_with_least_squares_readout_recovers_dependent_neurons():
    """Dropped neurons that are linear combinations of kept ones are read back exactly."""
    rng = np.random.default_rng(6)
    kept = rng.normal(size=(600, 12)) * 3.0
    dropped = kept @ rng.normal(size=(12, 4)) * 0.1  # smaller norms: pruned first
    acts = np.concatenate([kept, dropped], axis=1)
    w_down = rng.normal(size=(16, 5))
    lsq, plain = prune("g", _stats(acts), 12, unmerge="lsq"), prune("g", _stats(acts), 12, unmerge="ot")
    assert sorted(lsq.info["support"]) == list(range(12))
    np.testing.assert_allclose(acts @ lsq.merge @ lsq.unmerge @ w_down, acts @ w_down, rtol=1e-4, atol=1e-4)
    assert np.abs(acts @ plain.merge @ plain.unmerge @ w_down - acts @ w_down).max() > 0.1


def test_least_squares_unmerge_never_worse_than_ot_readout():
    rng = np.random.default_rng(7)
    acts = np.maximum(rng.normal(size=(800, 64)) @ rng.normal(size=(64, 64)), 0.0)
    stats = _stats(acts)

    def error(t):
        r = np.eye(64) - t.merge @ t.unmerge
        return np.trace(r.T @ stats.gram @ r)

    assert error(ot_merge("g", stats, 40, unmerge="lsq")) < error(ot_merge("g", stats, 40, unmerge="ot"))
