"""The Olive pass wrapper (runs only where olive-ai is installed; it is not a dependency)."""

import json

import numpy as np
import pytest

pytest.importorskip("olive")

from graphresize.io.modelio import file_sha256  # noqa: E402
from graphresize.olive import GraphResize, package_config  # noqa: E402


def test_pass_options_are_the_optimize_fields():
    import dataclasses

    from graphresize.pipeline import OptimizeOptions

    params = GraphResize._default_config(None)
    assert params["ratio"].required
    assert set(params) == {f.name for f in dataclasses.fields(OptimizeOptions)} - {"overwrite", "progress"}
    assert package_config()["passes"]["GraphResize"]["module_path"] == "graphresize.olive.GraphResize"


def test_olive_workflow_runs_the_pass(llama_dynamo, tmp_path):
    from olive.workflows import run

    calib = tmp_path / "tokens.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 200, size=8000))
    digest = file_sha256(llama_dynamo)
    workflow = {
        "input_model": {"type": "ONNXModel", "model_path": str(llama_dynamo)},
        "passes": {"resize": {"type": "GraphResize", "ratio": 0.3, "calib": str(calib), "tokens": 1024, "seq_len": 32}},
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "log_severity_level": 3,
    }
    run(workflow, package_config=package_config())
    reports = list((tmp_path / "cache").rglob("*.report.json"))
    assert reports, sorted(str(p) for p in tmp_path.rglob("*"))
    data = json.loads(reports[0].read_text())
    assert [g["new_width"] for g in data["groups"] if g["kind"] == "mlp"] == [88, 88]
    assert list((tmp_path / "out").rglob("*.onnx"))
    assert file_sha256(llama_dynamo) == digest
