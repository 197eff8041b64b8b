"""Hand-built ONNX language models for tests that need a precise graph form (built with
``onnx.helper`` in milliseconds, no torch).

``mlp_lm`` is an embedding, ``len(acts)`` residual MLP blocks and an LM head:

    x = Gather(emb, input_ids)
    x = x + (act_i(x · W1_i + b1_i) · W2_i)          for each block i
    logits = x · head

An ``act`` is an op name (``Relu``, ``Hardmax`` ...), ``"If"`` (Relu or Sigmoid chosen by a
constant condition, in subgraphs) or ``"Loop"`` (Relu applied in a one-trip loop body).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN, INNER = 64, 16, 32


def _branch(name: str, op: str, source: str) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["b", "s", INNER])
    return helper.make_graph([helper.make_node(op, [source], [f"{name}_out"])], name, [], [out])


def _act_nodes(i: int, act: str, src: str, dst: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    if act == "If":
        cond = numpy_helper.from_array(np.array(True), f"cond{i}")
        node = helper.make_node(
            "If", [f"cond{i}"], [dst], name=f"if{i}",
            then_branch=_branch(f"then{i}", "Relu", src), else_branch=_branch(f"else{i}", "Sigmoid", src),
        )  # fmt: skip
        return [node], [cond]
    if act == "Loop":
        trips = numpy_helper.from_array(np.array(1, dtype=np.int64), f"trips{i}")
        cond = numpy_helper.from_array(np.array(True), f"cond{i}")
        body = helper.make_graph(
            [helper.make_node("Identity", [f"c_in{i}"], [f"c_out{i}"]), helper.make_node("Relu", [f"v_in{i}"], [f"v_out{i}"])],
            f"body{i}",
            [
                helper.make_tensor_value_info(f"iter{i}", TensorProto.INT64, []),
                helper.make_tensor_value_info(f"c_in{i}", TensorProto.BOOL, []),
                helper.make_tensor_value_info(f"v_in{i}", TensorProto.FLOAT, ["b", "s", INNER]),
            ],
            [
                helper.make_tensor_value_info(f"c_out{i}", TensorProto.BOOL, []),
                helper.make_tensor_value_info(f"v_out{i}", TensorProto.FLOAT, ["b", "s", INNER]),
            ],
        )
        node = helper.make_node("Loop", [f"trips{i}", f"cond{i}", src], [dst], name=f"loop{i}", body=body)
        return [node], [trips, cond]
    attrs = {"axis": -1} if act == "Hardmax" else {}
    return [helper.make_node(act, [src], [dst], name=f"act{i}", **attrs)], []


def mlp_lm(path: str | Path, acts: tuple[str, ...] = ("Relu", "Relu"), *, seed: int = 0, opset: int = 17) -> Path:
    """Write the model to ``path`` and return it."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape, scale=0.3):
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    inits = [weight("emb", VOCAB, HIDDEN, scale=1.0), weight("head", HIDDEN, VOCAB)]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x0"], name="embed")]
    for i, act in enumerate(acts):
        inits += [weight(f"w1_{i}", HIDDEN, INNER), weight(f"b1_{i}", INNER, scale=0.1), weight(f"w2_{i}", INNER, HIDDEN)]
        nodes += [
            helper.make_node("MatMul", [f"x{i}", f"w1_{i}"], [f"h{i}"], name=f"fc1_{i}"),
            helper.make_node("Add", [f"h{i}", f"b1_{i}"], [f"hb{i}"], name=f"bias1_{i}"),
        ]
        act_nodes, act_inits = _act_nodes(i, act, f"hb{i}", f"a{i}")
        nodes += act_nodes
        inits += act_inits
        nodes += [
            helper.make_node("MatMul", [f"a{i}", f"w2_{i}"], [f"o{i}"], name=f"fc2_{i}"),
            helper.make_node("Add", [f"x{i}", f"o{i}"], [f"x{i + 1}"], name=f"residual_{i}"),
        ]
    nodes.append(helper.make_node("MatMul", [f"x{len(acts)}", "head"], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes,
        "mlp_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    path = Path(path)
    onnx.save(model, path)
    return path


# CLI options that resize ``mlp_lm``'s MLP width only, quickly (the input tests' common run).
MLP_ONLY_ARGS = ["--ratio", "0", "--ratio-mlp", "0.5", "--tokens", "512", "--seq-len", "16", "-q"]


def calib_tokens(path: str | Path, n: int = 4096, seed: int = 0) -> Path:
    """A ``.npy`` stream of ``n`` token ids below ``VOCAB``."""
    np.save(path, np.random.default_rng(seed).integers(0, VOCAB, size=n))
    return Path(path)


# ------------------------------------------------------------------ fused attention models

ATTN_HIDDEN, ATTN_HEAD_DIM = 32, 8
#: form -> (query heads, KV heads); the op each form uses is in ``attention_lm``'s docstring.
ATTENTION_FORMS = {
    "mha": (4, 4),
    "gqa": (4, 2),
    "gqa_packed": (4, 2),
    "gqa_split": (4, 2),
    "ms_attention": (4, 4),
    "attention23": (4, 2),
    # RotaryEmbedding on the q/k path (a ``position_ids`` input [batch, seq]):
    "mha_rope": (4, 4),  # com.microsoft RotaryEmbedding, 3-D, num_heads set, interleaved
    "gqa_rope": (4, 2),  # com.microsoft RotaryEmbedding, 3-D, num_heads unset (from the caches)
    "attention23_rope": (4, 2),  # ONNX RotaryEmbedding (opset 23), 3-D, num_heads set
    "attention23_4d": (4, 2),  # ONNX Attention on 4-D [B, H, S, hd] inputs, no rotary
    "attention23_rope4d": (4, 2),  # the same with ONNX RotaryEmbedding, 4-D, on q and k
    "attention23_msrope4d": (4, 2),  # the same with com.microsoft RotaryEmbedding, 4-D, interleaved
}
ROPE_POSITIONS = 64  # rows of the cos/sin caches


def attention_lm(path: str | Path, form: str, *, past: bool = False, layers: int = 2, seed: int = 0) -> Path:
    """A causal LM of ``layers`` residual attention blocks around one fused attention op:

    x = Gather(emb, input_ids);  x = x + Attn(x)·Wo  per block;  logits = x · head

    ``mha``: com.microsoft MultiHeadAttention (q/k/v MatMuls, their packed bias as the op's
    bias input, unidirectional); ``gqa``: com.microsoft GroupQueryAttention (q/k/v MatMuls;
    ``seqlens_k`` and ``total_sequence_length`` from ``attention_mask``); ``gqa_packed``: the
    same with one packed QKV MatMul as its only input; ``gqa_split``: one QKV MatMul then a
    Split into q/k/v; ``ms_attention``: com.microsoft Attention (packed weight and bias,
    ``qkv_hidden_sizes``, packed past ``[2, B, H, T, hd]``); ``attention23``: ONNX Attention
    (opset 23, 3-D inputs, ``q_num_heads``/``kv_num_heads``, is_causal). With ``past`` every
    op reads a KV cache (``past_key_values.{i}.key``/``.value``, or ``past.{i}``) and writes
    ``present.{i}.key``/``.value`` (``present.{i}``).

    ``*_rope`` forms rotate q and k by a RotaryEmbedding (cos/sin caches ``[64, hd/2]`` read at
    ``position_ids``) between their projection and the op; ``*4d`` forms give ONNX Attention
    ``[B, H, S, hd]`` inputs (Reshape ``[0, 0, H, hd]`` then Transpose, RotaryEmbedding on
    that form) and merge its ``[B, H, S, hd]`` output back (Transpose, Reshape ``[0, 0, H·hd]``)."""
    heads, kv_heads = ATTENTION_FORMS[form]
    base = form.replace("_rope4d", "").replace("_msrope4d", "").replace("_rope", "").replace("_4d", "")
    rope, four_d = "rope" in form, form.endswith("4d")
    d, hd = ATTN_HIDDEN, ATTN_HEAD_DIM
    qw, kw = heads * hd, kv_heads * hd
    rng = np.random.default_rng(seed)

    def weight(name, *shape, scale=0.3):
        inits.append(numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    inits: list[onnx.TensorProto] = []
    weight("emb", VOCAB, d, scale=1.0)
    weight("head", d, VOCAB)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x0"], name="embed")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    ms = "com.microsoft"
    if rope:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
        angles = np.outer(np.arange(ROPE_POSITIONS), 10000.0 ** (-np.arange(hd // 2) * 2 / hd))
        const("cos_cache", np.cos(angles).astype(np.float32))
        const("sin_cache", np.sin(angles).astype(np.float32))
    if four_d:
        for name, n in (("split_q", heads), ("split_kv", kv_heads)):
            const(name, np.array([0, 0, n, hd], dtype=np.int64))
        const("merge", np.array([0, 0, qw], dtype=np.int64))

    def rotate(i: int, role: str, src: str, n: int) -> str:
        """``src`` rotated by this form's RotaryEmbedding (``n`` heads)."""
        if not rope or role == "v":
            return src
        dst = f"{role}{i}_rot"
        if form == "attention23_msrope4d":
            nodes.append(helper.make_node("RotaryEmbedding", [src, "position_ids", "cos_cache", "sin_cache"], [dst],
                                          domain=ms, interleaved=1, name=f"rotary_{role}{i}"))
        elif base == "attention23":
            nodes.append(helper.make_node("RotaryEmbedding", [src, "cos_cache", "sin_cache", "position_ids"], [dst],
                                          **({} if four_d else {"num_heads": n}), name=f"rotary_{role}{i}"))
        else:
            extra = {"num_heads": n, "interleaved": 1} if base == "mha" else {}
            nodes.append(helper.make_node("RotaryEmbedding", [src, "position_ids", "cos_cache", "sin_cache"], [dst],
                                          domain=ms, **extra, name=f"rotary_{role}{i}"))
        return dst

    def heads_first(i: int, role: str, src: str, n: int) -> str:
        """``[B, S, n·hd]`` → ``[B, n, S, hd]`` (the ``*4d`` forms)."""
        nodes.extend([
            helper.make_node("Reshape", [src, "split_q" if role == "q" else "split_kv"], [f"{src}_4d"], name=f"split_{role}{i}"),
            helper.make_node("Transpose", [f"{src}_4d"], [f"{src}_bhsd"], perm=[0, 2, 1, 3], name=f"heads_first_{role}{i}"),
        ])  # fmt: skip
        return f"{src}_bhsd"

    if base.startswith("gqa"):
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]))
        const("one", np.array(1, dtype=np.int64))
        const("axis1", np.array([1], dtype=np.int64))
        nodes += [
            helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["mask_len"], keepdims=0, name="mask_len"),
            helper.make_node("Sub", ["mask_len", "one"], ["seqlens64"], name="seqlens64"),
            helper.make_node("Cast", ["seqlens64"], ["seqlens_k"], to=TensorProto.INT32, name="seqlens"),
            helper.make_node("Shape", ["attention_mask"], ["mask_shape"], name="mask_shape"),
            helper.make_node("Gather", ["mask_shape", "one"], ["total64"], name="total64"),
            helper.make_node("Cast", ["total64"], ["total_len"], to=TensorProto.INT32, name="total"),
        ]

    def cache_io(i: int, heads_: int, packed: bool = False) -> list[str]:
        if not past:
            return []
        if packed:
            inputs.append(helper.make_tensor_value_info(f"past.{i}", TensorProto.FLOAT, [2, "batch", heads_, "past_seq", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}", TensorProto.FLOAT, [2, "batch", heads_, "total", hd]))
            return [f"past.{i}"]
        names = []
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch", heads_, "past_seq", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, ["batch", heads_, "total", hd]))
            names.append(f"past_key_values.{i}.{kind}")
        return names

    def presents(i: int) -> list[str]:
        return [f"present.{i}.key", f"present.{i}.value"] if past else []

    for i in range(layers):
        x, a = f"x{i}", f"attn{i}"
        if form == "ms_attention":
            weight(f"wqkv{i}", d, 3 * qw)
            weight(f"bqkv{i}", 3 * qw, scale=0.1)
            ins = [x, f"wqkv{i}", f"bqkv{i}", "", *cache_io(i, heads, packed=True)]
            nodes.append(helper.make_node("Attention", ins, [a, *([f"present.{i}"] if past else [])], domain=ms,
                                          num_heads=heads, qkv_hidden_sizes=[qw] * 3, unidirectional=1, name=f"attention{i}"))
        elif form in ("gqa_packed", "gqa_split"):
            weight(f"wqkv{i}", d, qw + 2 * kw)
            nodes.append(helper.make_node("MatMul", [x, f"wqkv{i}"], [f"qkv{i}"], name=f"qkv_proj{i}"))
            if form == "gqa_packed":
                qkv = [f"qkv{i}", "", ""]
            else:
                const(f"split{i}", np.array([qw, kw, kw], dtype=np.int64))
                nodes.append(helper.make_node("Split", [f"qkv{i}", f"split{i}"], [f"q{i}", f"k{i}", f"v{i}"], axis=-1, name=f"split{i}"))
                qkv = [f"q{i}", f"k{i}", f"v{i}"]
            ins = [*qkv, *(cache_io(i, kv_heads) or ["", ""]), "seqlens_k", "total_len"]
            nodes.append(helper.make_node("GroupQueryAttention", ins, [a, *presents(i)], domain=ms,
                                          num_heads=heads, kv_num_heads=kv_heads, name=f"attention{i}"))
        else:
            for role, width in (("q", qw), ("k", kw), ("v", kw)):
                weight(f"w{role}{i}", d, width)
                nodes.append(helper.make_node("MatMul", [x, f"w{role}{i}"], [f"{role}{i}"], name=f"{role}_proj{i}"))
            qkv = [f"q{i}", f"k{i}", f"v{i}"]
            if four_d:
                qkv = [heads_first(i, r, n_, heads if r == "q" else kv_heads) for r, n_ in zip("qkv", qkv, strict=True)]
            qkv = [rotate(i, r, n_, heads if r == "q" else kv_heads) for r, n_ in zip("qkv", qkv, strict=True)]
            if base == "mha":
                weight(f"bqkv{i}", 3 * qw, scale=0.1)
                ins = [*qkv, f"bqkv{i}", "", "", *cache_io(i, heads)]
                nodes.append(helper.make_node("MultiHeadAttention", ins, [a, *presents(i)], domain=ms, num_heads=heads,
                                              unidirectional=1, name=f"attention{i}"))
            elif base == "gqa":
                ins = [*qkv, *(cache_io(i, kv_heads) or ["", ""]), "seqlens_k", "total_len"]
                nodes.append(helper.make_node("GroupQueryAttention", ins, [a, *presents(i)], domain=ms,
                                              num_heads=heads, kv_num_heads=kv_heads, name=f"attention{i}"))
            elif four_d:
                ins = [*qkv, "", *cache_io(i, kv_heads)]
                nodes.append(helper.make_node("Attention", ins, [f"{a}_bhsd", *presents(i)], is_causal=1, name=f"attention{i}"))
                nodes.extend([
                    helper.make_node("Transpose", [f"{a}_bhsd"], [f"{a}_4d"], perm=[0, 2, 1, 3], name=f"seq_first{i}"),
                    helper.make_node("Reshape", [f"{a}_4d", "merge"], [a], name=f"merge{i}"),
                ])  # fmt: skip
            else:
                ins = [*qkv, "", *cache_io(i, kv_heads)]
                nodes.append(helper.make_node("Attention", ins, [a, *presents(i)], q_num_heads=heads,
                                              kv_num_heads=kv_heads, is_causal=1, name=f"attention{i}"))
        weight(f"wo{i}", qw, d)
        nodes += [
            helper.make_node("MatMul", [a, f"wo{i}"], [f"o{i}"], name=f"o_proj{i}"),
            helper.make_node("Add", [x, f"o{i}"], [f"x{i + 1}"], name=f"residual{i}"),
        ]
    nodes.append(helper.make_node("MatMul", [f"x{layers}", "head"], ["logits"], name="lm_head"))
    graph = helper.make_graph(nodes, f"attention_lm_{form}", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 23 if base == "attention23" else 17), helper.make_opsetid(ms, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests", ir_version=10)
    path = Path(path)
    onnx.save(model, path)
    return path
