"""The command line: exit codes, one-line errors, untouched inputs, reports."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphresize.cli import main
from graphresize.modelio import file_sha256


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 200, size=8000))
    return path


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_writes_model_and_report(llama_dynamo, calib, tmp_path, capsys):
    digest = file_sha256(llama_dynamo)
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    code, _, err = _run(
        ["optimize", llama_dynamo, "--ratio", "0.3", "-o", out, "--calib", calib, "--tokens", "1024", "--seq-len", "32", "--report", report],
        capsys,
    )
    assert code == 0, err
    assert file_sha256(llama_dynamo) == digest  # the input is never touched
    onnx.checker.check_model(onnx.load(out))
    data = json.loads(report.read_text())
    assert data["output"]["sha256"] == file_sha256(out)
    assert data["calibration"]["tokens"] == 1024
    mlps = [g for g in data["groups"] if g["kind"] == "mlp"]
    assert [g["new_width"] for g in mlps] == [88, 88]
    assert "parameters:" in err


def test_analyze_lists_groups(llama_dynamo, capsys):
    code, out, _ = _run(["analyze", llama_dynamo], capsys)
    assert code == 0
    assert "mlp.0" in out and "mlp.1" in out and "residual.0" in out
    code, out, _ = _run(["analyze", llama_dynamo, "--json"], capsys)
    kinds = [g["kind"] for g in json.loads(out)]
    assert kinds.count("mlp") == 2


def _bad_model(tmp_path, kind, source):
    path = tmp_path / f"{kind}.onnx"
    if kind == "truncated":
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "not_onnx":
        path.write_text("hello, I am not a model\n" * 20)
    elif kind == "quantized":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ]
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.UINT8, [], [0])]
        onnx.save(helper.make_model(helper.make_graph(nodes, "q", [x], [y], inits)), path)
    elif kind == "no_mlp":
        x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["b", 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])
        w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12).tolist())
        onnx.save(helper.make_model(helper.make_graph([helper.make_node("MatMul", ["input_ids", "w"], ["y"])], "g", [x], [y], [w])), path)
    return path


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [("truncated", 1, "not a readable ONNX model"), ("not_onnx", 1, "not a readable ONNX model"),
     ("quantized", 3, "resize before quantizing"), ("no_mlp", 3, "group is frozen (graph input")],
)
def test_bad_models_fail_cleanly(kind, code, message, tmp_path, calib, capsys, llama_dynamo):
    path = _bad_model(tmp_path, kind, llama_dynamo)
    digest = file_sha256(path)
    out = tmp_path / "out.onnx"
    got, _, err = _run(["optimize", path, "--ratio", "0.3", "-o", out, "--calib", calib], capsys)
    assert got == code
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and file_sha256(path) == digest


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--ratio", "1.0"], 2, "--ratio must be in [0, 1)"),
        (["--ratio", "-0.1"], 2, "--ratio must be in [0, 1)"),
        (["--ratio", "0.3", "--calib", "missing.txt"], 1, "calibration file not found"),
        (["--ratio", "0.3"], 2, "calibration data is required"),
        (["--ratio", "abc"], 2, "invalid float value"),
    ],
)
def test_bad_options_fail_cleanly(args, code, message, llama_dynamo, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    got, _, err = _run(["optimize", llama_dynamo, "-o", out, *args], capsys) if "abc" not in args else _argparse(llama_dynamo, out, args, capsys)
    assert got == code
    assert message in err
    assert not out.exists()


def _argparse(model, out, args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize", str(model), "-o", str(out), *args])
    _, err = capsys.readouterr()
    return info.value.code, "", err


def test_output_path_rules(llama_dynamo, calib, tmp_path, capsys):
    code, _, err = _run(["optimize", llama_dynamo, "--ratio", "0.3", "-o", llama_dynamo, "--calib", calib], capsys)
    assert code == 1 and "is the input model" in err
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep me")
    code, _, err = _run(["optimize", llama_dynamo, "--ratio", "0.3", "-o", existing, "--calib", calib], capsys)
    assert code == 1 and "already exists" in err and existing.read_bytes() == b"keep me"
    code, _, err = _run(["optimize", llama_dynamo, "--ratio", "0.3", "-o", tmp_path / "nodir" / "x.onnx", "--calib", calib], capsys)
    assert code == 1 and "does not exist" in err


def test_missing_model_and_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "graphresize", "analyze", str(tmp_path / "nope.onnx")], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"graphresize: error: {tmp_path / 'nope.onnx'}: no such file"


def test_eval_and_bench(llama_dynamo, calib, tmp_path, capsys):
    code, out, err = _run(["eval", llama_dynamo, "--text", calib, "--seq-len", "32", "--max-tokens", "256", "--json", "-q"], capsys)
    assert code == 0, err
    result = json.loads(out)
    # Random weights over a 256-token vocabulary: perplexity near the vocabulary size.
    assert result["tokens"] == 8 * 31 and 50 < result["value"] < 2000
    code, out, err = _run(["bench", llama_dynamo, llama_dynamo, "--runs", "3", "--seq", "16", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)) == 1  # the same path twice is one entry
    code, _, err = _run(["eval", llama_dynamo, "--text", tmp_path / "none.txt"], capsys)
    assert code == 1 and err.strip() == f"graphresize: error: {tmp_path / 'none.txt'}: file not found"
