"""Sequential per-junction statistics for ``--method slicegpt`` (``engine/junction_walk.py``).

Checks: through the engine at full width with random rotations at every junction, the walk
sees the dense stream at every junction and the routed model reproduces the outputs (1e-5);
sliced, junction 0 sees the dense stream, junction 1 sees exactly the dense model fed the
projected embedding ``E·Q_0·Q_0ᵀ`` (the recursion the walk implements), and the routed model's
final full-width junction receives exactly the stream whose Gram the walk measured there.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from models import optimize_tiny, prepared_residual, run_in_memory

from graphresize.calibrate.statistics import calibrate
from graphresize.engine import sequential
from graphresize.io.ort_utils import make_session
from graphresize.methods.slicegpt import SliceGPT, junction_key
from graphresize.options import OptimizeOptions
from graphresize.pipeline import residual_layouts
from graphresize.plan.widths import GroupPlan


def _windows(n: int = 6, seq: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, size=(n, seq))


def _prepared(path, new_width=None):
    """The prepared model (γ folded) and an analysis stand-in whose plan narrows the residual
    group to ``new_width`` (default: its full width)."""
    model, groups = prepared_residual(path)
    (group,) = groups.of_kind("residual")
    layouts = residual_layouts(model, groups, [group.id])
    entry = GroupPlan(group.id, "residual", group.width, new_width or group.width)
    return model, types.SimpleNamespace(groups=groups, layouts=layouts, plan=types.SimpleNamespace(changed=lambda: (entry,)))


class _Recording(SliceGPT):
    """SliceGPT that records the statistics each junction was solved from; with ``rotate``,
    full-width junctions get a seeded random rotation instead of the identity; the embedding
    not centred (that changes the function on purpose: ``test_centered_embedding_*``)."""

    center_embedding = False

    def __init__(self, rotate: bool = False) -> None:
        super().__init__()
        self.rotate = rotate
        self.seen: list = []
        self._rng = np.random.default_rng(7)

    def solve_junction(self, stats, width, options):
        self.seen.append(stats)
        if self.rotate and width == stats.gram.shape[0]:
            return np.linalg.qr(self._rng.standard_normal((width, width)))[0]
        return super().solve_junction(stats, width, options)


def _walk(model, found, calib, method):
    windows = types.SimpleNamespace(calib=calib, holdout=calib[:2])
    opts = OptimizeOptions(ratio=0.0, target="residual", method="slicegpt", progress=False, batch_size=2)
    return sequential.run(model, found, windows, method, opts, lambda stage: None)


def _dense_grams(model, found, calib, method):
    (entry,) = found.plan.changed()
    requests = method.stat_requests(found.groups.by_id(entry.group_id), found.layouts)
    session = make_session(model, [r.values[0][0] for r in requests])
    stats = calibrate(session, requests, calib, batch_size=2, progress=False).groups
    return [stats[junction_key(entry.group_id, k)].gram for k in range(len(requests))]


@pytest.mark.parametrize("fixture", ["llama_dynamo", "gpt2", "phi3"])
def test_full_width_walk_with_rotations_is_exact(fixture, request):
    """Ratio 0 through the walk: every junction solved (a random rotation), routed with its
    skip matrices; the walk saw the dense stream at every junction and the outputs hold."""
    path = request.getfixturevalue(fixture)
    model, found = _prepared(path)
    calib = _windows(seed=1)
    before = run_in_memory(model)
    dense = _dense_grams(model, found, calib, SliceGPT())
    method = _Recording(rotate=True)
    outcome = _walk(model, found, calib, method)
    (transform,) = outcome.transforms.values()
    assert transform.info["statistics"] == "sequential" and len(method.seen) == len(dense) >= 5
    for got, want in zip(method.seen, dense, strict=True):
        np.testing.assert_allclose(got.gram, want, rtol=2e-5, atol=1e-4)
    assert sum(".skip" in n.name for n in model.graph) >= len(dense) - 1  # the rotations were routed
    for want, got in zip(before, run_in_memory(model), strict=True):
        assert np.max(np.abs(got - want)) < 1e-5 * max(1.0, float(np.max(np.abs(want))))


def _embedding_table(model):
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None
                  and n.inputs[0].const_value.shape[-1] == 64)
    return gather.inputs[0]


def test_sliced_walk_statistics_are_the_projected_streams(llama_dynamo):
    """Sliced 64 → 48: junction 0 sees the dense stream; junction 1 sees exactly the dense
    model run on the projected embedding E·Q_0·Q_0ᵀ (and not the dense stream); the routed
    model's last (full-width) junction receives the stream the walk measured there."""
    calib = _windows(seed=2)
    model, found = _prepared(llama_dynamo, 48)
    method = _Recording()
    dense = _dense_grams(model, found, calib, method)
    _walk(model, found, calib, method)
    seen = method.seen
    q0 = method._bases[found.plan.changed()[0].group_id].bases[0]
    np.testing.assert_allclose(seen[0].gram, dense[0], rtol=2e-5, atol=1e-4)
    gap = np.linalg.norm(seen[1].gram - dense[1]) / np.linalg.norm(dense[1])
    assert gap > 1e-3
    # the dense model with the projected embedding table gives junction 1's statistics
    projected, pfound = _prepared(llama_dynamo, 48)
    table = _embedding_table(projected)
    array = table.const_value.numpy()
    table.const_value = graphresize_tensor(array @ q0 @ q0.T, table.name)
    np.testing.assert_allclose(seen[1].gram, _dense_grams(projected, pfound, calib, SliceGPT())[1], rtol=1e-4, atol=1e-3)
    # the routed model (rewritten in place by the walk): its final junction reads the full-width
    # stream whose Gram the walk measured
    last = found.layouts[found.plan.changed()[0].group_id].junctions[-1].stream[0]
    session = make_session(model, [last])
    from graphresize.io.ort_utils import make_feeds

    gram = sum(np.einsum("bti,btj->ij", *(2 * [session.run([last], make_feeds(session, calib[i : i + 2]))[0].astype(np.float64)]))
               for i in range(0, len(calib), 2))
    np.testing.assert_allclose(gram, seen[-1].gram, rtol=1e-4, atol=1e-3 * np.abs(seen[-1].gram).max())


