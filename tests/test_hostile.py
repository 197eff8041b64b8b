"""Hostile and careless inputs (issue 15, point 5): each ends as a one-line error with the right
exit code, or as documented behaviour, with the input untouched and nothing written."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from tiny_graphs import MLP_ONLY_ARGS, VOCAB

from graphresize.cli.main import main
from graphresize.io.modelio import file_sha256

ROOT = Path(__file__).resolve().parent.parent


def _run(capsys, args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    return code, err


def _variant(mlp_model: Path, path: Path, edit) -> Path:
    model = onnx.load(mlp_model)
    edit(model)
    onnx.save(model, path)
    return path


def test_empty_output_path(mlp_model, mlp_calib, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = file_sha256(mlp_model)
    code, err = _run(capsys, ["optimize", mlp_model, "-o", "", "--calib", mlp_calib, *MLP_ONLY_ARGS])
    assert code == 2 and "-o/--output must name a file" in err, err
    assert sorted(os.listdir(tmp_path)) == [] and file_sha256(mlp_model) == before
    code, err = _run(capsys, ["optimize", mlp_model, "-o", tmp_path / "o.onnx", "--report", "", "--calib", mlp_calib, *MLP_ONLY_ARGS])
    assert code == 2 and "--report must name a file" in err, err


def test_a_graph_without_inputs_is_refused(mlp_model, mlp_calib, tmp_path, capsys):
    def constant_ids(model):
        del model.graph.input[:]
        model.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 8), dtype=np.int64), "input_ids"))

    src = _variant(mlp_model, tmp_path / "noinput.onnx", constant_ids)
    code, err = _run(capsys, ["optimize", src, "-o", tmp_path / "o.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS])
    assert code == 3 and "has no inputs" in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_a_weight_that_is_a_graph_input_stays_as_it_is(mlp_model, mlp_calib, tmp_path, capsys):
    """w1_0 listed as a graph input (a caller may feed it): its group is frozen, the public
    input keeps its shape, the other MLP is still resized."""

    def expose(model):
        init = next(t for t in model.graph.initializer if t.name == "w1_0")
        model.graph.input.append(helper.make_tensor_value_info("w1_0", init.data_type, list(init.dims)))

    src = _variant(mlp_model, tmp_path / "public.onnx", expose)
    out = tmp_path / "o.onnx"
    code, err = _run(capsys, ["optimize", src, "-o", out, "--calib", mlp_calib, *MLP_ONLY_ARGS])
    assert code == 0, err
    new = onnx.load(out)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in new.graph.input}
    assert shapes["w1_0"] == [16, 32]
    inits = {t.name: list(t.dims) for t in new.graph.initializer}
    assert inits["w1_0"] == [16, 32] and inits["w1_1"][1] < 32  # frozen; the other MLP narrowed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.arange(8).reshape(1, 8) % VOCAB
    w = numpy_helper.to_array(next(t for t in onnx.load(src).graph.initializer if t.name == "w1_0"))
    a = session.run(None, {"input_ids": ids})[0]
    b = session.run(None, {"input_ids": ids, "w1_0": w})[0]  # the caller still may feed it
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_analyze_names_the_public_weight(mlp_model, tmp_path, capsys):
    def expose(model):
        init = next(t for t in model.graph.initializer if t.name == "w1_0")
        model.graph.input.append(helper.make_tensor_value_info("w1_0", init.data_type, list(init.dims)))

    src = _variant(mlp_model, tmp_path / "public.onnx", expose)
    assert main(["analyze", str(src), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    mlp0 = next(g for g in groups if g["id"] == "mlp.0")
    assert "w1_0 is also a graph input" in mlp0["frozen"]
    assert next(g for g in groups if g["id"] == "mlp.1")["frozen"] is None


@pytest.mark.parametrize("value", [-3, 0])
def test_holdout_windows_must_be_positive(value, mlp_model, mlp_calib, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"holdout_windows": value}))
    code, err = _run(capsys, ["optimize", mlp_model, "-o", tmp_path / "o.onnx", "--calib", mlp_calib, "--config", config, *MLP_ONLY_ARGS])
    assert code == 2 and "holdout_windows must be a positive number" in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_a_cyclic_graph_is_refused_with_its_reason(mlp_model, tmp_path, capsys):
    def cycle(model):
        next(n for n in model.graph.node if n.name == "bias1_0").input[1] = "hb1"  # reads a later value

    src = _variant(mlp_model, tmp_path / "cyclic.onnx", cycle)
    code, err = _run(capsys, ["analyze", src])
    assert code == 1 and "the graph has a cycle (bias1_0 -> " in err, err
    code, err = _run(capsys, ["optimize", src, "-o", tmp_path / "o.onnx", "--calib", src, *MLP_ONLY_ARGS])
    assert code == 1 and "cycle" in err


def test_an_unknown_operator_domain_is_refused(mlp_model, tmp_path, capsys):
    def custom(model):
        next(n for n in model.graph.node if n.name == "act0").domain = "com.example.custom"
        model.opset_import.append(helper.make_opsetid("com.example.custom", 1))

    src = _variant(mlp_model, tmp_path / "custom.onnx", custom)
    code, err = _run(capsys, ["analyze", src])
    assert code == 3 and "'act0' uses com.example.custom::Relu" in err, err


def test_com_microsoft_ops_are_known(mlp_model, tmp_path, capsys):
    def fused(model):
        node = next(n for n in model.graph.node if n.name == "act0")
        node.op_type, node.domain = "Gelu", "com.microsoft"
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    src = _variant(mlp_model, tmp_path / "ms.onnx", fused)
    code, err = _run(capsys, ["analyze", src])
    assert code == 0, err


# ------------------------------------------------------------------------------ low memory


def _limited(limit_mb: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    return apply


SMOLLM2 = Path(os.environ.get("GRAPHRESIZE_CACHE", "/work/cache")) / "smollm2-onnx" / "model.onnx"


def _low_memory_run(args, limit_mb, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "graphresize", *map(str, args)],
        capture_output=True, text=True, timeout=300, preexec_fn=_limited(limit_mb), cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )


def _assert_out_of_memory(proc, folder):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("graphresize: error: out of memory"), proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == []


def test_too_little_memory_to_start(mlp_model, mlp_calib, tmp_path):
    """150 MB of address space (300 MB became enough once the stages import lazily): the libraries cannot be mapped; the CLI still says why in one
    line (the package imports its pipeline lazily, inside the handler)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _low_memory_run(["optimize", mlp_model, "-o", out_dir / "o.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS], 150, tmp_path)
    _assert_out_of_memory(proc, out_dir)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="SmolLM2 export not in the cache")
def test_too_little_memory_for_the_model(tmp_path):
    """SmolLM2 (540 MB of weights) under 1.2 GB: MemoryError while loading, reported as such
    (it was 'not a readable ONNX model' before)."""
    proc = _low_memory_run(["optimize", SMOLLM2, "-o", tmp_path / "o.onnx", "--ratio", "0.3", "--calib", SMOLLM2.parent.parent / "wiki.txt",
                            "--tokens", "2048", "--seq-len", "128", "-q"], 1200, tmp_path)
    _assert_out_of_memory(proc, tmp_path)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc"),
                                   ImportError("libgomp.so.1: failed to map segment from shared object")])
