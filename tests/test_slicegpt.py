"""Per-junction residual transforms with skip matrices (``--method slicegpt``): exactness at
full width on every routable family, exact slicing of an unused subspace, ratio 0, parameter
counts with the skip matrices, and clear refusals."""

import numpy as np
import pytest
from graphresize.passes import cleanup_passes
from graphresize.passes.route_junctions import RouteJunctionsPass

from graphresize.analysis.junctions import junction_route
from graphresize.errors import UnsupportedModelError, UsageError
from graphresize.pipeline import load_prepared, parameter_count, residual_layouts
from graphresize.solve.junctions import JunctionBases, random_bases
from tests.models import optimize_tiny, prepared_residual, run_in_memory

FAMILIES = ["llama_dynamo", "llama_legacy", "llama_optimum", "qwen2", "mistral", "phi3", "phi", "gpt2", "opt"]


def _routed(path):
    """The prepared model (γ folded, LayerNorm→RMS), its residual group and junction route."""
    model, groups = prepared_residual(path)
    (group,) = groups.of_kind("residual")
    layout = residual_layouts(model, groups, [group.id])[group.id]
    return model, group, junction_route(model.graph, group, layout)


def _expected_count(model, route, widths, cleaned: bool = False) -> int:
    """Parameters after routing: every stream axis at its slot's width, plus the skips."""
    graph = model.graph
    total = parameter_count(model)
    sizes = {}
    for k, (junction, readers) in enumerate(zip(route.layout.junctions, route.layout.readers, strict=True)):
        for reader in readers:
            sizes[reader.weight] = widths[k]
        if junction.gain:
            sizes[junction.gain] = widths[k]
    sizes.update((w.name, widths[w.slot]) for w in route.writers)
    for name, width in sizes.items():
        size = int(np.prod(graph.initializers[name].const_value.shape))
        total += size // route.width * width - size
    # a decomposed norm rescaled to a narrower width gets its own ε scalar (one element); the
    # old one goes when no other norm shares it (after cleanup)
    rescaled = sum(1 for j, w in zip(route.layout.junctions, widths, strict=True)
                   if w != route.width and j.eps_value and (not cleaned or len(graph.initializers[j.eps_value].uses()) > 1))
    return total + route.skip_parameters(widths) + rescaled


