"""``graphresize optimize model.onnx --ratio R`` with nothing else: the default recipe, the
default output name, the shipped calibration text, and the quality warning (issue 14)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from graphresize.calibrate import tokens
from graphresize.cli.main import build_parser
from graphresize.cli.options import default_output_path
from graphresize.io.modelio import file_sha256
from graphresize.methods.defaults import DEFAULT_RECIPE
from graphresize.verify import estimate
from tests.models import run_cli

FAST = ["--tokens", "1024", "--seq-len", "32", "--batch-size", "8"]


def _char_tokenizer(folder):
    """A character-level tokenizer.json (a-z, A-Z, digits, some punctuation: ids 1..72, unknown 0),
    so English text tokenises inside the tiny models' 256-word vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:()'-"
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture
def model_dir(tmp_path, llama_dynamo):
    """A copy of the tiny Llama in a folder of its own, with a tokenizer beside it."""
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(llama_dynamo, folder / "model.onnx")
    _char_tokenizer(folder)
    return folder


def test_default_output_name_rule(tmp_path):
    assert default_output_path(tmp_path / "model.onnx", 0.3).name == "model.r30.onnx"
    assert default_output_path(tmp_path / "m.onnx", 0.125).name == "m.r12.5.onnx"
    assert default_output_path(tmp_path / "m.onnx", 0.05).name == "m.r5.onnx"


def test_ratio_alone_writes_beside_input_with_shipped_text_and_recipe(model_dir, capsys):
    """No -o, no --calib, no method flags: model.r30.onnx beside the input, calibrated on the
    shipped text, cut by the default recipe (MLP only: the residual width stays 64)."""
    model = model_dir / "model.onnx"
    digest = file_sha256(model)
    code, _, err = run_cli(["optimize", model, "--ratio", "0.3", *FAST], capsys)
    assert code == 0, err
    out = model_dir / "model.r30.onnx"
    assert out.is_file() and file_sha256(model) == digest
    assert f"output: {out} (no -o given)" in err and f"wrote:       {out}" in err
    data = json.loads((model_dir / "model.r30.report.json").read_text())
    assert data["calibration"]["source"] == tokens.DEFAULT_CALIB_SOURCE
    assert data["calibration"]["tokens"] == 1024
    assert {(g["width"], g["new_width"]) for g in data["groups"] if g["kind"] == "residual"} == {(64, 64)}
    assert all(g["new_width"] < g["width"] == 128 for g in data["groups"] if g["kind"] == "mlp")
    assert data["options"]["method"] == "prune" and data["options"]["target"] == "mlp"
    assert data["options"]["allocation"] == "global" and data["options"]["engine"] == "segment"
    sources = data["config"]["sources"]
    assert sources["method"] == sources["target"] == sources["allocation"] == sources["engine"] == "recipe"
    assert sources["ratio"] == "cli"
    # --ratio 0.3 is the share of the transformer-block parameters removed (global allocation's budget),
    # overshooting by less than one step of whole neurons in one MLP (3 matrices x 64 rows/cols)
    alloc = data["allocation"]
    removed = data["parameters"]["before"] - data["parameters"]["after"]
    assert removed == alloc["removed"] and 0.3 * alloc["block_params"] <= removed < 0.3 * alloc["block_params"] + 3 * 64 * 8
    # the report states what was removed and the hold-out quality in plain terms
    assert 0 < data["flops_per_token"]["removed"] < 1
    q = data["quality"]
    assert 0 <= q["top1_agreement"] <= 1 and q["perplexity_before"] > 1 and q["perplexity_after"] > 1
    assert "picks the original's next token at" in err and "perplexity" in err and "recipe:" in err

    # a second identical run never overwrites: one-line error naming -o and --overwrite, exit 1
    mtime = out.stat().st_mtime_ns
    code, _, err = run_cli(["optimize", model, "--ratio", "0.3", *FAST], capsys)
    assert code == 1
    assert err.strip().count("\n") == 0 and "already exists" in err and "-o/--output" in err and "--overwrite" in err
    assert out.stat().st_mtime_ns == mtime


def test_shipped_text_is_package_data_and_not_the_heldout_tail():
    text = tokens.default_calibration().read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert 200_000 < len(text.encode()) < 600_000 and len(paragraphs) == 905
    assert "905" in tokens.DEFAULT_CALIB_SOURCE


