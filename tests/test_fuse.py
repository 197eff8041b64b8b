"""``optimize --fuse``: ONNX Runtime's fused ops in the output, checked against the unfused graph."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from graphresize.passes.fuse_for_ort import FuseForOrtPass, FusionFormPass
from models import make_feeds, run_ort

from graphresize.cli.main import main
from graphresize.fusion import fuse_for_ort, fused_op_histogram, relative_difference
from graphresize.io.modelio import load_model
from graphresize.verify.evaluate import weight_flops_per_token


def _optimize(src, out, ratio, calib, *extra):
    fuse = [] if "--no-fuse" in extra else ["--fuse"]
    args = ["optimize", str(src), "-o", str(out), "--ratio", str(ratio), "-q", *fuse, *extra]
    if ratio:
        args += ["--calib", str(calib), "--tokens", "2048", "--seq-len", "32"]
    assert main(args) == 0
    return out


def _ops(path) -> Counter:
    return Counter(n.op_type for n in ir.load(path).graph)


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_fused_output_equals_unfused_output(llama_dynamo, tmp_path, calib_tokens, ratio):
    fused = _optimize(llama_dynamo, tmp_path / "fused.onnx", ratio, calib_tokens, "--target", "mlp")
    plain = _optimize(llama_dynamo, tmp_path / "plain.onnx", ratio, calib_tokens, "--target", "mlp", "--no-fuse")
    assert _ops(fused)["MultiHeadAttention"] == 2 and _ops(plain)["MultiHeadAttention"] == 0
    feeds = make_feeds(llama_dynamo, batch=2, seq=12, seed=3)
    got, want = run_ort(fused, feeds)["logits"], run_ort(plain, feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(want).max() > 0.1  # not a vacuous comparison


def test_histogram_counts_the_fusions_of_a_tiny_llama(llama_dynamo, tmp_path, calib_tokens):
    out = _optimize(llama_dynamo, tmp_path / "fused.onnx", 0.0, calib_tokens)
    assert fused_op_histogram(ir.load(llama_dynamo)) == {}
    # 2 layers: the first input norm alone, 3 more norms and the final norm each after a residual Add;
    # query and key rotary per layer
    want = {"MultiHeadAttention": 2, "RotaryEmbedding": 4, "SimplifiedLayerNormalization": 1,
            "SkipSimplifiedLayerNormalization": 4}
    assert fused_op_histogram(ir.load(out)) == want
    report = json.loads(out.with_name("fused.report.json").read_text())
    assert report["fusion"]["before"] == {} and report["fusion"]["after"] == want
    assert report["fusion"]["steps"]["rms_normalization"] == 5 and report["fusion"]["skipped"] == {}
    assert report["fusion"]["steps"]["rotary_cache"] == 4 and "pack_matmuls" not in report["fusion"]["steps"]  # CUDA only
    assert report["fusion"]["max_relative_difference"] < 1e-4
    # fusion moves no weight: the same weight FLOPs (the tied LM head becomes a FusedMatMul)
    assert weight_flops_per_token(load_model(out)) == weight_flops_per_token(load_model(llama_dynamo))


def test_no_fuse_leaves_the_graph_as_before(llama_dynamo, tmp_path, calib_tokens):
    out = _optimize(llama_dynamo, tmp_path / "plain.onnx", 0.0, calib_tokens, "--no-fuse")
    assert _ops(out) == _ops(llama_dynamo)
    assert json.loads(out.with_name("plain.report.json").read_text())["fusion"] is None
    feeds = make_feeds(llama_dynamo, seed=4)
    np.testing.assert_array_equal(run_ort(out, feeds)["logits"], run_ort(llama_dynamo, feeds)["logits"])


def test_optimum_layout_fuses_its_norms_and_keeps_the_kv_cache(llama_optimum, tmp_path, calib_tokens):
    """TorchScript writes RMS norms as Div(1, sqrt) and ReduceMean without noop_with_empty_axes:
    FusionFormPass makes them match; past/present keep their names, and a decode step through
    the cache gives the unfused graph's logits and cache."""
    out = _optimize(llama_optimum, tmp_path / "fused.onnx", 0.3, calib_tokens, "--target", "mlp")
    plain = _optimize(llama_optimum, tmp_path / "plain.onnx", 0.3, calib_tokens, "--target", "mlp", "--no-fuse")
    hist = fused_op_histogram(ir.load(out))
    assert hist["SimplifiedLayerNormalization"] == 1 and hist["SkipSimplifiedLayerNormalization"] == 4
    model, original = ir.load(out), ir.load(llama_optimum)
    assert [v.name for v in model.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]
    prompt = make_feeds(llama_optimum, batch=2, seq=6, seed=5)
    first = {p: run_ort(p, prompt) for p in (out, plain)}
    step = make_feeds(llama_optimum, batch=2, seq=1, seed=6, past=6)
    for name in [n for n in step if n.startswith("past_key_values")]:
        step[name] = first[plain][name.replace("past_key_values", "present")]
    got, want = run_ort(out, step), run_ort(plain, step)
    assert set(got) == set(want) and "present.1.value" in got
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4)
        np.testing.assert_allclose(first[out][name], first[plain][name], rtol=0, atol=1e-4)


