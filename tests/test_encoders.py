"""Verification of encoders: their first output is hidden states, so the summary, the report
and the gates use the cosine similarity and relative error of those vectors; top-1 agreement
is only computed for logits over the vocabulary (where the argmax is the next token)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import graphresize
from graphresize.cli.main import main

OPT = ["--ratio", "0", "--ratio-mlp", "0.5", "--tokens", "1024", "--seq-len", "32"]


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, size=4096))  # the tiny BERT's vocabulary: 256
    return path


def test_encoder_verification_is_cosine_not_top1(bert, ids, tmp_path):
    result = graphresize.optimize(bert, tmp_path / "b.onnx", ratio=0.0, kind_ratios={"mlp": 0.5}, calib=ids,
                                  tokens=1024, seq_len=32, progress=False)
    v = result.verification
    assert v.output == "hidden" and v.top1_agreement is None
    assert 0.5 < v.cosine_similarity < 1.0 - 1e-6 and 0.0 < v.relative_error < 1.0


def test_decoder_verification_keeps_top1(llama_dynamo, calib_tokens, tmp_path):
    result = graphresize.optimize(llama_dynamo, tmp_path / "l.onnx", ratio=0.0, kind_ratios={"mlp": 0.5}, calib=calib_tokens,
                                  tokens=1024, seq_len=32, progress=False)
    v = result.verification
    assert v.output == "logits" and 0.0 < v.top1_agreement <= 1.0 and v.cosine_similarity < 1.0


def test_encoder_gates_and_summary(bert, ids, tmp_path, capsys, monkeypatch):
    from graphresize import pipeline

    base = ["optimize", str(bert), "--calib", str(ids), *OPT]
    # --min-top1 has no meaning on hidden states: a usage error that names --min-cosine,
    # raised from the graph's output shape before any calibration
    with monkeypatch.context() as m:
        m.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibrated before refusing --min-top1"))
        assert main([*base, "-o", str(tmp_path / "a.onnx"), "--min-top1", "0.5", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--min-cosine" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.onnx").exists()
    # a cosine bar it cannot reach: exit 4, nothing written
    assert main([*base, "-o", str(tmp_path / "b.onnx"), "--min-cosine", "0.9999999", "-q"]) == 4
    assert "cosine similarity" in capsys.readouterr().err and not (tmp_path / "b.onnx").exists()
    # one it reaches: written, and the summary/report say cosine, not top-1
    assert main([*base, "-o", str(tmp_path / "c.onnx"), "--min-cosine", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "cosine similarity" in err and "(hidden states)" in err and "top-1" not in err, err
    report = json.loads((tmp_path / "c.report.json").read_text())["verification"]
    assert report["output"] == "hidden" and report["top1_agreement"] is None and report["min_cosine"] == 0.5
