"""Residual streams of TorchScript (legacy) and Optimum exports, whose Reshapes take the
stream width at run time from ``Shape`` of another stream value (``x.view(y.size())``):
routed like the dynamo exports, exact at full width, narrowed at a ratio."""

import numpy as np
import onnx_ir as ir
import pytest

import graphresize
from graphresize.analysis.channels import width_source
from graphresize.pipeline import load_prepared
from tests.models import make_feeds, prepared_residual, rotate_stream_full_width, run_ort


def _feeds(path, seed):
    past = 3 if any(v.name.startswith("past_key_values") for v in ir.load(path).graph.inputs) else 0
    return make_feeds(path, batch=2, seq=5, past=past, seed=seed)


LEGACY = ["gpt2_legacy", "opt_legacy", "gpt2_optimum", "opt_optimum", "llama_legacy", "llama_optimum"]


def test_computed_stream_reshapes_are_recognised(gpt2_legacy, opt_legacy):
    """The Reshapes that froze the stream read their last size from another stream value."""
    for path, name in [(gpt2_legacy, "/transformer/Reshape_5"), (opt_legacy, "/decoder/layers.0/Reshape_1")]:
        model = load_prepared(path)
        node = next(n for n in model.graph if n.name == name)
        source = width_source(node)
        assert source is not None and source is not node.inputs[0]
        (group,) = graphresize.analyze(path).of_kind("residual")
        assert group.resizable, group.frozen
        assert source.name in group.values


@pytest.mark.parametrize("fixture", LEGACY)
def test_full_width_rotation_is_exact_in_ort(fixture, request, tmp_path):
    """A random orthogonal rotation of the whole stream: ORT outputs (logits and the KV
    cache) of the rewritten graph equal the original's."""
    path = request.getfixturevalue(fixture)
    model, groups = prepared_residual(path)
    out = rotate_stream_full_width(model, groups, tmp_path / "rotated.onnx")
    feeds = _feeds(path, 1)
    want, got = run_ort(path, feeds), run_ort(out, feeds)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("fixture", ["gpt2_legacy", "opt_legacy", "gpt2_optimum", "opt_optimum"])
def test_residual_resize_at_0_3(fixture, request, tmp_path, calib_tokens):
    path = request.getfixturevalue(fixture)
    out = tmp_path / "out.onnx"
    result = graphresize.optimize(
        path, out, ratio=0.3, calib=calib_tokens, tokens=2048, seq_len=32, progress=False,
        target="residual", multiple_of=1,
    )
    width = round(0.7 * 64)
    assert [e.new_width for e in result.plan.changed()] == [width]
    (group,) = graphresize.analyze(out).of_kind("residual")
    assert group.width == width
    assert 0.0 < result.verification.relative_error < 0.75
    assert result.params_after < result.params_before
    feeds = _feeds(path, 2)
    want, got = run_ort(path, feeds), run_ort(out, feeds)
    for name in want:  # logits and the cache keep their shapes
        assert got[name].shape == want[name].shape and np.isfinite(got[name]).all()