def graphresize_tensor(array: np.ndarray, name: str):
    import onnx_ir as ir

    return ir.tensor(array.astype(np.float32), name=name)


def test_optimize_slicegpt_uses_sequential_statistics(llama_dynamo, calib_tokens, tmp_path):
    """The CLI path: --method slicegpt takes the walk without --engine segment (embedding
    centred); ratio 0 leaves the model unchanged."""
    result = optimize_tiny(llama_dynamo, tmp_path / "s.onnx", calib_tokens, 0.25, target="residual", method="slicegpt")
    (transform,) = result.transforms.values()
    assert transform.info["statistics"] == "sequential" and transform.info["center_embedding"] is True
    zero = optimize_tiny(llama_dynamo, tmp_path / "z.onnx", calib_tokens, 0.0, target="residual", method="slicegpt")
    assert zero.params_after == zero.params_before and zero.verification.max_abs_error < 1e-5


def test_centered_embedding_is_the_only_change(llama_dynamo):
    """``center_embedding`` (SliceGPT's layernorm fusion on an RMSNorm model, on by default):
    the token table rows get zero mean over the stream, every other initializer is untouched."""
    model, found = _prepared(llama_dynamo)
    (entry,) = found.plan.changed()
    group, layout = found.groups.by_id(entry.group_id), found.layouts[entry.group_id]
    assert _Recording().prepare_stream(model, group, layout) == []
    before = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items() if v.const_value is not None}
    method = SliceGPT()
    assert method.center_embedding  # SliceGPT's default
    (name,) = method.prepare_stream(model, group, layout)
    table = model.graph.initializers[name].const_value.numpy()
    assert table.shape[-1] == 64 and np.abs(table.mean(axis=-1)).max() < 1e-6 < np.abs(before[name].mean(axis=-1)).max()
    np.testing.assert_allclose(table, before[name] - before[name].mean(axis=-1, keepdims=True), atol=1e-6)
    changed = [n for n, v in model.graph.initializers.items() if n in before and not np.array_equal(v.const_value.numpy(), before[n])]
    assert changed == [name]