def test_memory_errors_anywhere_end_as_out_of_memory(error, mlp_model, mlp_calib, tmp_path, capsys, monkeypatch):
    from graphresize import pipeline

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "make_session", fail)
    code, err = _run(capsys, ["optimize", mlp_model, "-o", tmp_path / "o.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS])
    assert code == 1 and err.startswith("graphresize: error: out of memory"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_public_attention_weight_keeps_its_heads(llama_dynamo, calib_tokens, tmp_path, capsys):
    """Layer 0's query weight (val_79, 64x64 in the tiny Llama) listed as a graph input: with
    --ratio-heads its layer keeps every head, the public input keeps its shape, layer 1 loses heads."""
    model = onnx.load(llama_dynamo)
    init = next(t for t in model.graph.initializer if t.name == "val_79")
    assert list(init.dims) == [64, 64]
    model.graph.input.append(helper.make_tensor_value_info("val_79", init.data_type, list(init.dims)))
    src = tmp_path / "public.onnx"
    onnx.save(model, src)
    out = tmp_path / "o.onnx"
    code, err = _run(capsys, ["optimize", src, "-o", out, "--ratio", "0", "--ratio-heads", "0.5", "--calib", calib_tokens,
                              "--tokens", "512", "--seq-len", "16", "-q"])
    assert code == 0, err
    new = onnx.load(out)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in new.graph.input}
    assert shapes["val_79"] == [64, 64]
    assert {t.name: list(t.dims) for t in new.graph.initializer}["val_79"] == [64, 64]
    before = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert sum(int(np.prod(t.dims)) for t in new.graph.initializer) < before  # the other layer lost heads
