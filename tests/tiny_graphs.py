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


def calib_tokens(path: str | Path, n: int = 4096, seed: int = 0) -> Path:
    """A ``.npy`` stream of ``n`` token ids below ``VOCAB``."""
    np.save(path, np.random.default_rng(seed).integers(0, VOCAB, size=n))
    return Path(path)