@pytest.mark.parametrize("fixture", FAMILIES)
def test_full_width_random_bases_per_junction_change_nothing(fixture, request):
    """A random orthogonal Q_k at every junction (d = D), skip matrices Q_aᵀQ_b on the sums:
    the outputs in ORT match the original's, and the parameters grow by the skips exactly."""
    path = request.getfixturevalue(fixture)
    before = run_in_memory(load_prepared(path))
    model, group, route = _routed(path)
    assert route.frozen is None, route.frozen
    count = route.count
    assert count >= 3 and len(route.skips) >= count - 1  # a skip into every junction after the first
    widths = [group.width] * count
    bases = random_bases(group.id, group.width, widths, seed=1)
    assert all(abs(np.linalg.det(bases.skip(0, k))) > 0.99 for k in range(count))  # rotations
    expected = _expected_count(model, route, widths)
    prepared = parameter_count(model)
    route_pass = RouteJunctionsPass([route], [bases])
    route_pass(model)
    assert parameter_count(model) == expected == prepared + route.skip_parameters(widths)
    assert len(route_pass.skip_matrices) == len(route.skips)
    assert sum(n.op_type == "MatMul" and n.name.endswith(tuple(f".skip{i}" for i in range(3))) for n in model.graph) == len(route.skips)
    cleanup_passes()(model)
    for want, got in zip(before, run_in_memory(model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert np.max(np.abs(got - want)) < 1e-5 * max(1.0, float(np.max(np.abs(want))))


def test_skip_parameters_are_counted_when_sliced(llama_dynamo):
    """Sliced to 48 of 64 (the head at 64): the count is the per-slot widths plus the skips."""
    model, group, route = _routed(llama_dynamo)
    widths = [48] * (route.count - 1) + [group.width]
    bases = random_bases(group.id, group.width, widths, seed=2)
    expected = _expected_count(model, route, widths)
    before = parameter_count(model)
    RouteJunctionsPass([route], [bases])(model)
    assert parameter_count(model) == expected
    # 2 layers: 4 skips (48×48 ×3, 48×64 into the final norm), readers/writers shrunk
    assert route.skip_parameters(widths) == 3 * 48 * 48 + 48 * 64
    assert expected < before + route.skip_parameters(widths)
    out = run_in_memory(model)
    assert out[0].shape[-1] == 256 and np.all(np.isfinite(out[0]))



def test_slicegpt_removes_an_unused_subspace_exactly(llama_narrow_stream, tmp_path, calib_tokens, monkeypatch):
    """The stream lives in 48 of 64 features: per-junction PCA to 48 keeps it all, every skip
    matrix maps it exactly, the norms still divide by 64, so the outputs do not change
    (without SliceGPT's embedding centring, which would move the stream off that subspace)."""
    from graphresize.methods.slicegpt import SliceGPT

    monkeypatch.setattr(SliceGPT, "center_embedding", False)
    out = tmp_path / "out.onnx"
    result = optimize_tiny(llama_narrow_stream, out, calib_tokens, ratio=0.25, target="residual", method="slicegpt")
    (entry,) = result.plan.changed()
    assert entry.new_width == 48
    info = result.transforms[entry.group_id].info
    assert info["junction_widths"] == [48] * 4 + [64]
    assert min(info["junction_energy"]) > 1 - 1e-9
    assert result.verification.max_abs_error < 1e-4
    before, after = run_in_memory(load_prepared(llama_narrow_stream)), run_in_memory(load_prepared(out))
    np.testing.assert_allclose(after[0], before[0], rtol=1e-4, atol=2e-5)


def test_slicegpt_ratio_zero_is_identity(llama_dynamo, tmp_path, calib_tokens):
    out = tmp_path / "out.onnx"
    result = optimize_tiny(llama_dynamo, out, calib_tokens, ratio=0.0, target="residual", method="slicegpt")
    assert result.params_after == result.params_before
    for want, got in zip(run_in_memory(load_prepared(llama_dynamo)), run_in_memory(load_prepared(out)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["llama_dynamo", "gpt2"])
def test_slicegpt_resizes_and_counts(fixture, request, tmp_path, calib_tokens):
    """A real slice (64 → 48, head at 64): the written count is the per-slot widths plus the
    skip matrices (the head stays untied: a 48-wide table cannot fit the 64-wide head)."""
    path = request.getfixturevalue(fixture)
    out = tmp_path / "out.onnx"
    result = optimize_tiny(path, out, calib_tokens, ratio=0.25, target="residual", method="slicegpt")
    model, group, route = _routed(path)
    widths = [48] * (route.count - 1) + [group.width]
    assert result.params_after == _expected_count(model, route, widths, cleaned=True)
    assert sum(n.op_type == "MatMul" and ".skip" in n.name for n in load_prepared(out).graph) == len(route.skips)
    assert np.all(np.isfinite(run_in_memory(load_prepared(out))[0]))


def test_slicegpt_refuses_mlp_and_post_norm(llama_dynamo, bert, tmp_path, calib_tokens):
    with pytest.raises(UsageError, match="residual stream only"):
        optimize_tiny(llama_dynamo, tmp_path / "a.onnx", calib_tokens, ratio=0.25, target="mlp", method="slicegpt")
    with pytest.raises(UnsupportedModelError):
        optimize_tiny(bert, tmp_path / "b.onnx", calib_tokens, ratio=0.25, target="residual", method="slicegpt")
    assert not (tmp_path / "b.onnx").exists()


def test_bases_and_skips_are_orthonormal_maps():
    bases = random_bases("r", 16, [16, 8, 16], seed=0)
    for q in bases.bases:
        np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-12)
    assert bases.skip(1, 2).shape == (8, 16)
    with pytest.raises(ValueError):
        JunctionBases("r", (np.eye(4), np.eye(5)), "x")
