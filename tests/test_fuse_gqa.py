"""``optimize --fuse`` on a with-past dynamo export: grouped-query attention over the KV cache
becomes ONNX Runtime's GroupQueryAttention, with the unfused graph's logits and caches for
prompts and decode steps, padded or not."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphresize.passes import fuse_gqa as fuse_gqa_module
from graphresize.passes.fuse_gqa import FuseGroupQueryAttentionPass, fuse_gqa, match_site
from models import export_tiny, make_feeds, run_ort

from graphresize.cli.main import main
from graphresize.fusion import fuse_for_ort, fused_op_histogram
from graphresize.io.modelio import load_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def llama_past(tiny_dir):
    """The tiny Llama (4 query heads over 2 KV heads, head size 16) through the dynamo
    exporter with its KV cache (``past_key_values.*`` in, ``present.*`` out)."""
    pytest.importorskip("transformers")
    return export_tiny("llama", "dynamo", with_past=True, out_dir=tiny_dir, name="llama_dynamo_past_gqa")


@pytest.fixture(scope="module")
def fused_past(llama_past, tmp_path_factory):
    model, outcome = fuse_for_ort(load_model(llama_past))
    path = tmp_path_factory.mktemp("gqa") / "fused.onnx"
    ir.save(model, path)
    return path, outcome


def _ops(path) -> Counter:
    return Counter(n.op_type for n in ir.load(path).graph)


def _padded(feeds: dict, zeros) -> dict:
    for row, col in zeros:
        feeds["attention_mask"][row, col] = 0
    return feeds


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want) and "present.1.value" in want
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=name)
    assert np.abs(want["logits"]).max() > 0.1  # not a vacuous comparison


def test_gqa_replaces_attention_and_keeps_the_cache_names(llama_past, fused_past):
    path, outcome = fused_past
    assert outcome.after["GroupQueryAttention"] == 2 and "MultiHeadAttention" not in outcome.after
    assert outcome.steps["gqa_exact"] == 2 and "gqa_exact" not in outcome.skipped
    original, fused = ir.load(llama_past), ir.load(path)
    assert [v.name for v in fused.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in fused.graph.outputs] == [v.name for v in original.graph.outputs]
    # the caches come out of the attention node itself: no Concat / repeat_kv Expand is left on them
    producers = {v.name: v.producer().op_type for v in fused.graph.outputs}
    assert {producers[f"present.{i}.{kv}"] for i in (0, 1) for kv in ("key", "value")} == {"GroupQueryAttention"}
    gqa = [n for n in fused.graph if n.op_type == "GroupQueryAttention"]
    assert [(n.attributes.get_int("num_heads"), n.attributes.get_int("kv_num_heads"), n.attributes.get_int("causal")) for n in gqa] == [(4, 2, 0)] * 2
    assert [n.inputs[3].name for n in gqa] == ["past_key_values.0.key", "past_key_values.1.key"]
    # the exporter's mask (causal and padding) is the attention bias; one seqlens_k for both layers
    assert gqa[0].inputs[10] is gqa[1].inputs[10] and gqa[0].inputs[5] is gqa[1].inputs[5]
    readers = {use.node.op_type for v in fused.graph.inputs if v.name.startswith("past_key_values") for use in v.uses()}
    assert readers == {"GroupQueryAttention", "Shape"}  # Shape: the mask reads the past length
    # per layer the two repeat_kv Expands go; one Expand (seqlens_k over the batch) comes
    ops, plain = _ops(path), _ops(llama_past)
    assert ops["Expand"] == plain["Expand"] - 2 * 2 + 1 and ops["Softmax"] == 0
    # query, key and value reach the attention in the 3-D [B, S, heads*h] form their projections
    # give: the key is rotated in that form too, so no Transpose is left in the graph
    assert [[_op(n.inputs[i]) for i in (0, 1, 2)] for n in gqa] == [["RotaryEmbedding", "RotaryEmbedding", "MatMul"]] * 2
    assert all(len(n.inputs[1].shape) == 3 for n in gqa) and ops["Transpose"] == 0


def _op(value: ir.Value) -> str:
    return value.producer().op_type


@pytest.mark.parametrize("zeros", [(), ((0, 0), (0, 1), (1, 5))], ids=["unpadded", "left-and-right-padded"])
def test_prompt_then_decode_step_equal_the_unfused_graph(llama_past, fused_past, zeros):
    """A prompt, then a decode step on the caches it returned: logits and every present cache
    as the unfused export, also with a left-padded and a right-padded row."""
    path, _ = fused_past
    prompt = _padded(make_feeds(llama_past, batch=2, seq=6, seed=5), zeros)
    first = {p: run_ort(p, prompt) for p in (path, llama_past)}
    _assert_same(first[path], first[llama_past])
    step = _padded(make_feeds(llama_past, batch=2, seq=1, seed=6, past=6), zeros)
    for name in [n for n in step if n.startswith("past_key_values")]:
        step[name] = first[llama_past][name.replace("past_key_values", "present")]
    _assert_same(run_ort(path, step), run_ort(llama_past, step))


def test_multi_token_step_on_a_past_at_batch_1(llama_past, fused_past):
    path, _ = fused_past
    feeds = _padded(make_feeds(llama_past, batch=1, seq=3, seed=7, past=5), [(0, 1)])
    _assert_same(run_ort(path, feeds), run_ort(llama_past, feeds))


def test_multi_token_step_on_a_past_at_batch_2_is_refused_not_wrong(llama_past, fused_past):
    """The one input the rewrite does not take (ONNX Runtime 1.32's CPU kernel): several new
    tokens on a non-empty past at batch > 1 is an error, not a different answer."""
    path, _ = fused_past
    feeds = make_feeds(llama_past, batch=2, seq=3, seed=8, past=4)
    assert run_ort(llama_past, feeds)["logits"].shape == (2, 3, 256)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="batch_size must be 1"):
        run_ort(path, feeds)


def test_causal_kernel_mask_would_differ_and_is_refused(llama_past, monkeypatch):
    """GroupQueryAttention with causal=1 treats a fully masked (left-padded) row differently
    from the exporter's mask: the fusion's probes see it and the step is left out, the other
    fusions kept."""

    class CausalPass(FuseGroupQueryAttentionPass):
        def call(self, model):
            result = super().call(model)
            for node in model.graph:
                if node.op_type == "GroupQueryAttention":
                    node.attributes["causal"] = ir.AttrInt64("causal", 1)
            return result

    monkeypatch.setattr(fuse_gqa_module, "FuseGroupQueryAttentionPass", CausalPass)
    model, outcome = fuse_for_ort(load_model(llama_past))
    assert "gqa_exact" in outcome.skipped and "outputs differ" in outcome.skipped["gqa_exact"]
    assert "GroupQueryAttention" not in outcome.after and outcome.after["MultiHeadAttention"] == 2
    assert outcome.after["RotaryEmbedding"] == 4


def test_attention_without_a_cache_is_not_a_site(llama_dynamo):
    """Without past inputs the repeated key is not a concatenated cache: MultiHeadAttention stays."""
    model, outcome = fuse_for_ort(load_model(llama_dynamo))
    assert outcome.after["MultiHeadAttention"] == 2 and "GroupQueryAttention" not in outcome.after
    reasons = {match_site(n) for n in model.graph if n.op_type == "MultiHeadAttention"}
    assert reasons == {"key/value are not a repeated concatenated cache"}


def test_resized_graph_keeps_gqa(llama_past, tmp_path, calib_tokens):
    """optimize --ratio 0.3 --target mlp --fuse: the MLP-resized graph still fuses its attention,
    and a decode step gives the unfused resized graph's outputs."""
    outs = {}
    for fuse in ("--fuse", "--no-fuse"):
        outs[fuse] = tmp_path / f"{fuse[2:]}.onnx"
        args = ["optimize", str(llama_past), "-o", str(outs[fuse]), "--ratio", "0.3", "-q", fuse, "--target", "mlp",
                "--calib", str(calib_tokens), "--tokens", "2048", "--seq-len", "32"]
        assert main(args) == 0
    assert fused_op_histogram(ir.load(outs["--fuse"]))["GroupQueryAttention"] == 2
    feeds = _padded(make_feeds(llama_past, batch=2, seq=1, seed=9, past=4), [(0, 0)])
    _assert_same(run_ort(outs["--fuse"], feeds), run_ort(outs["--no-fuse"], feeds))


def _mha_form(path):
    """The graph as the fusion steps before ``gqa_exact`` leave it, onnxscript's own GQA
    fusions left out (MultiHeadAttention)."""
    from graphresize.passes.fuse_for_ort import FusionFormPass, _steps

    model = load_model(path)
    FusionFormPass()(model)
    for name, step in _steps():
        if name == "gqa_exact":
            break
        if name not in ("gqa", "packed_qkv_for_gqa"):
            step(model)
    return model


def test_bnsh_key_and_value_form_is_a_site_too(llama_past, tmp_path):
    """MultiHeadAttention also takes the repeated cache as a 4-D BNSH key/value (onnxscript's
    mha fusions write it so): the same rewrite, the same outputs."""
    model = _mha_form(llama_past)
    for node in [n for n in model.graph if n.op_type == "MultiHeadAttention"]:
        for i in (1, 2):  # key = Reshape(Transpose(bnsh)) -> bnsh, where the steps wrote the BSH form
            flat = node.inputs[i].producer()
            if flat.op_type == "Reshape" and flat.inputs[0].producer().op_type == "Transpose":
                node.replace_input_with(i, flat.inputs[0].producer().inputs[0])
    assert all(len(n.inputs[1].shape) == 4 for n in model.graph if n.op_type == "MultiHeadAttention")
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.save(model, tmp_path / "bnsh.onnx")
    assert fuse_gqa(model) == 2
    ir.save(model, tmp_path / "gqa.onnx")
    feeds = _padded(make_feeds(llama_past, batch=2, seq=1, seed=10, past=5), [(0, 0), (1, 2)])
    _assert_same(run_ort(tmp_path / "gqa.onnx", feeds), run_ort(tmp_path / "bnsh.onnx", feeds))
    _assert_same(run_ort(tmp_path / "bnsh.onnx", feeds), run_ort(llama_past, feeds))


def test_graph_with_heads_removed_keeps_rotary_and_gqa(llama_past, tmp_path, calib_tokens):
    """optimize --ratio-heads 0.5 --head-method query --fuse: one query head of each KV group
    goes, the ``view(B, S, -1, h)`` head count is filled back in (ReshapeDimsPass), so rotary
    and attention still fuse with the new counts, and a decode step gives the unfused graph's
    outputs."""
    outs = {}
    for fuse in ("--fuse", "--no-fuse"):
        outs[fuse] = tmp_path / f"{fuse[2:]}.onnx"
        args = ["optimize", str(llama_past), "-o", str(outs[fuse]), "--ratio", "0", "-q", fuse,
                "--ratio-heads", "0.5", "--head-method", "query",
                "--calib", str(calib_tokens), "--tokens", "2048", "--seq-len", "32"]
        assert main(args) == 0
    fused = ir.load(outs["--fuse"])
    histogram = fused_op_histogram(fused)
    assert histogram["GroupQueryAttention"] == 2 and histogram["RotaryEmbedding"] == 4
    heads = {(n.attributes.get_int("num_heads"), n.attributes.get_int("kv_num_heads"))
             for n in fused.graph if n.op_type == "GroupQueryAttention"}
    assert heads == {(2, 2)}
    feeds = _padded(make_feeds(llama_past, batch=2, seq=1, seed=9, past=4), [(0, 0)])
    _assert_same(run_ort(outs["--fuse"], feeds), run_ort(outs["--no-fuse"], feeds))


def test_torchscript_optimum_export_fuses_rotary_and_gqa(llama_optimum, tmp_path):
    """The TorchScript exporter (optimum's layout) computes rotate_half's split point from
    shapes and writes repeat_kv's expand target through ``Where``: with the static head size
    folded (StaticShapeDimsPass) and the repeat checked through its merged shape, rotary and
    grouped-query attention fuse as on the dynamo export, with the unfused graph's logits and
    caches on a left-padded decode step."""
    fused, outcome = fuse_for_ort(load_model(llama_optimum))
    assert outcome.after["GroupQueryAttention"] == 2 and outcome.after["RotaryEmbedding"] == 4
    assert outcome.after["SkipSimplifiedLayerNormalization"] == 4 and outcome.skipped == {}
    path = tmp_path / "fused.onnx"
    ir.save(fused, path)
    feeds = _padded(make_feeds(llama_optimum, batch=2, seq=1, seed=9, past=4), [(0, 0)])
    got, want = run_ort(path, feeds), run_ort(llama_optimum, feeds)
    assert set(got) == set(want) and any(k.startswith("present") for k in want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=name)
