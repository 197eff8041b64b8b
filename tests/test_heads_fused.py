"""Attention heads in fused ops: com.microsoft MultiHeadAttention, GroupQueryAttention (separate,
packed, and Split q/k/v), com.microsoft Attention and ONNX Attention (opset 23), hand-built
(``tests/tiny_graphs.py``) and as onnxscript's ORT fusions make them from exported models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from tiny_graphs import ATTENTION_FORMS, ATTN_HEAD_DIM, attention_lm, calib_tokens

import graphresize
from graphresize.analysis.attention.find import find_attention
from graphresize.io.ort_utils import make_feeds, make_session
from graphresize.pipeline import load_prepared
from tests.models import optimize_tiny, zero_heads

FORMS = list(ATTENTION_FORMS)
OPS = {
    "mha": "com.microsoft::MultiHeadAttention", "gqa": "com.microsoft::GroupQueryAttention",
    "gqa_packed": "com.microsoft::GroupQueryAttention", "gqa_split": "com.microsoft::GroupQueryAttention",
    "ms_attention": "com.microsoft::Attention", "attention23": "ai.onnx::Attention",
    "mha_rope": "com.microsoft::MultiHeadAttention", "gqa_rope": "com.microsoft::GroupQueryAttention",
    "attention23_rope": "ai.onnx::Attention", "attention23_4d": "ai.onnx::Attention",
    "attention23_rope4d": "ai.onnx::Attention", "attention23_msrope4d": "ai.onnx::Attention",
}  # fmt: skip
ROPE = [f for f in FORMS if "rope" in f]
HEAD_ATTRS = {"num_heads", "kv_num_heads", "q_num_heads", "qkv_hidden_sizes"}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return calib_tokens(tmp_path_factory.mktemp("fused_heads") / "tokens.npy", n=3000)


def _run(path, ids, **extra):
    session = make_session(ir.load(path))
    feeds = make_feeds(session, ids)
    feeds.update(extra)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _ids(seq=12):
    return np.random.default_rng(5).integers(0, 64, size=(2, seq))




def _optimize(src, dst, tokens, ratio, **kw):
    return optimize_tiny(src, dst, tokens, tokens=1024, seq_len=16, head_ratio=ratio, **kw)


def _head_attrs(path, op="Attention"):
    return [
        {a.name: (list(a.ints) if a.ints else a.i) for a in node.attribute if a.name in HEAD_ATTRS}
        for node in onnx.load(path).graph.node if op in node.op_type
    ]


@pytest.mark.parametrize("form", FORMS)
def test_fused_ops_are_recognised(form, tmp_path):
    blocks = find_attention(load_prepared(attention_lm(tmp_path / "m.onnx", form, past=True)))
    heads, kv_heads = ATTENTION_FORMS[form]
    assert [(b.op, b.reason, b.num_heads, b.num_kv_heads, b.head_dim) for b in blocks] == [
        (OPS[form], None, heads, kv_heads, ATTN_HEAD_DIM)
    ] * 2
    assert {c.name for c in blocks[1].cache} == (
        {"past.1", "present.1"} if form == "ms_attention"
        else {f"{p}.1.{kind}" for p in ("past_key_values", "present") for kind in ("key", "value")}
    )
    assert {c.axis for c in blocks[0].cache} == {2 if form == "ms_attention" else 1}
    if form in ("gqa_packed", "ms_attention"):  # one packed weight, three segments
        assert len({p.weight for p in blocks[0].projections}) == 1
        assert [p.offset for p in blocks[0].projections] == [0, heads * 8, (heads + kv_heads) * 8]


# form -> (dead query heads, --ratio-heads, kept query heads, new query/KV heads)
DEAD = {
    "mha": ((1,), 0.25, [0, 2, 3], (3, 3)),
    "gqa": ((2, 3), 0.5, [0, 1], (2, 1)),  # KV head 1 with its query heads
    "gqa_packed": ((0, 1), 0.5, [2, 3], (2, 1)),
    "gqa_split": ((2, 3), 0.5, [0, 1], (2, 1)),
    "ms_attention": ((0, 3), 0.5, [1, 2], (2, 2)),
    "attention23": ((2, 3), 0.5, [0, 1], (2, 1)),
    "mha_rope": ((1,), 0.25, [0, 2, 3], (3, 3)),
    "gqa_rope": ((0, 1), 0.5, [2, 3], (2, 1)),
    "attention23_rope": ((2, 3), 0.5, [0, 1], (2, 1)),
    "attention23_4d": ((0, 1), 0.5, [2, 3], (2, 1)),
    "attention23_rope4d": ((2, 3), 0.5, [0, 1], (2, 1)),
    "attention23_msrope4d": ((0, 1), 0.5, [2, 3], (2, 1)),
}


@pytest.mark.parametrize("form", FORMS)
def test_dead_heads_are_removed_exactly_and_attributes_follow(form, tmp_path, tokens):
    dead, ratio, kept, counts = DEAD[form]
    src = zero_heads(attention_lm(tmp_path / "m.onnx", form), tmp_path / "dead.onnx", dead)
    result = _optimize(src, tmp_path / "out.onnx", tokens, ratio)
    assert [r["kept"] for r in result.heads.layers()] == [kept] * 2
    assert result.params_after < result.params_before
    np.testing.assert_allclose(_run(tmp_path / "out.onnx", _ids())["logits"], _run(src, _ids())["logits"], atol=1e-5)
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)
    attrs = _head_attrs(tmp_path / "out.onnx")[0]
    want = {
        "mha": {"num_heads": 3}, "ms_attention": {"num_heads": 2, "qkv_hidden_sizes": [16, 16, 16]},
        "attention23": {"q_num_heads": 2, "kv_num_heads": 1}, "mha_rope": {"num_heads": 3},
        "attention23_rope": {"q_num_heads": 2, "kv_num_heads": 1},
    }.get(form, {} if form.endswith("4d") else {"num_heads": 2, "kv_num_heads": 1})  # fmt: skip
    assert attrs == want
    rotary = {"mha_rope": [{"num_heads": 3}] * 4, "attention23_rope": [{"num_heads": 2}, {"num_heads": 1}] * 2}
    assert _head_attrs(tmp_path / "out.onnx", "RotaryEmbedding") == rotary.get(form, [{}] * 4 if "rope" in form else [])
    blocks = find_attention(load_prepared(tmp_path / "out.onnx"))  # still recognised, with the new counts
    assert [(b.num_heads, b.num_kv_heads) for b in blocks] == [counts] * 2


def test_zero_heads_removed_is_identity(tmp_path, tokens):
    src = attention_lm(tmp_path / "m.onnx", "gqa", past=True)
    result = _optimize(src, tmp_path / "out.onnx", tokens, 0.2)  # rounds to 0 of 2 KV groups
    assert "rounded to 0" in result.heads.note
    assert _head_attrs(tmp_path / "out.onnx") == _head_attrs(src)
    before, after = _run(src, _ids()), _run(tmp_path / "out.onnx", _ids())
    for name, value in before.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-6, atol=1e-6)


def _zero_removed(src, dst, kept_per_layer):
    """``src`` with the output rows of every query head not in ``kept_per_layer[i]`` zeroed in
    attention layer ``i``: what removing the other heads (no refit) must compute."""
    model = load_prepared(src)
    for block, kept in zip(find_attention(model), kept_per_layer, strict=True):
        value = model.graph.initializers[block.output_weight]
        array = np.array(value.const_value.numpy(), copy=True)
        rows = np.moveaxis(array, block.output_axis, 0)
        for h in set(range(block.num_heads)) - set(kept):
            rows[h * block.head_dim : (h + 1) * block.head_dim] = 0.0
        value.const_value = ir.tensor(array, name=value.name)
    ir.save(model, dst)
    return dst


@pytest.mark.parametrize("form", ["mha", "gqa", *ROPE])
def test_rotary_layers_keep_outputs_at_zero_heads_and_lose_live_heads_exactly(form, tmp_path, tokens):
    """Through a RotaryEmbedding: a head ratio that rounds to 0 heads writes the same outputs;
    removing live heads (no refit) computes what the original computes with those heads'
    output rows zeroed, and the token-by-token KV decode of the result matches its full pass."""
    src = attention_lm(tmp_path / "m.onnx", form, past=True)
    ids = _ids()
    assert "rounded to 0" in _optimize(src, tmp_path / "same.onnx", tokens, 0.1).heads.note
    before, same = _run(src, ids), _run(tmp_path / "same.onnx", ids)
    for name, value in before.items():
        np.testing.assert_allclose(same[name], value, rtol=1e-6, atol=1e-6)
    result = _optimize(src, tmp_path / "out.onnx", tokens, 0.5, head_method="prune", unmerge="pinv")
    kept = [r["kept"] for r in result.heads.layers()]
    assert [len(k) for k in kept] == [ATTENTION_FORMS[form][0] // 2] * 2
    want = _run(_zero_removed(src, tmp_path / "zeroed.onnx", kept), ids)["logits"]
    after = _run(tmp_path / "out.onnx", ids)["logits"]
    np.testing.assert_allclose(after, want, rtol=1e-4, atol=1e-4)
    assert np.abs(after - before["logits"]).max() > 1e-2  # live heads went
    step = _decode(tmp_path / "out.onnx", ids, 8)
    np.testing.assert_allclose(step["logits"], after[:, 8:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["gqa", "attention23", "attention23_rope4d"])
def test_query_heads_removed_inside_every_kv_group(form, tmp_path, tokens):
    """--head-method query on an op that pairs query and KV heads itself: num_heads drops,
    kv_num_heads stays, nothing changes when the removed query heads were dead."""
    src = zero_heads(attention_lm(tmp_path / "m.onnx", form), tmp_path / "dead.onnx", (0, 3))
    result = _optimize(src, tmp_path / "out.onnx", tokens, 0.5, head_method="query")
    assert [r["kept"] for r in result.heads.layers()] == [[1, 2]] * 2
    np.testing.assert_allclose(_run(tmp_path / "out.onnx", _ids())["logits"], _run(src, _ids())["logits"], atol=1e-5)
    attrs = _head_attrs(tmp_path / "out.onnx")[0]
    assert attrs == {"gqa": {"num_heads": 2, "kv_num_heads": 2}, "attention23": {"q_num_heads": 2, "kv_num_heads": 2}}.get(form, {})


def _decode(path, ids, split):
    """Prefill ``ids[:, :split]`` with an empty cache, then one token at a time through the
    cache (GroupQueryAttention takes several new tokens over a cache only at batch 1); the
    logits of every step and the last cache."""
    session = make_session(ir.load(path))
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, make_feeds(session, ids[:, :split])), strict=True))
    logits = []
    for t in range(split, ids.shape[1]):
        feeds = make_feeds(session, ids[:, t : t + 1])
        for spec in session.get_inputs():
            if spec.name.startswith("past"):
                feeds[spec.name] = out[spec.name.replace("past_key_values.", "present.").replace("past.", "present.")]
            elif spec.name == "attention_mask":
                feeds[spec.name] = np.ones((ids.shape[0], t + 1), dtype=np.int64)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.full((ids.shape[0], 1), t, dtype=np.int64)
        out = dict(zip(names, session.run(names, feeds), strict=True))
        logits.append(out["logits"])
    return {**out, "logits": np.concatenate(logits, axis=1)}


@pytest.mark.parametrize("form", FORMS)
def test_kv_cache_decoding_matches_the_full_pass(form, tmp_path, tokens):
    dead, ratio, _, (heads, kv_heads) = DEAD[form]
    src = zero_heads(attention_lm(tmp_path / "m.onnx", form, past=True), tmp_path / "dead.onnx", dead)
    _optimize(src, tmp_path / "out.onnx", tokens, ratio)
    out = ir.load(tmp_path / "out.onnx")
    shapes = {v.name: list(v.shape) for v in [*out.graph.inputs, *out.graph.outputs]}
    if form == "ms_attention":
        assert shapes["past.0"][2] == heads and shapes["present.1"][2] == heads
    else:
        assert shapes["past_key_values.0.key"][1] == kv_heads and shapes["present.1.value"][1] == kv_heads
    ids = _ids()
    full = _run(tmp_path / "out.onnx", ids)
    step = _decode(tmp_path / "out.onnx", ids, 8)
    np.testing.assert_allclose(step["logits"], full["logits"][:, 8:], rtol=1e-4, atol=1e-4)
    for name in full:
        if name.startswith("present"):
            np.testing.assert_allclose(step[name], full[name], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(full["logits"], _run(src, ids)["logits"], atol=1e-5)


@pytest.mark.parametrize(("fixture", "op", "dead", "ratio", "kept"), [
    ("llama_dynamo", "com.microsoft::MultiHeadAttention", (2, 3), 0.5, [0, 1]),  # repeat-KV before the op
    ("bert", "com.microsoft::Attention", (1,), 0.25, [0, 2, 3]),
])  # fmt: skip
def test_onnxscript_fusions_lose_dead_heads_exactly(fixture, op, dead, ratio, kept, request, tmp_path, calib_tokens):
    fusions = pytest.importorskip("onnxscript.rewriter.ort_fusions")
    model = ir.load(request.getfixturevalue(fixture))
    fusions.optimize_for_ort(model)
    ir.save(model, tmp_path / "fused.onnx")
    src = zero_heads(tmp_path / "fused.onnx", tmp_path / "dead.onnx", dead)
    assert {b.op for b in find_attention(load_prepared(src))} == {op}
    result = graphresize.optimize(src, tmp_path / "out.onnx", ratio=0.0, calib=calib_tokens, tokens=1024, seq_len=16,
                                  progress=False, head_ratio=ratio)
    assert [r["kept"] for r in result.heads.layers()] == [kept] * 2
    ids = np.random.default_rng(1).integers(0, 200, size=(2, 16))
    before, after = _run(src, ids), _run(tmp_path / "out.onnx", ids)
    for name, value in before.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-5, atol=1e-5)
