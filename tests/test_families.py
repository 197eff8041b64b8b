"""Model families beyond Llama/GPT-2/OPT/BERT: Qwen2 (q/k/v biases), Mistral (sliding
window), Phi-3 (packed qkv_proj and gate_up_proj), Phi-1/2 (partial rotary, LayerNorm,
parallel attention and MLP, fc1/fc2). Golden listings are in test_analyze, full-width residual
rotations in test_residual."""

import numpy as np
import onnx_ir as ir
import pytest

import graphresize
from graphresize.pipeline import load_prepared
from tests.models import run_in_memory

FAMILIES = ["qwen2", "mistral", "phi3", "phi"]
# parameters per MLP neuron at hidden 64: gate, up, down rows (Llama-like); fc1 row + bias, fc2 row (Phi)
PER_NEURON = {"qwen2": 3 * 64, "mistral": 3 * 64, "phi3": 3 * 64, "phi": 64 + 1 + 64}


@pytest.mark.parametrize("fixture", FAMILIES)
def test_two_resizable_mlp_groups(fixture, request):
    groups = graphresize.analyze(request.getfixturevalue(fixture))
    mlps = groups.of_kind("mlp")
    assert [(g.layer, g.width, g.resizable) for g in mlps] == [(0, 128, True), (1, 128, True)]
    (residual,) = groups.of_kind("residual")
    assert residual.resizable and residual.width == 64


def test_packed_gate_up_is_one_group_over_both_halves(phi3):
    """Phi-3's gate_up_proj [64, 256] is split in halves: both halves carry the MLP width."""
    model = load_prepared(phi3)
    (mlp, _) = graphresize.analyze(phi3).of_kind("mlp")
    producers = [p for p in mlp.params if p.role == "producer"]
    assert len(producers) == 2
    assert all(model.graph.initializers[p.name].const_value.shape == (64, 128) for p in producers)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_ratio_zero_is_an_identity(fixture, request, tmp_path, calib_tokens):
    path = request.getfixturevalue(fixture)
    out = tmp_path / "out.onnx"
    result = graphresize.optimize(path, out, ratio=0.0, calib=calib_tokens, tokens=512, seq_len=32, progress=False)
    assert result.params_after == result.params_before
    original, rewritten = ir.load(path), ir.load(out)
    assert sorted(n.op_type for n in rewritten.graph) == sorted(n.op_type for n in original.graph)
    for want, got in zip(run_in_memory(original), run_in_memory(rewritten), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_mlp_resize(fixture, request, tmp_path, calib_tokens):
    path = request.getfixturevalue(fixture)
    out = tmp_path / "out.onnx"
    result = graphresize.optimize(path, out, ratio=0.3, calib=calib_tokens, tokens=2048, seq_len=32, progress=False, target="mlp")
    assert [e.new_width for e in result.plan.changed()] == [88, 88]  # 0.7 * 128 = 89.6, multiple of 8
    assert result.params_before - result.params_after == 2 * (128 - 88) * PER_NEURON[fixture]
    assert [(g.width, g.resizable) for g in graphresize.analyze(out).of_kind("mlp")] == [(88, True), (88, True)]
    assert 0.0 < result.verification.relative_error < 0.3
    ops = [n.op_type for n in ir.load(out).graph]
    assert ops.count("MatMul") == [n.op_type for n in ir.load(path).graph].count("MatMul")  # packed stays packed


def test_packed_gate_up_is_written_back_packed(phi3, tmp_path, calib_tokens):
    out = tmp_path / "out.onnx"
    graphresize.optimize(phi3, out, ratio=0.3, calib=calib_tokens, tokens=512, seq_len=32, progress=False, target="mlp")
    model = ir.load(out)
    splits = [n for n in model.graph if n.op_type == "Split" and n.inputs[0].producer().op_type == "MatMul"]
    assert len(splits) == 2
    for split in splits:
        weight = split.inputs[0].producer().inputs[1]
        assert weight.const_value.shape == (64, 176)
        assert split.inputs[1].const_value.numpy().tolist() == [88, 88]