def test_missing_tokenizer_is_one_line_error(tmp_path, llama_dynamo, capsys):
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(llama_dynamo, folder / "model.onnx")
    code, _, err = run_cli(["optimize", folder / "model.onnx", "--ratio", "0.3", *FAST], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("graphresize: error: no tokenizer.json in") and "--tokenizer DIR" in lines[-1]
    assert "--calib ids.npy" in lines[-1] and "default calibration text" in lines[-1]
    assert not (folder / "model.r30.onnx").exists()


def test_recipe_only_where_flags_are_absent(model_dir, capsys, calib_tokens):
    model = model_dir / "model.onnx"
    out = model_dir / "all.onnx"
    code, _, err = run_cli(["optimize", model, "--ratio", "0.2", "-o", out, "--calib", calib_tokens, "--method", "dotresize",
                            "--target", "all", *FAST, "--report", model_dir / "all.json"], capsys)
    assert code == 0, err
    data = json.loads((model_dir / "all.json").read_text())
    assert data["options"]["method"] == "dotresize" and data["options"]["target"] == "all"
    assert data["config"]["sources"]["method"] == "cli" and "recipe:" not in err
    assert any(g["kind"] == "residual" and g["new_width"] < g["width"] for g in data["groups"])
    # --method given alone: the recipe still fills --target (prune runs on mlp) ...
    code, _, err = run_cli(["optimize", model, "--ratio", "0.2", "-o", model_dir / "p.onnx", "--calib", calib_tokens,
                            "--method", "dotresize", *FAST, "--report", model_dir / "p.json"], capsys)
    assert code == 0, err
    data = json.loads((model_dir / "p.json").read_text())
    assert data["options"]["target"] == "mlp" and data["config"]["sources"]["target"] == "recipe"
    # ... unless that method refuses it (disp cuts the stream): then the flag default, all
    parser = build_parser()
    args = parser.parse_args(argv := ["optimize", str(model), "--ratio", "0.2", "--method", "disp"])
    args.argv = argv
    from graphresize.cli import options as cliopts

    cliopts.prepare(args, parser)
    assert args.target == "all" and args.method == "disp"


@pytest.mark.parametrize("extra", [["--target", "all"], ["--ratio-mlp", "0.5"]])
def test_recipe_allocation_only_for_mlp_runs(model_dir, extra):
    """The recipe's global allocation places MLP widths under one budget: a run that cuts more
    than the MLPs or sets a per-kind width ratio gets the flag default (uniform)."""
    from graphresize.cli import options as cliopts

    parser = build_parser()
    args = parser.parse_args(argv := ["optimize", str(model_dir / "model.onnx"), "--ratio", "0.2", *extra])
    args.argv = argv
    merge = cliopts.prepare(args, parser)
    assert args.allocation == "uniform" and "allocation" not in merge.sources
    assert args.engine == "whole" and "engine" not in merge.sources
    assert not {"allocation", "engine"} & set(args.recipe.settings if args.recipe else {})
    args = parser.parse_args(argv := ["optimize", str(model_dir / "model.onnx"), "--ratio", "0.2"])
    args.argv = argv
    merge = cliopts.prepare(args, parser)
    assert args.allocation == "global" and merge.sources["allocation"] == "recipe"
    assert args.engine == "segment" and merge.sources["engine"] == "recipe"


@pytest.mark.parametrize("extra", [["--ratio-heads", "0.25"], ["--stats-cache", "stats"], ["--engine", "whole"]])
def test_recipe_engine_only_without_whole_model_statistics(model_dir, extra):
    """Head removal and the statistics cache read whole-model statistics: the recipe's segment
    engine is dropped (its global allocation kept); an explicit --engine wins."""
    from graphresize.cli import options as cliopts

    parser = build_parser()
    args = parser.parse_args(argv := ["optimize", str(model_dir / "model.onnx"), "--ratio", "0.2", *extra])
    args.argv = argv
    merge = cliopts.prepare(args, parser)
    assert args.engine == "whole" and merge.sources.get("engine") in (None, "cli")
    assert args.allocation == "global" and merge.sources["allocation"] == "recipe"


def test_recipe_keys_are_optimize_flags():
    from graphresize.cli.config import subparser

    dests = {a.dest for a in subparser(build_parser(), "optimize")._actions}
    assert set(DEFAULT_RECIPE.settings) <= dests
    assert DEFAULT_RECIPE.settings["method"] == "prune" and DEFAULT_RECIPE.settings["target"] == "mlp"
    assert DEFAULT_RECIPE.settings["allocation"] == "global"


def test_low_agreement_warns_with_estimated_smaller_ratio(model_dir, capsys):
    """Ratio 0.85 of every width of the tiny random model: top-1 falls below 0.6, and the warning names a
    smaller ratio with its estimated agreement, said to be an estimate."""
    model = model_dir / "model.onnx"
    out = model_dir / "tiny.onnx"
    code, _, err = run_cli(["optimize", model, "--ratio", "0.85", "--target", "all", "-o", out, *FAST, "--report", model_dir / "w.json"], capsys)
    assert code == 0, err
    data = json.loads((model_dir / "w.json").read_text())
    q = data["quality"]
    assert q["top1_agreement"] < 0.6 and q["warning"]
    hint = q["suggested_ratio"]
    assert hint["estimate"] and hint["basis"] == "lost-energy"
    assert hint["ratio"] is not None and 0 < hint["ratio"] < 0.85 and hint["estimated_top1"] >= 0.6
    warning = next(line for line in err.splitlines() if line.startswith("warning: top-1 agreement"))
    assert f"--ratio {hint['ratio']:g} is estimated to reach" in warning and "an estimate" in warning


def test_lost_energy_curve_is_exact_least_squares_residual():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) * rng.uniform(0.2, 3, size=12)
    gram = a.T @ a
    curve = estimate.lost_energy_curve(gram)
    order = np.argsort(-np.diag(gram))
    for k in (0, 3, 7, 12):
        keep, drop = order[:k], order[k:]
        if k:
            coef, *_ = np.linalg.lstsq(a[:, keep], a[:, drop], rcond=None)
            lost = np.square(a[:, drop] - a[:, keep] @ coef).sum()
        else:
            lost = np.square(a).sum()
        assert curve[k] == pytest.approx(lost / np.trace(gram), rel=1e-6, abs=1e-9)


