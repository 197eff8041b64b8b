"""onnxruntime-genai's model builder layout: packed qkv_proj into GroupQueryAttention with a KV
cache, SkipSimplifiedLayerNormalization junctions, genai_config.json beside the graph."""

import json
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

import graphresize
from graphresize.cli.main import main
from tests.models import run_in_memory


def test_builder_layout_is_what_the_fixture_claims(llama_genai):
    ops = Counter(f"{n.domain}::{n.op_type}" for n in ir.load(llama_genai).graph)
    assert ops["com.microsoft::GroupQueryAttention"] == 2
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 4
    assert (llama_genai.parent / "genai_config.json").is_file()


def test_mlp_groups_are_found(llama_genai):
    groups = graphresize.analyze(llama_genai)
    assert [(g.layer, g.width, g.resizable) for g in groups.of_kind("mlp")] == [(0, 128, True), (1, 128, True)]
    assert all(not g.resizable for g in groups.of_kind("heads"))  # inside GroupQueryAttention


def _optimize(src, out_dir, ratio, calib, *extra):
    out = out_dir / "model.onnx"
    code = main(["optimize", str(src), "-o", str(out), "--ratio", str(ratio), "--calib", str(calib),
                 "--tokens", "2048", "--seq-len", "32", "--target", "mlp", "--allocation", "uniform", "-q", *extra])
    assert code == 0
    return out


def _generate(og, folder):
    """Greedy generation to 12 tokens from a 4-token prompt in onnxruntime-genai's runtime."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([[5, 6, 7, 8]], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return generator.get_sequence(0)


def test_ratio_zero_is_an_identity(llama_genai, tmp_path, calib_tokens):
    out = _optimize(llama_genai, tmp_path, 0.0, calib_tokens)
    for want, got in zip(run_in_memory(ir.load(llama_genai)), run_in_memory(ir.load(out)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mlp_resize_serves_in_onnxruntime_genai(llama_genai, tmp_path, calib_tokens):
    og = pytest.importorskip("onnxruntime_genai")
    out = _optimize(llama_genai, tmp_path, 0.3, calib_tokens)
    assert [g.width for g in graphresize.analyze(out).of_kind("mlp")] == [88, 88]
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    assert (tmp_path / "tokenizer.json").is_file()
    report = json.loads((tmp_path / "model.report.json").read_text())
    assert report["parameters"]["before"] - report["parameters"]["after"] == 2 * 40 * 3 * 64
    # the output folder loads and generates in onnxruntime-genai's own runtime
    tokens = _generate(og, tmp_path)
    assert len(tokens) == 12 and all(0 <= t < 256 for t in tokens)


def test_residual_narrows_through_skip_simplified_norms(llama_genai, tmp_path, calib_tokens):
    """The stream is read through SkipSimplifiedLayerNormalization junctions (their sum output
    carries it on): routed like decomposed RMS norms; genai_config.json, which records the
    hidden size, is then not written beside the output."""
    (group,) = graphresize.analyze(llama_genai).of_kind("residual")
    assert group.resizable
    out = tmp_path / "model.onnx"
    code = main(["optimize", str(llama_genai), "-o", str(out), "--ratio", "0.25", "--calib", str(calib_tokens),
                 "--tokens", "2048", "--seq-len", "32", "--target", "residual", "--multiple-of", "1", "-q"])
    assert code == 0
    (group,) = graphresize.analyze(out).of_kind("residual")
    assert group.width == 48
    model = ir.load(out)
    assert Counter(n.op_type for n in model.graph)["SkipSimplifiedLayerNormalization"] == 4  # still fused
    assert all(np.isfinite(o).all() for o in run_in_memory(model))
    assert not (tmp_path / "genai_config.json").exists()


def test_heads_removed_in_group_query_attention_serve_in_onnxruntime_genai(llama_genai, tmp_path, calib_tokens):
    """Heads of the builder's packed-QKV GroupQueryAttention: 4/2 → 2/1 heads, the op's
    attributes and the KV cache follow, genai_config.json gets the new counts, and the output
    folder still generates in onnxruntime-genai."""
    og = pytest.importorskip("onnxruntime_genai")
    out = _optimize(llama_genai, tmp_path, 0, calib_tokens, "--ratio-heads", "0.5")
    gqa = [n for n in ir.load(out).graph if n.op_type == "GroupQueryAttention"]
    assert [(n.attributes["num_heads"].value, n.attributes["kv_num_heads"].value) for n in gqa] == [(2, 1), (2, 1)]
    decoder = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (2, 1)
    assert len(_generate(og, tmp_path)) == 12
