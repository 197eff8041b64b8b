"""Per-head interleaved packed QKV (GPT-NeoX's ``query_key_value``: the projection writes
``[H, 3·hd]`` blocks, each head's ``[q | k | v]`` side by side, cut by a Split of the head
dimension after the head split): heads are recognised with stride ``3·hd`` and removed whole,
q, k and v features of a kept head staying together in the packed weight and bias."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphresize.analysis.attention.find import find_attention
from graphresize.io.ort_utils import make_feeds, make_session
from graphresize.pipeline import load_prepared
from tests.models import export_tiny, optimize_tiny, zero_heads


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """GPTNeoXForCausalLM (hidden 64, 4 heads of 16, partial rotary 0.5, MLP 128): dynamo."""
    pytest.importorskip("transformers")
    return export_tiny("gpt_neox", "dynamo", out_dir=tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="module")
def neox23(tmp_path_factory):
    """The same at opset 23 with SDPA and a KV cache: ONNX RotaryEmbedding (4-D, on the rotated
    half of each head only) and 4-D ONNX Attention, its output restated by a -1 view."""
    pytest.importorskip("transformers")
    return export_tiny("gpt_neox", "dynamo", opset=23, attn_implementation="sdpa", with_past=True,
                       out_dir=tmp_path_factory.mktemp("neox23"))  # fmt: skip


def _logits(path, ids):
    session = make_session(ir.load(path))
    return session.run(["logits"], make_feeds(session, ids))[0]


def test_interleaved_qkv_is_recognised_with_a_stride(neox):
    blocks = find_attention(load_prepared(neox))
    assert [(b.reason, b.num_heads, b.num_kv_heads, b.head_dim) for b in blocks] == [(None, 4, 4, 16)] * 2
    for block in blocks:
        assert [(p.role, p.offset, p.stride, p.bias_offset) for p in block.projections] == [
            ("q", 0, 48, 0), ("k", 16, 48, 16), ("v", 32, 48, 32)
        ]  # fmt: skip
        assert len({p.weight for p in block.projections}) == 1


def test_dead_heads_leave_exactly_with_their_packed_columns(neox, tmp_path, calib_tokens):
    src = zero_heads(neox, tmp_path / "dead.onnx", (1, 2))
    result = optimize_tiny(src, tmp_path / "out.onnx", calib_tokens, head_ratio=0.5)
    assert [r["kept"] for r in result.heads.layers()] == [[0, 3]] * 2
    before, after = load_prepared(src), load_prepared(tmp_path / "out.onnx")
    block, new = find_attention(before)[0], find_attention(after)[0]
    assert (new.num_heads, new.head_dim, new.projections[0].stride) == (2, 16, 48)
    old_w = before.graph.initializers[block.projections[0].weight].const_value.numpy()
    new_w = after.graph.initializers[new.projections[0].weight].const_value.numpy()
    keep = [h * 48 + i for h in (0, 3) for i in range(48)]  # heads 0 and 3, each [q | k | v]
    np.testing.assert_array_equal(new_w, old_w[:, keep])
    assert result.params_before - result.params_after == 2 * (2 * 48 * (64 + 1) + 2 * 16 * 64)  # qkv cols+bias, dense rows
    ids = np.random.default_rng(2).integers(0, 200, size=(2, 16))
    np.testing.assert_allclose(_logits(tmp_path / "out.onnx", ids), _logits(src, ids), rtol=1e-5, atol=1e-5)


def test_opset23_export_loses_dead_heads_exactly(neox23, tmp_path, calib_tokens):
    blocks = find_attention(load_prepared(neox23))
    assert [(b.op, b.reason, b.num_heads, b.projections[0].stride) for b in blocks] == [("ai.onnx::Attention", None, 4, 48)] * 2
    src = zero_heads(neox23, tmp_path / "dead.onnx", (0, 2))
    result = optimize_tiny(src, tmp_path / "out.onnx", calib_tokens, head_ratio=0.5)
    assert [r["kept"] for r in result.heads.layers()] == [[1, 3]] * 2
    ids = np.random.default_rng(4).integers(0, 200, size=(2, 12))
    np.testing.assert_allclose(_logits(tmp_path / "out.onnx", ids), _logits(src, ids), rtol=1e-5, atol=1e-5)
