"""Graphs after ``onnxruntime.transformers.optimizer`` and onnxscript's ORT fusions: the MLP
groups are found and resized through SkipLayerNormalization, FastGelu, BiasGelu, QuickGelu
..., fused attention is frozen as heads with a reason, and the rewritten graph keeps every
fusion ONNX Runtime makes when it loads the original."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphresize
from graphresize.errors import InputError
from graphresize.pipeline import OptimizeOptions

# Ops that are the product of a fusion (in the input, or in ORT's optimized session graph).
FUSED_OPS = frozenset(
    {
        "Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding", "BiasAdd",
        "BiasGelu", "FastGelu", "QuickGelu", "Gelu", "BiasSoftmax", "FusedMatMul", "FusedGemm", "Gemm",
        "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization", "MatMulNBits", "MatMulIntegerToFloat",
    }
)  # fmt: skip

# form -> (fixture, how, the fused ops the input must hold)
FORMS = {
    "ort-gpt2": ("gpt2", "ort", {"SkipLayerNormalization", "FastGelu"}),
    "ort-bert": ("bert", "ort", {"SkipLayerNormalization", "BiasGelu"}),
    "ort-llama": ("llama_dynamo", "ort", {"SkipSimplifiedLayerNormalization", "QuickGelu"}),
    "onnxscript-llama": ("llama_dynamo", "onnxscript", {"SkipSimplifiedLayerNormalization", "MultiHeadAttention"}),
    "onnxscript-bert": ("bert", "onnxscript", {"SkipLayerNormalization", "Attention", "BiasGelu"}),
    "onnxscript-gpt2": ("gpt2", "onnxscript", {"SkipLayerNormalization", "MultiHeadAttention", "FusedMatMul"}),
}

# onnxscript 0.7.2 fuses this GPT-2 into a graph ONNX Runtime 1.32 refuses (Gemm on a rank-3
# input): analysis still works, and optimize stops with a clean input error.
BROKEN_INPUT = {"onnxscript-gpt2": "ONNX Runtime cannot load the input model"}


# The MLP width only (the residual stream keeps its width) on pipelines with a ``target`` option.
MLP_ONLY = dict(tokens=1024, seq_len=32, progress=False)
if "target" in OptimizeOptions.__dataclass_fields__:
    MLP_ONLY["target"] = "mlp"


def fuse(src: Path, dst: Path, how: str) -> Path:
    if how == "ort":
        from onnxruntime.transformers.optimizer import optimize_model

        model_type = "bert" if "bert" in src.name else "gpt2"
        fused = optimize_model(str(src), model_type=model_type, num_heads=4, hidden_size=64, opt_level=2, use_gpu=False)
        fused.save_model_to_file(str(dst))
    else:
        import onnx_ir as ir

        fusions = pytest.importorskip("onnxscript.rewriter.ort_fusions")
        model = ir.load(src)
        fusions.optimize_for_ort(model)
        ir.save(model, dst)
    return dst


def op_counts(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(path).graph.node)


def session_fusions(path: Path, tmp_path: Path) -> Counter:
    """Fused ops in the graph ONNX Runtime's CPU session runs after its own optimizations."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.session.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = op_counts(Path(options.optimized_model_filepath))
    return Counter({op: n for op, n in counts.items() if op in FUSED_OPS})


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fused") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 120, size=6000))
    return path


@pytest.mark.parametrize("form", list(FORMS))
def test_fused_graph_is_resized_and_keeps_fusions(form, request, calib, tmp_path):
    fixture, how, expected = FORMS[form]
    plain = request.getfixturevalue(fixture)
    src = fuse(plain, tmp_path / f"{form}.onnx", how)
    assert expected <= set(op_counts(src)), op_counts(src)

    groups = graphresize.analyze(src)
    mlps = groups.of_kind("mlp")
    assert [(g.width, g.resizable) for g in mlps] == [(g.width, True) for g in graphresize.analyze(plain).of_kind("mlp")]
    heads = groups.of_kind("heads")
    assert heads and not any(g.resizable for g in heads)
    if "Attention" in expected:  # reads its packed QKV weight: those columns are heads
        assert any("attention op Attention" in g.frozen for g in heads)

    out = tmp_path / f"{form}.small.onnx"
    if form in BROKEN_INPUT:
        with pytest.raises(InputError, match=BROKEN_INPUT[form]):
            graphresize.optimize(src, out, ratio=0.3, calib=calib, **MLP_ONLY)
        return
    result = graphresize.optimize(src, out, ratio=0.3, calib=calib, **MLP_ONLY)
    assert [g.width for g in graphresize.analyze(out).of_kind("mlp")] == [int(g.width * 0.7) // 8 * 8 for g in mlps]
    assert 0.0 < result.verification.relative_error < 0.5
    assert expected <= set(op_counts(out))
    before, after = session_fusions(src, tmp_path), session_fusions(out, tmp_path)
    assert before and after == before


def test_shape_inference_writes_nothing_to_the_working_directory(gpt2, tmp_path, monkeypatch):
    """ORT's symbolic shape inference is incomplete on this graph (its entry point would drop a
    debug model into the working directory); analysis uses what it found and writes nothing."""
    src = fuse(gpt2, tmp_path / "fused.onnx", "onnxscript")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert all(g.resizable for g in graphresize.analyze(src).of_kind("mlp"))
    assert list(cwd.iterdir()) == []
