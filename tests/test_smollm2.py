"""The embedded default, end to end (slow: builds SmolLM2-135M from its wheel, ~4 min)."""

import os
from pathlib import Path

import numpy as np
import pytest

import graphresize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from graphresize.io import capture, embedded

    cache = Path(os.environ.get("GRAPHRESIZE_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
    hf_dir = embedded.build_smollm2(cache)
    model = cache / "smollm2-onnx" / "model.onnx"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        capture.export_onnx(hf_dir, model, style="dynamo")
    return model


def test_analysis_finds_thirty_mlp_groups(smollm2):
    groups = graphresize.analyze(smollm2)
    mlps = groups.of_kind("mlp")
    assert [(g.layer, g.width, g.resizable) for g in mlps] == [(i, 1536, True) for i in range(30)]
    assert [g.width for g in groups.of_kind("residual")] == [576]


def test_ratio_three_tenths(smollm2, tmp_path):
    ids = np.random.default_rng(0).integers(0, 49152, size=20000)
    np.save(tmp_path / "ids.npy", ids)
    result = graphresize.optimize(smollm2, tmp_path / "out.onnx", ratio=0.3, calib=tmp_path / "ids.npy", tokens=2048, progress=False)
    assert {e.new_width for e in result.plan.changed()} == {1072}
    assert result.params_before - result.params_after == 30 * 3 * 576 * (1536 - 1072)
    assert result.verification.top1_agreement > 0.2
