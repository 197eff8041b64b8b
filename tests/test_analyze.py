"""Analysis: golden group listings per export style, and structural rules on small graphs."""

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphresize
from graphresize.pipeline import load_prepared

GOLDEN = Path(__file__).parent / "golden"
FIXTURES = ["llama_dynamo", "llama_legacy", "llama_optimum", "gpt2", "gpt2_legacy", "opt", "bert", "qwen2", "mistral", "phi3", "phi"]


def listing(path) -> str:
    """Groups without exporter-specific names: kind, layer, width, state, and the weights'
    roles and shapes (so dynamo and legacy exports of one model can be compared)."""
    model = load_prepared(path)
    lines = []
    for g in graphresize.analyze(path):
        shapes = sorted(
            f"{p.role}:{'x'.join(map(str, model.graph.initializers[p.name].const_value.shape))}@{p.axis}" for p in g.params
        )
        state = "resizable" if g.resizable else "frozen"
        lines.append(f"{g.kind} layer={g.layer} width={g.width} {state} {' '.join(shapes)}")
    return "\n".join(sorted(lines)) + "\n"


@pytest.mark.parametrize("fixture", FIXTURES)
def test_golden_listing(fixture, request):
    text = listing(request.getfixturevalue(fixture))
    golden = GOLDEN / f"{fixture}.txt"
    if os.environ.get("GRAPHRESIZE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def _mlp_lines(text):
    return [line for line in text.splitlines() if line.startswith("mlp")]


@pytest.mark.parametrize(("a", "b"), [("llama_dynamo", "llama_legacy"), ("llama_dynamo", "llama_optimum"), ("gpt2", "gpt2_legacy")])
def test_export_styles_agree_on_mlp_groups(a, b, request):
    assert _mlp_lines(listing(request.getfixturevalue(a))) == _mlp_lines(listing(request.getfixturevalue(b)))


def _mlp_graph(tmp_path, act="Relu", extra=None, share_bias=False):
    """x[b,8] -> MatMul(8x16) -> +bias -> act -> MatMul(16x8) -> y, twice in a row."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "input_ids"
    for i in range(2):
        bias = "b0" if share_bias else f"b{i}"
        nodes += [
            helper.make_node("MatMul", [prev, f"w1_{i}"], [f"h{i}"]),
            helper.make_node("Add", [f"h{i}", bias], [f"hb{i}"]),
            helper.make_node(act, [f"hb{i}"], [f"a{i}"]),
            helper.make_node("MatMul", [f"a{i}", f"w2_{i}"], [f"o{i}"]),
            helper.make_node("Add", [prev, f"o{i}"], [f"r{i}"]),
        ]
        inits += [
            onnx.numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), f"w1_{i}"),
            onnx.numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), f"w2_{i}"),
        ]
        if not share_bias or i == 0:
            inits.append(onnx.numpy_helper.from_array(np.zeros(16, np.float32), bias))
        prev = f"r{i}"
    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["b", 8])
    y = helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["b", 8])
    model = helper.make_model(helper.make_graph(nodes, "mlp", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / f"{act}{'_shared' if share_bias else ''}.onnx"
    onnx.save(model, path)
    return path


def test_shared_zero_bias_does_not_glue_layers(tmp_path):
    groups = graphresize.analyze(_mlp_graph(tmp_path, share_bias=True))
    assert [g.width for g in groups.of_kind("mlp")] == [16, 16]


def test_unknown_op_freezes_its_group_only(tmp_path):
    groups = graphresize.analyze(_mlp_graph(tmp_path, act="Hardmax"))
    # Both sides of each Hardmax are frozen (4 spaces of width 16); nothing is guessed.
    hardmax = [g for g in groups if g.frozen and "unsupported op Hardmax" in g.frozen]
    assert sorted(g.width for g in hardmax) == [16, 16, 16, 16]
    assert not groups.resizable()
    assert [g.kind for g in groups if g.width == 8] == ["residual"]


def test_known_activation_makes_two_resizable_groups(tmp_path):
    groups = graphresize.analyze(_mlp_graph(tmp_path, act="Tanh"))
    mlps = groups.of_kind("mlp")
    assert [(g.layer, g.width, g.resizable) for g in mlps] == [(0, 16, True), (1, 16, True)]
    assert sorted(p.role for p in mlps[0].params) == ["consumer", "producer", "vector"]
