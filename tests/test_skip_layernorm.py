"""Streams read through ORT's fused SkipLayerNormalization (GPT-2 after
``onnxruntime.transformers.optimizer``) are routed: split into Add + LayerNormalization,
converted to RMS norms, exact at full width, narrowed at a ratio."""

import numpy as np
import onnx_ir as ir
import pytest

import graphresize
from tests.models import make_feeds, prepared_residual, rotate_stream_full_width, run_ort


@pytest.fixture(scope="module")
def gpt2_fused(gpt2_legacy, tmp_path_factory):
    """The legacy GPT-2 after ORT's transformer optimizer without attention fusion: four
    SkipLayerNormalization junctions, two with the MLP's output bias folded in (input 4)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    options.enable_attention = False
    fused = optimize_model(str(gpt2_legacy), model_type="gpt2", num_heads=4, hidden_size=64, opt_level=0,
                           optimization_options=options)
    path = tmp_path_factory.mktemp("skipln") / "gpt2_fused.onnx"
    fused.save_model_to_file(str(path))
    ops = [n.op_type for n in ir.load(path).graph]
    assert ops.count("SkipLayerNormalization") == 4
    return path


def test_fused_stream_is_routable(gpt2_fused):
    (group,) = graphresize.analyze(gpt2_fused).of_kind("residual")
    assert group.resizable, group.frozen


def test_full_width_rotation_is_exact(gpt2_fused, tmp_path):
    model, groups = prepared_residual(gpt2_fused)
    ops = {n.op_type for n in model.graph}
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" not in ops
    out = rotate_stream_full_width(model, groups, tmp_path / "rotated.onnx")
    feeds = make_feeds(gpt2_fused, batch=2, seq=5, seed=1)
    want, got = run_ort(gpt2_fused, feeds), run_ort(out, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_residual_resize_at_0_3(gpt2_fused, tmp_path, calib_tokens):
    out = tmp_path / "out.onnx"
    result = graphresize.optimize(gpt2_fused, out, ratio=0.3, calib=calib_tokens, tokens=2048, seq_len=32,
                                  progress=False, target="residual", multiple_of=1)
    assert [e.new_width for e in result.plan.changed()] == [45]
    assert 0.0 < result.verification.relative_error < 0.75
    assert result.params_after < result.params_before