def test_suggest_ratio_rule():
    curve = np.linspace(1.0, 0.0, 101) ** 2  # lost share falls quadratically with kept features
    # at ratio 0.5 (50 of 100 removed) lost = 0.25, top-1 0.4; candidate r': lost = (r')², so
    # ln top1(r') = ln 0.4 · r'/0.5, and top-1 >= 0.6 needs r' <= 0.5·ln 0.6/ln 0.4 = 0.279
    hint = estimate.suggest_ratio(0.4, 0.5, [(curve, 100, 50)])
    assert hint.ratio == 0.25 and hint.estimated_top1 == pytest.approx(0.4 ** (0.25 / 0.5))
    assert estimate.suggest_ratio(0.5, 0.3, []).basis == "linear"
    assert estimate.candidates(0.3) == [0.25, 0.2, 0.15, 0.1, 0.05] and estimate.candidates(0.04) == [0.02]


def test_suggested_ratio_measures_better(model_dir, capsys):
    """The estimate points the right way: a run at the suggested ratio agrees more."""
    model = model_dir / "model.onnx"
    args = ["--target", "all", *FAST]
    code, _, err = run_cli(["optimize", model, "--ratio", "0.85", "-o", model_dir / "a.onnx", *args, "--report", model_dir / "a.json"], capsys)
    assert code == 0, err
    first = json.loads((model_dir / "a.json").read_text())["quality"]
    suggested = first["suggested_ratio"]["ratio"]
    code, _, err = run_cli(["optimize", model, "--ratio", str(suggested), "-o", model_dir / "b.onnx", *args, "--report", model_dir / "b.json"], capsys)
    assert code == 0, err
    second = json.loads((model_dir / "b.json").read_text())["quality"]
    assert second["top1_agreement"] > first["top1_agreement"] + 0.1
    print(f"ratio 0.85: top-1 {first['top1_agreement']:.3f}; suggested {suggested}: estimated "
          f"{first['suggested_ratio']['estimated_top1']:.3f}, measured {second['top1_agreement']:.3f}")
