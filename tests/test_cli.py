"""The command line: exit codes, one-line errors, untouched inputs, reports."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphresize
from graphresize.cli.main import main
from graphresize.io.modelio import file_sha256
from tests.models import run_cli


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 200, size=8000))
    return path


def test_optimize_writes_model_and_report(llama_dynamo, calib, tmp_path, capsys):
    digest = file_sha256(llama_dynamo)
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    code, _, err = run_cli(
        ["optimize", llama_dynamo, "--ratio", "0.3", "--allocation", "uniform", "-o", out, "--calib", calib, "--tokens", "1024", "--seq-len", "32", "--report", report],
        capsys,
    )
    assert code == 0, err
    assert file_sha256(llama_dynamo) == digest  # the input is never touched
    onnx.checker.check_model(onnx.load(out))  # unfused by default: a plain ONNX graph
    data = json.loads(report.read_text())
    assert data["output"]["sha256"] == file_sha256(out)
    assert data["calibration"]["tokens"] == 1024
    mlps = [g for g in data["groups"] if g["kind"] == "mlp"]
    assert [g["new_width"] for g in mlps] == [88, 88]
    assert "parameters:" in err


def test_analyze_lists_groups(llama_dynamo, capsys):
    code, out, _ = run_cli(["analyze", llama_dynamo], capsys)
    assert code == 0
    assert "mlp.0" in out and "mlp.1" in out and "residual.0" in out
    code, out, _ = run_cli(["analyze", llama_dynamo, "--json"], capsys)
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
     ("quantized", 3, "resize before quantizing"), ("no_mlp", 3, "no mlp width group found")],
)
def test_bad_models_fail_cleanly(kind, code, message, tmp_path, calib, capsys, llama_dynamo):
    path = _bad_model(tmp_path, kind, llama_dynamo)
    digest = file_sha256(path)
    out = tmp_path / "out.onnx"
    got, _, err = run_cli(["optimize", path, "--ratio", "0.3", "-o", out, "--calib", calib], capsys)
    assert got == code
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and file_sha256(path) == digest


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--ratio", "1.0"], 2, "--ratio must be in [0, 1)"),
        (["--ratio", "-0.1"], 2, "--ratio must be in [0, 1)"),
        (["--ratio", "0.3", "--calib", "missing.txt"], 1, "calibration file not found"),
        (["--ratio", "0.3"], 1, "no tokenizer.json in"),  # the shipped text needs the model's tokenizer
        (["--ratio", "abc"], 2, "invalid float value"),
    ],
)
def test_bad_options_fail_cleanly(args, code, message, llama_dynamo, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    got, _, err = run_cli(["optimize", llama_dynamo, "-o", out, *args], capsys) if "abc" not in args else _argparse(llama_dynamo, out, args, capsys)
    assert got == code
    assert message in err
    assert not out.exists()


def _argparse(model, out, args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize", str(model), "-o", str(out), *args])
    _, err = capsys.readouterr()
    return info.value.code, "", err


def test_output_path_rules(llama_dynamo, calib, tmp_path, capsys):
    code, _, err = run_cli(["optimize", llama_dynamo, "--ratio", "0.3", "-o", llama_dynamo, "--calib", calib], capsys)
    assert code == 1 and "is the input model" in err
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep me")
    code, _, err = run_cli(["optimize", llama_dynamo, "--ratio", "0.3", "-o", existing, "--calib", calib], capsys)
    assert code == 1 and "already exists" in err and existing.read_bytes() == b"keep me"
    code, _, err = run_cli(["optimize", llama_dynamo, "--ratio", "0.3", "-o", tmp_path / "nodir" / "x.onnx", "--calib", calib], capsys)
    assert code == 1 and "does not exist" in err


def test_missing_model_and_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "graphresize", "analyze", str(tmp_path / "nope.onnx")], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"graphresize: error: {tmp_path / 'nope.onnx'}: no such file"


def test_eval_and_bench(llama_dynamo, calib, tmp_path, capsys):
    code, out, err = run_cli(["eval", llama_dynamo, "--text", calib, "--seq-len", "32", "--max-tokens", "256", "--json", "-q"], capsys)
    assert code == 0, err
    result = json.loads(out)
    # Random weights over a 256-token vocabulary: perplexity near the vocabulary size.
    assert result["tokens"] == 8 * 31 and 50 < result["value"] < 2000
    code, out, err = run_cli(["bench", llama_dynamo, llama_dynamo, "--runs", "3", "--seq", "16", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)) == 1  # the same path twice is one entry
    code, _, err = run_cli(["eval", llama_dynamo, "--text", tmp_path / "none.txt"], capsys)
    assert code == 1 and err.strip() == f"graphresize: error: {tmp_path / 'none.txt'}: file not found"


# --------------------------------------------------------------------------- pipeline steps


def _optimize_argv(model, out, calib, *extra):
    return ["optimize", model, "-o", out, "--calib", calib, "--seq-len", "32", "--allocation", "uniform", *extra]


def test_config_run_report_and_replay(llama_dynamo, calib, tmp_path, capsys):
    cfg = tmp_path / "resize.toml"
    cfg.write_text(f'ratio = 0.3\nallocation = "uniform"\ntokens = 4096\nseed = 7\nholdout_windows = 3\nmodel = "{llama_dynamo}"\n')
    out = tmp_path / "small.onnx"
    code, _, err = run_cli(["optimize", "-o", out, "--calib", calib, "--seq-len", "32", "--tokens", "1024", "--config", cfg], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "small.report.json").read_text())  # OUT.report.json by default
    assert data["status"] == "ok" and data["input"]["sha256"] == file_sha256(llama_dynamo)
    assert data["output"]["sha256"] == file_sha256(out) and data["output"]["files"][0]["sha256"] == file_sha256(out)
    assert data["calibration"]["tokens"] == 1024  # --tokens on the command line beats the file's 4096
    assert data["verification"]["windows"] == 3 and data["verification"]["tokens"] == 96  # holdout_windows from the file
    assert data["verification"]["relative_error"] > 0 and 0 <= data["verification"]["top1_agreement"] <= 1
    assert data["options"]["seed"] == 7 and data["options"]["ratio"] == 0.3
    assert data["versions"]["onnxruntime"] and data["versions"]["graphresize"]
    assert data["timings_s"]["total"] > 0 and {"calibrate", "solve", "verify", "save"} <= set(data["timings_s"])
    assert [(p["layer"], p["widths"]["mlp"][0]["before"], p["widths"]["mlp"][0]["after"]) for p in data["profile"]] == [(0, 128, 88), (1, 128, 88)]
    assert {"kind": "mlp", "groups": 2, "resized": 2, "frozen": 0, "before": "128", "after": "88"} in data["summary"]
    effective = data["config"]
    assert effective["file"] == str(cfg)
    assert effective["sources"]["tokens"] == "cli" and effective["sources"]["seed"] == "config"
    assert effective["sources"]["batch_size"] == "default"
    assert "mlp" in err and "parameters:" in err and "hold-out:" in err and "small.report.json" in err

    # The effective config alone reproduces the run, byte for byte.
    replay = tmp_path / "replay.json"
    settings = {**effective["settings"], "output": str(tmp_path / "again.onnx"), "report": None}
    replay.write_text(json.dumps(settings))
    code, _, err = run_cli(["optimize", "--config", replay, "-q"], capsys)
    assert code == 0, err
    assert file_sha256(tmp_path / "again.onnx") == file_sha256(out)


def test_json_on_stdout_and_no_report(llama_dynamo, calib, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    code, stdout, err = run_cli([*_optimize_argv(llama_dynamo, out, calib, "--ratio", "0.3", "--tokens", "512", "--json", "--no-report", "-q")], capsys)
    assert code == 0, err
    assert json.loads(stdout)["output"]["path"] == str(out)
    assert err == "" and not (tmp_path / "small.report.json").exists()


@pytest.mark.parametrize(
    ("gate", "message"),
    [(["--verify-tolerance", "0"], "> --verify-tolerance 0"), (["--min-top1", "1.0"], "< --min-top1 1")],
)
def test_quality_gate_fails_step(llama_dynamo, calib, tmp_path, capsys, gate, message):
    out = tmp_path / "small.onnx"
    code, stdout, err = run_cli(_optimize_argv(llama_dynamo, out, calib, "--ratio", "0.5", "--tokens", "512", "-q", *gate), capsys)
    assert code == 4
    assert message in err and "nothing written" in err and len(err.strip().splitlines()) == 1
    assert stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == []


def test_quality_gate_passes(llama_dynamo, calib, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    code, _, err = run_cli(_optimize_argv(llama_dynamo, out, calib, "--ratio", "0", "--tokens", "512", "--verify-tolerance", "1e-4", "--min-top1", "0.99"), capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "small.report.json").read_text())
    assert data["verification"]["verify_tolerance"] == 1e-4 and data["verification"]["min_top1"] == 0.99
    assert "passed tolerance 0.0001, min top-1 0.99" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--verify-tolerance", "-1"], "--verify-tolerance must be"),
        (["--min-top1", "1.5"], "--min-top1 must be in [0, 1]"),
        (["--provider", "tpu"], "invalid choice"),
    ],
)
def test_gate_and_provider_usage_errors(llama_dynamo, calib, tmp_path, capsys, args, message):
    argv = _optimize_argv(llama_dynamo, tmp_path / "o.onnx", calib, "--ratio", "0.3", *args)
    code = _argparse_or_run(argv, capsys)
    assert code[0] == 2 and message in code[1]
    assert not (tmp_path / "o.onnx").exists()


def _argparse_or_run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_provider_cuda_unavailable_is_clear(llama_dynamo, calib, tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(_optimize_argv(llama_dynamo, out, calib, "--ratio", "0.3", "--provider", "cuda"), capsys)
    assert code == 2 and "CUDAExecutionProvider is not available" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, _, err = run_cli(["bench", llama_dynamo, "--provider", "cuda", "--runs", "1"], capsys)
    assert code == 2 and "CUDAExecutionProvider is not available" in err


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny LlamaForCausalLM saved with save_pretrained, and a word-level tokenizer."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_export_model_dir(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "onnx" / "model.onnx"
    code, stdout, err = run_cli(["export", tiny_hf_dir, "-o", out, "--no-optimize", "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["exporter"] == "dynamo" and result["fallback_from"] == []
    assert result["inputs"] == ["input_ids", "attention_mask"]
    assert (out.parent / "tokenizer.json").is_file() and (out.parent / "config.json").is_file()
    onnx.checker.check_model(onnx.load(out))
    code, _, err = run_cli(["export", tiny_hf_dir, "-o", out], capsys)
    assert code == 1 and "already exists" in err


def test_export_falls_back_to_legacy(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    import graphresize.io.capture as capture

    real = capture.export_onnx

    def dynamo_fails(model_dir, out, *, style, **kw):
        if style == "dynamo":
            raise RuntimeError("simulated dynamo failure")
        return real(model_dir, out, style=style, **kw)

    monkeypatch.setattr(capture, "export_onnx", dynamo_fails)
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli(["export", tiny_hf_dir, "-o", out, "--with-past", "--opset", "17", "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["exporter"] == "legacy" and "simulated dynamo failure" in result["fallback_from"][0]
    assert "falling back to the legacy exporter" in err
    assert "past_key_values.0.key" in result["inputs"]
    assert onnx.load(out).opset_import[0].version == 17


def test_export_errors(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["export", tmp_path / "nodir", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 1 and "no such model directory" in err
    code, _, err = run_cli(["export", tmp_path, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 1 and "no config.json" in err
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    code, _, err = run_cli(["export", tiny_hf_dir, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "pip install 'graphresize[export]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_export_refuses_a_fifo_output(extra, tiny_hf_dir, tmp_path, capsys):
    import os
    import stat

    out = tmp_path / "m.onnx"
    os.mkfifo(out)
    code, _, err = run_cli(["export", tiny_hf_dir, "-o", out, *extra], capsys)
    assert code == 1 and "is not a regular file (a named pipe)" in err, err
    assert stat.S_ISFIFO(os.stat(out).st_mode)


def test_sidecars_follow_the_output(llama_dynamo, calib, tmp_path, capsys):
    src = tmp_path / "dense"
    src.mkdir()
    model = src / "model.onnx"
    model.write_bytes(llama_dynamo.read_bytes())
    (src / "tokenizer.json").write_text("{}")
    (src / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx", "hidden_size": 64}}}))
    out_dir = tmp_path / "small"
    out_dir.mkdir()
    out = out_dir / "model.small.onnx"
    # MLP widths only: genai_config.json records no MLP width, so it stays valid
    code, _, err = run_cli([*_optimize_argv(model, out, calib, "--ratio", "0", "--ratio-mlp", "0.3", "--tokens", "512", "-q")], capsys)
    assert code == 0, err
    assert (out_dir / "tokenizer.json").read_text() == "{}"
    genai = json.loads((out_dir / "genai_config.json").read_text())
    assert genai["model"]["decoder"] == {"filename": "model.small.onnx", "hidden_size": 64}
    data = json.loads((out_dir / "model.small.report.json").read_text())
    assert sorted(Path(p).name for p in data["output"]["sidecars"]["written"]) == ["genai_config.json", "tokenizer.json"]
    other = tmp_path / "bare"
    other.mkdir()
    code, _, err = run_cli([*_optimize_argv(model, other / "m.onnx", calib, "--ratio", "0.3", "--tokens", "512", "-q", "--no-sidecars")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in other.iterdir()) == ["m.onnx", "m.report.json"]


def test_config_json_gets_the_new_sizes(llama_dynamo, calib, tmp_path, capsys):
    """config.json beside the output describes the narrowed model: MLP and hidden width,
    head counts, and an explicit head_dim (hidden ÷ heads no longer gives it)."""
    src = tmp_path / "dense"
    src.mkdir()
    model = src / "model.onnx"
    model.write_bytes(llama_dynamo.read_bytes())
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "small" / "m.onnx"
    out.parent.mkdir()
    code, _, err = run_cli([*_optimize_argv(model, out, calib, "--ratio", "0.25", "--target", "all", "--ratio-heads", "0.5", "--tokens", "512", "-q")], capsys)
    assert code == 0, err
    written = json.loads((out.parent / "config.json").read_text())
    assert written == {**config, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    widths = {g.kind: g.width for g in graphresize.analyze(out) if g.kind in ("mlp", "residual")}
    assert widths == {"mlp": 96, "residual": 48}


def test_config_json_keeps_sizes_that_differ_per_layer():
    from graphresize.io.sidecars import hf_config_edits

    config = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "head_dim": 16}
    edits, notes = hf_config_edits(config, {"mlp": [(128, 96), (128, 64)]}, "head counts differ per layer (2/1, 4/2)")
    assert edits == {} and notes == ["intermediate_size left at 128 (mlp widths differ per layer: 64-96)",
                                     "head counts left as they were (head counts differ per layer (2/1, 4/2))"]
    edits, _ = hf_config_edits({"n_embd": 64, "n_inner": None, "n_head": 4}, {"residual": [(64, 48)]}, None)
    assert edits == {"n_embd": 48, "head_dim": 16}
