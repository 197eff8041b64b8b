"""Session-cached tiny ONNX models (see ``tests/models.py``).

Each fixture builds a seeded random-weight model, exports it once per test session into a
shared temporary directory and returns the ``.onnx`` path. Tests must not modify these
files in place: write results elsewhere (``tmp_path``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for _p in (HERE.parent, HERE):  # the package from this checkout; tests/models.py
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import models  # noqa: E402
from models import EXPORT_TIMES, export_tiny  # noqa: E402

# ``import models`` and ``from tests.models import ...`` must give one module (one registry
# of exported torch models, one EXPORT_TIMES).
sys.modules.setdefault("tests.models", models)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Directory holding the session's exported tiny models."""
    return tmp_path_factory.mktemp("tiny_models")


def _export(tiny_dir: Path, family: str, style: str, **kwargs) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return export_tiny(family, style, out_dir=tiny_dir, **kwargs)


@pytest.fixture(scope="session")
def llama_dynamo(tiny_dir) -> Path:
    """Llama (hidden 64, MLP 128, 2 layers, 4 heads / 2 KV heads): dynamo, logits only."""
    return _export(tiny_dir, "llama", "dynamo")


@pytest.fixture(scope="session")
def llama_legacy(tiny_dir) -> Path:
    """The same Llama through the TorchScript exporter (``onnx::MatMul_*`` weights)."""
    return _export(tiny_dir, "llama", "legacy")


@pytest.fixture(scope="session")
def llama_optimum(tiny_dir) -> Path:
    """The same Llama in Optimum's with-past layout (position_ids, past/present KV)."""
    return _export(tiny_dir, "llama", "optimum", with_past=True)


@pytest.fixture(scope="session")
def gpt2(tiny_dir) -> Path:
    """GPT2LMHeadModel (hidden 64, MLP 256, 2 layers, 4 heads): dynamo."""
    return _export(tiny_dir, "gpt2", "dynamo")


@pytest.fixture(scope="session")
def gpt2_legacy(tiny_dir) -> Path:
    """The same GPT-2 through the TorchScript exporter."""
    return _export(tiny_dir, "gpt2", "legacy")


@pytest.fixture(scope="session")
def opt(tiny_dir) -> Path:
    """OPTForCausalLM (hidden 64, FFN 256, 2 layers, 4 heads): dynamo."""
    return _export(tiny_dir, "opt", "dynamo")


@pytest.fixture(scope="session")
def bert(tiny_dir) -> Path:
    """BertModel encoder (hidden 64, MLP 256, 2 layers, 4 heads): dynamo, last_hidden_state."""
    return _export(tiny_dir, "bert", "dynamo")


@pytest.fixture(scope="session")
def qwen2(tiny_dir) -> Path:
    """Qwen2ForCausalLM (Llama sizes, q/k/v biases): dynamo."""
    return _export(tiny_dir, "qwen2", "dynamo")


@pytest.fixture(scope="session")
def mistral(tiny_dir) -> Path:
    """MistralForCausalLM (Llama sizes, sliding window 8): dynamo."""
    return _export(tiny_dir, "mistral", "dynamo")


@pytest.fixture(scope="session")
def phi3(tiny_dir) -> Path:
    """Phi3ForCausalLM (Llama sizes, packed qkv_proj and gate_up_proj): dynamo."""
    return _export(tiny_dir, "phi3", "dynamo")


@pytest.fixture(scope="session")
def phi(tiny_dir) -> Path:
    """PhiForCausalLM, Phi-1/2 (hidden 64, MLP 128, partial rotary 0.5, LayerNorm, parallel
    attention and MLP, dense/fc1/fc2 names): dynamo."""
    return _export(tiny_dir, "phi", "dynamo")


@pytest.fixture(scope="session")
def llama_genai(tmp_path_factory) -> Path:
    """The tiny Llama built by onnxruntime-genai's model builder (fp32, CPU): packed qkv_proj
    into GroupQueryAttention with past/present, (Skip)SimplifiedLayerNormalization,
    genai_config.json and tokenizer beside ``model.onnx`` in a folder of its own."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the dev extra")
    pytest.importorskip("transformers")
    from models import export_genai

    return export_genai("llama", tmp_path_factory.mktemp("llama_genai"))


@pytest.fixture(scope="session")
def calib_tokens(tmp_path_factory) -> Path:
    """12,000 seeded random token ids below 200 (every tiny model's vocabulary), as ``.npy``."""
    import numpy as np

    path = tmp_path_factory.mktemp("calib") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 200, size=12000))
    return path



@pytest.fixture(scope="session")
def mlp_model(tmp_path_factory) -> Path:
    """``tiny_graphs.mlp_lm``: two Relu MLPs over an inline embedding (no torch). The CLI input
    tests copy and damage it; never modified itself."""
    from tiny_graphs import mlp_lm

    return mlp_lm(tmp_path_factory.mktemp("mlp_model") / "good.onnx")


@pytest.fixture(scope="session")
def mlp_calib(tmp_path_factory) -> Path:
    """``tiny_graphs.calib_tokens``: 4,096 seeded token ids for ``mlp_model``, as ``.npy``."""
    from tiny_graphs import calib_tokens

    return calib_tokens(tmp_path_factory.mktemp("mlp_calib") / "tokens.npy")


def _zero_last_features(model, keep: int = 48):
    """Llama whose stream never uses features ``keep:`` (embedding, o_proj, down_proj)."""
    model.model.embed_tokens.weight[:, keep:] = 0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[keep:, :] = 0
        layer.mlp.down_proj.weight[keep:, :] = 0


@pytest.fixture(scope="session")
def llama_narrow_stream(tmp_path_factory) -> Path:
    """The tiny Llama whose stream features 48: are never written (a subspace any residual
    method must remove exactly)."""
    return export_tiny("llama", "dynamo", out_dir=tmp_path_factory.mktemp("narrow"), mutate=_zero_last_features)

def pytest_terminal_summary(terminalreporter):
    if not EXPORT_TIMES:
        return
    terminalreporter.section("tiny model exports")
    for path, seconds in EXPORT_TIMES.items():
        terminalreporter.write_line(f"{seconds:6.2f} s  {Path(path).name}")
    terminalreporter.write_line(f"{sum(EXPORT_TIMES.values()):6.2f} s  total")


@pytest.fixture(scope="session")
def opt_legacy(tiny_dir) -> Path:
    """The same OPT through the TorchScript exporter (stream reshapes read ``Shape(h)``)."""
    return _export(tiny_dir, "opt", "legacy")


@pytest.fixture(scope="session")
def gpt2_optimum(tiny_dir) -> Path:
    """The same GPT-2 in Optimum's with-past layout."""
    return _export(tiny_dir, "gpt2", "optimum", with_past=True)


@pytest.fixture(scope="session")
def opt_optimum(tiny_dir) -> Path:
    """The same OPT in Optimum's with-past layout."""
    return _export(tiny_dir, "opt", "optimum", with_past=True)