def test_genai_layout_is_left_as_built(llama_genai, tmp_path):
    """onnxruntime-genai's builder already emits the fused ops: nothing more fires."""
    model = load_model(llama_genai)
    before = fused_op_histogram(model)
    fused, outcome = fuse_for_ort(model)
    assert before["GroupQueryAttention"] == 2 and outcome.after == before and outcome.skipped == {}
    assert [v.name for v in fused.graph.inputs] == [v.name for v in ir.load(llama_genai).graph.inputs]


def test_a_refused_step_is_skipped_and_named(llama_dynamo):
    """accept() refuses any graph with MultiHeadAttention: the norms and the rotary still fuse;
    the attention steps (``sdpa`` and the steps after it until its intermediate op is gone) are
    left out, named by their first step with the reason."""
    model = load_model(llama_dynamo)
    fuse = FuseForOrtPass(lambda m: "no MHA here" if "MultiHeadAttention" in fused_op_histogram(m) else None)
    fuse(model)
    hist = fused_op_histogram(model)
    assert "MultiHeadAttention" not in hist and hist["SkipSimplifiedLayerNormalization"] == 4
    assert fuse.skipped == {"all steps at once": "no MHA here", "sdpa": "no MHA here"}
    assert hist["RotaryEmbedding"] == 4 and "sdpa" not in fuse.counts
    assert fuse.counts["rms_normalization"] == 5


def test_reciprocal_form_is_exact():
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([3]))
    one = ir.val("one", ir.DataType.FLOAT, ir.Shape([]), const_value=ir.tensor(np.array(1.0, dtype=np.float32)))
    div = ir.node("Div", [one, x], name="div")
    out = ir.node("Identity", [div.outputs[0]], name="id")
    out.outputs[0].name = "y"
    graph = ir.Graph([x], [out.outputs[0]], nodes=[div, out], initializers=[one], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    assert FusionFormPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Reciprocal", "Identity"]
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    values = np.array([3.0, -7.0, 1e-3], dtype=np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": values})[0], np.float32(1.0) / values)


def test_relative_difference_scales_by_the_output():
    assert relative_difference([np.array([10.0, 0.0])], [np.array([10.0, 0.5])]) == pytest.approx(0.05)
    assert relative_difference([np.zeros(2)], [np.zeros(3)]) == float("inf")


@pytest.mark.parametrize(("drift", "kept"), [(3e-4, True), (1e-2, False)])
def test_fp32_sized_drift_is_accepted_and_a_larger_one_refused(llama_dynamo, monkeypatch, drift, kept):
    """``FUSE_TOLERANCE`` (1e-3 of the largest output) takes the drift a resized model can add
    to a correct fusion's reordered fp32 arithmetic, and refuses a step that moves the logits
    by 0.6%: a stand-in step scales the LM head by ``1 + drift``."""
    import graphresize.passes.fuse_for_ort as fuse_module

    def scale_head(model):
        head = next(n for n in model.graph if n.outputs[0].is_graph_output() and n.op_type == "MatMul")
        weight = head.inputs[1]
        weight.const_value = ir.tensor(np.asarray(weight.const_value.numpy()) * np.float32(1 + drift), name=weight.name)
        return 1

    monkeypatch.setattr(fuse_module, "_steps", lambda *a, **k: (("drift", scale_head),))
    logits = run_ort(llama_dynamo, make_feeds(llama_dynamo, batch=2, seq=12, seed=3))["logits"]
    # relative difference = drift x max|logits|: 1.5e-4-3e-4 (refused at the old 1e-4) and >= 5e-3
    assert 0.5 <= np.abs(logits).max() <= 1.0
    _, outcome = fuse_for_ort(load_model(llama_dynamo))
    assert ("drift" in outcome.skipped) is not kept
    assert outcome.steps.get("drift", 0) == (1 if kept else 0)
