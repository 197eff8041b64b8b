"""graphresize's own ORT fusion steps: rotary caches for the broadcast rotary form, packed
parallel MatMuls, and the probe / grouped fall-back that decide what is kept."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from graphresize.passes import fuse_for_ort as fuse_module
from graphresize.passes.fuse_for_ort import FuseForOrtPass, FusionFormPass, _steps
from graphresize.passes.pack_matmuls import PackParallelMatMulsPass
from graphresize.passes.rotary_cache import RotaryCachePass
from models import export_tiny

from graphresize.fusion import fuse_for_ort, fused_op_histogram, probe_outputs, relative_difference
from graphresize.io.modelio import load_model
from graphresize.io.ort_utils import make_feeds, make_session

IDS = np.random.default_rng(7).integers(0, 200, size=(2, 16), dtype=np.int64)


@pytest.fixture(scope="module")
def llama_dynamo_past(tiny_dir):
    """The tiny Llama (4 heads / 2 KV heads, head size 16) through the dynamo exporter with a
    KV cache: position_ids and past/present inputs, the rotary written as a broadcast Mul."""
    pytest.importorskip("transformers")
    return export_tiny("llama", "dynamo", with_past=True, out_dir=tiny_dir)


def _ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def _until(model: ir.Model, last: str) -> ir.Model:
    """``model`` after FusionFormPass and the fusion steps up to ``last``."""
    FusionFormPass()(model)
    for name, step in _steps():
        step(model)
        if name == last:
            return model
    raise AssertionError(last)


def test_rotary_caches_fire_on_the_dynamo_export_with_past(llama_dynamo_past):
    """The dynamo export's rotary (Cast(position_ids)·inv_freq, cos/sin, rotate-half) becomes
    ORT's RotaryEmbedding on 8-row caches per position; a prompt, a left-padded prompt and a
    decode step through the cache match the unfused graph."""
    plain = load_model(llama_dynamo_past)
    assert _ops(plain)["Neg"] == 4 and fused_op_histogram(plain) == {}
    fused, outcome = fuse_for_ort(load_model(llama_dynamo_past), max_positions=64)
    assert outcome.after == {"GroupQueryAttention": 2, "RotaryEmbedding": 4, "SimplifiedLayerNormalization": 1,
                             "SkipSimplifiedLayerNormalization": 4}
    assert outcome.steps["rotary_cache"] == 4 and outcome.skipped == {}
    ops = _ops(fused)
    assert ops["Neg"] == 0 and ops["Cos"] == 0 and ops["Sin"] == 0  # the caches are constants
    cos = fused.graph.initializers["rotary_cos_cache"].const_value.numpy()
    inv_freq = plain.graph.initializers["model.rotary_emb.inv_freq"].const_value.numpy()
    assert cos.shape == (64, 8)
    np.testing.assert_allclose(cos[37], np.cos(np.float32(37) * inv_freq), rtol=0, atol=1e-6)
    want = probe_outputs(make_session(plain), IDS)
    got = probe_outputs(make_session(fused), IDS)
    assert len(want) == 4 * 5  # logits and 4 presents: prompt, padded prompt, decode step, 3-token step
    assert relative_difference(want, got) < 1e-5
    assert np.abs(want[0]).max() > 0.1


def test_rotary_without_a_position_count_computes_its_caches_for_any_position(llama_dynamo_past):
    """Without ``max_positions`` the caches are computed in the graph up to the largest
    position id: a decode step at position 300 matches the unfused graph."""
    plain = load_model(llama_dynamo_past)
    model = _until(load_model(llama_dynamo_past), "cos_sin_cache")
    assert _ops(model)["RotaryEmbedding"] == 4  # onnxscript's intermediate op, on cos/sin tensors
    fuse = RotaryCachePass()
    assert fuse(model).modified and fuse.count == 4
    rotary = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert {n.domain for n in rotary} == {"com.microsoft"}
    assert len({n.inputs[2] for n in rotary}) == 1 and "rotary_cos_cache" not in model.graph.initializers
    sessions = [make_session(m) for m in (plain, model)]
    feeds = make_feeds(sessions[0], IDS[:, :1], past_len=300)
    rng = np.random.default_rng(1)
    for name, value in feeds.items():
        if name.startswith("past_key_values"):
            feeds[name] = rng.standard_normal(value.shape).astype(value.dtype)
    want, got = (s.run(None, feeds) for s in sessions)
    assert relative_difference(want, got) < 1e-5 and np.abs(want[0]).max() > 0.1


def _parallel_graph() -> ir.Model:
    """x[2, 5, 8] read by three MatMuls with private weights (widths 4, 6, 4), one more whose
    weight a second MatMul also reads (tied: not packed), and one of a different row count."""
    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 5, 8]))
    y = ir.val("y", ir.DataType.FLOAT, ir.Shape([2, 5, 8]))
    inits, nodes, outs = [], [], []

    def weight(name, rows, cols):
        v = ir.val(name, ir.DataType.FLOAT, ir.Shape([rows, cols]),
                   const_value=ir.tensor(rng.standard_normal((rows, cols)).astype(np.float32), name=name))
        inits.append(v)
        return v

    tied = weight("tied", 8, 3)
    for i, (a, w) in enumerate([(x, weight("wq", 8, 4)), (x, weight("wk", 8, 6)), (x, weight("wv", 8, 4)),
                                (x, tied), (y, tied)]):
        nodes.append(ir.node("MatMul", [a, w], name=f"mm{i}"))
        nodes[-1].outputs[0].name = f"mm{i}_out"
        nodes.append(ir.node("Relu", [nodes[-1].outputs[0]], name=f"relu{i}"))
        nodes[-1].outputs[0].name = f"out{i}"
        outs.append(nodes[-1].outputs[0])
    graph = ir.Graph([x, y], outs, nodes=nodes, initializers=inits, opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def test_parallel_matmuls_pack_into_one_with_a_split():
    model = _parallel_graph()
    feeds = {n: np.random.default_rng(3).standard_normal((2, 5, 8)).astype(np.float32) for n in ("x", "y")}
    want = make_session(model).run(None, feeds)
    pack = PackParallelMatMulsPass()
    assert pack(model).modified and pack.count == 2
    assert _ops(model) == {"MatMul": 3, "Split": 1, "Relu": 5}  # the tied weight's two MatMuls stay
    split = next(n for n in model.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [4, 6, 4]
    assert [o.name for o in split.outputs] == ["mm0_out", "mm1_out", "mm2_out"]
    assert [o.name for o in model.graph.outputs] == [f"out{i}" for i in range(5)]
    packed = split.inputs[0].producer().inputs[1]
    assert packed.shape == ir.Shape([8, 14]) and set(model.graph.initializers) == {"tied", packed.name, split.inputs[1].name}
    got = make_session(model).run(None, feeds)
    assert relative_difference(want, got) < 1e-6


def test_packed_projections_in_the_fused_llama(llama_dynamo):
    """With ``pack`` (the CUDA form) per layer Q/K/V (3 MatMuls) and gate/up (2) read one normed
    input: 3 MatMuls fewer per layer, besides the 2 attention products per layer
    MultiHeadAttention takes in; the outputs stay. Without it (ORT CPU, the default) no Split."""
    plain = load_model(llama_dynamo)
    packer = FuseForOrtPass(pack=True)
    fused = packer(load_model(llama_dynamo)).model
    assert packer.counts["pack_matmuls"] == 6 and _ops(fused)["Split"] == 4
    assert _ops(plain)["MatMul"] == 19 and _ops(fused)["MatMul"] == 19 - 6 - 4
    assert relative_difference(probe_outputs(make_session(plain), IDS), probe_outputs(make_session(fused), IDS)) < 1e-5
    cpu, outcome = fuse_for_ort(load_model(llama_dynamo))
    assert "pack_matmuls" not in outcome.steps and "Split" not in _ops(cpu) and _ops(cpu)["MatMul"] == 19 - 4


def test_a_gqa_exact_only_without_padding_is_refused_and_the_exact_step_fuses_instead(llama_dynamo_past, monkeypatch):
    """onnxscript's GroupQueryAttention fuses this graph once the rotary caches fire, but reads
    the sequence lengths off the mask as if padding were on the right: the probe's left-padded
    batch refuses it, the grouped fall-back keeps the MultiHeadAttention path, and the
    ``gqa_exact`` step (mask as attention bias) turns that into GroupQueryAttention."""
    from onnxscript.rewriter.ort_fusions import _core

    original = _steps

    def with_gqa(max_positions=None, pack=False):
        steps = list(original(max_positions, pack))
        at = [name for name, _ in steps].index("sdpa") + 1
        steps.insert(at, ("gqa", lambda m: int(_core.fuse_gqa(m) or 0)))
        return tuple(steps)

    monkeypatch.setattr(fuse_module, "_steps", with_gqa)
    fused, outcome = fuse_for_ort(load_model(llama_dynamo_past), max_positions=64)
    assert outcome.skipped["gqa"].startswith("outputs differ by")
    assert outcome.skipped["all steps at once"] == outcome.skipped["gqa"]
    assert outcome.after["GroupQueryAttention"] == 2 and outcome.after["RotaryEmbedding"] == 4
    assert outcome.steps["gqa_exact"] == 2 and "gqa" not in outcome.steps and "MultiHeadAttention" not in outcome.after
    assert outcome.max_difference < 1e-5


def test_rotary_fuses_on_the_torchscript_export_without_a_cache(llama_legacy):
    """The TorchScript exporter without position_ids writes positions as
    ``Range(0, Shape(embeddings)[1])``, a length ONNX shape inference cannot name: the Range's
    limit is read back to the sequence dimension and the rotary caches fire, exact on the probes."""
    fused, outcome = fuse_for_ort(load_model(llama_legacy))
    assert outcome.steps["rotary_cache"] == 4 and outcome.after["RotaryEmbedding"] == 4 and _ops(fused)["Neg"] == 0
    assert outcome.after["SkipSimplifiedLayerNormalization"] == 4
    assert outcome.skipped == {} and outcome.max_difference < 1e-5
    got, want = (probe_outputs(make_session(m), IDS) for m in (fused, load_model(llama_legacy)))
    assert relative_difference(want, got) < 1e-5 and np.abs(want[0]).max() > 0.1
