"""Cleanup shares again the constants preparation copied: an untouched region keeps the
sharing, and the parameter count, the exporter gave it."""

import numpy as np
import onnx_ir as ir
import pytest
from graphresize.passes import cleanup_passes
from graphresize.passes.edit import UNTIED_FROM

from graphresize.pipeline import load_prepared, parameter_count
from tests.models import export_tiny, optimize_tiny


@pytest.fixture(scope="module")
def llama_shared_gains(tmp_path_factory):
    """A tiny Llama with the exporter's shared unit gains (``randomize_1d=False``)."""
    return export_tiny("llama", "dynamo", out_dir=tmp_path_factory.mktemp("shared"), randomize_1d=False)


def _count(path) -> int:
    return parameter_count(ir.load(path))


def test_heads_only_run_removes_exactly_the_heads(llama_shared_gains, tmp_path, calib_tokens):
    """A tiny Llama with the exporter's shared unit gains: removing
    one KV head (and its two query heads) per layer writes the input's count minus those heads'
    rows and columns, nothing more (was 256 more: the un-shared norm gains)."""
    src = llama_shared_gains
    model = load_prepared(src)
    assert any(UNTIED_FROM in v.metadata_props for v in model.graph.initializers.values())
    result = optimize_tiny(src, tmp_path / "out.onnx", calib_tokens, target="mlp", head_ratio=0.5)
    hidden, head_dim = 64, 16
    removed = 0
    for layer in result.heads.layers():
        gone_q = layer["heads"] - layer["new_heads"]
        gone_kv = layer["kv_heads"] - layer["new_kv_heads"]
        removed += 2 * hidden * head_dim * gone_q + 2 * hidden * head_dim * gone_kv  # q and o; k and v
    assert removed == 2 * (2 * 64 * 16 * 2 + 2 * 64 * 16 * 1)
    assert _count(tmp_path / "out.onnx") == _count(src) - removed
    assert result.params_after == _count(src) - removed


def test_an_edited_copy_stays_private(llama_shared_gains):
    """Copies equal to their source are shared again; a copy the rewrite changed is kept."""
    src = llama_shared_gains
    before = _count(src)
    model = load_prepared(src)
    prepared = parameter_count(model)
    assert prepared > before  # preparation un-shared the unit gains
    graph = model.graph
    gains = [v for v in graph.initializers.values() if UNTIED_FROM in v.metadata_props]
    changed = gains[0]
    changed.const_value = ir.tensor(changed.const_value.numpy() * 2.0, name=changed.name)
    cleanup_passes()(model)
    assert changed.name in graph.initializers  # edited: kept
    assert parameter_count(model) == before + int(np.prod(changed.const_value.shape))
