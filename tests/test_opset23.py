"""A real opset-23 export: the dynamo exporter writes a tiny Llama (4 query heads, 2 KV heads,
hd 16, SDPA attention) with ONNX ``RotaryEmbedding`` on q and k (3-D, ``num_heads`` set), the
repeat-KV in the graph and ONNX ``Attention`` on 4-D ``[B, H, S, hd]`` inputs. Heads and MLP
widths are resized through those ops and checked in ONNX Runtime against the original."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphresize
from graphresize.analysis.attention.find import find_attention
from graphresize.io.ort_utils import make_feeds, make_session
from graphresize.pipeline import load_prepared
from tests.models import export_tiny, optimize_tiny, zero_heads


@pytest.fixture(scope="module")
def llama23(tmp_path_factory):
    """The tiny Llama with a KV cache (past_key_values.* in, present.* out), opset 23."""
    pytest.importorskip("transformers")
    return export_tiny("llama", "dynamo", opset=23, with_past=True, attn_implementation="sdpa",
                       out_dir=tmp_path_factory.mktemp("opset23"))  # fmt: skip


def _run(path, ids):
    session = make_session(ir.load(path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, make_feeds(session, ids)), strict=True))


def _ids(seq=12):
    return np.random.default_rng(3).integers(0, 200, size=(2, seq))


def _rotary_heads(path):
    return [next(a.i for a in n.attribute if a.name == "num_heads") for n in onnx.load(path).graph.node if n.op_type == "RotaryEmbedding"]


def test_export_holds_onnx_attention_and_rotary_and_is_recognised(llama23):
    model = onnx.load(llama23)
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "RotaryEmbedding"} <= ops and model.opset_import[0].version == 23
    blocks = find_attention(load_prepared(llama23))
    assert [(b.op, b.reason, b.num_heads, b.num_kv_heads, b.head_dim, b.group_fixed) for b in blocks] == [
        ("ai.onnx::Attention", None, 4, 2, 16, None)
    ] * 2
    assert [len(b.attr_edits) for b in blocks] == [2, 2]  # num_heads of the q and k RotaryEmbedding
    assert {c.name for c in blocks[0].cache} == {f"{p}.0.{k}" for p in ("past_key_values", "present") for k in ("key", "value")}
    assert _rotary_heads(llama23) == [4, 2, 4, 2]


def test_dead_kv_group_removed_exactly_and_decode_matches(llama23, tmp_path, calib_tokens):
    src = zero_heads(llama23, tmp_path / "dead.onnx", (2, 3))  # KV head 1 with its query heads
    result = optimize_tiny(src, tmp_path / "out.onnx", calib_tokens, head_ratio=0.5)
    assert [r["kept"] for r in result.heads.layers()] == [[0, 1]] * 2
    assert _rotary_heads(tmp_path / "out.onnx") == [2, 1, 2, 1]
    ids = _ids()
    before, after = _run(src, ids), _run(tmp_path / "out.onnx", ids)
    np.testing.assert_allclose(after["logits"], before["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after["present.1.key"], before["present.1.key"][:, :1], rtol=1e-5, atol=1e-5)
    session = make_session(ir.load(tmp_path / "out.onnx"))
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, make_feeds(session, ids[:, :8])), strict=True))
    logits = []
    for t in range(8, ids.shape[1]):  # one token at a time through the cache
        feeds = {"input_ids": ids[:, t : t + 1], "attention_mask": np.ones((2, t + 1), dtype=np.int64),
                 "position_ids": np.full((2, 1), t, dtype=np.int64)}  # fmt: skip
        feeds.update({n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")})
        out = dict(zip(names, session.run(names, feeds), strict=True))
        logits.append(out["logits"])
    np.testing.assert_allclose(np.concatenate(logits, axis=1), after["logits"][:, 8:], rtol=1e-4, atol=1e-4)


def test_mlp_and_heads_resize_together(llama23, tmp_path, calib_tokens):
    result = optimize_tiny(llama23, tmp_path / "out.onnx", calib_tokens, 0.3, head_ratio=0.5, target="mlp")
    assert result.params_after < result.params_before
    assert 0.0 < result.verification.relative_error < 0.5
    assert [(r["new_heads"], r["new_kv_heads"]) for r in result.heads.layers()] == [(2, 1)] * 2
    widths = [g.width for g in graphresize.analyze(llama23).of_kind("mlp")]
    assert [g.width for g in graphresize.analyze(tmp_path / "out.onnx").of_kind("mlp")] == [int(w * 0.7) // 8 * 8 for w in widths]
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)
