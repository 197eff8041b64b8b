"""Evaluation and benchmark tools: eval --reference, bench --decode, benchmarks/run.py."""

import json
from pathlib import Path

import numpy as np
import pytest

from graphresize.errors import UnsupportedModelError
from graphresize.io.modelio import load_model
from graphresize.io.ort_utils import make_session
from graphresize.verify.evaluate import (
    DECODE_KV,
    DECODE_REGROW,
    cache_io,
    decode_latency,
    weight_flops_per_token,
)
from graphresize.verify.flops import decode_flops_per_token, matmul_flops
from tests.models import load_script, run_cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "ids.npy"
    np.save(path, np.random.default_rng(1).integers(0, 200, size=6000))
    return path


def test_eval_reference_against_itself(llama_dynamo, ids, capsys):
    code, out, err = run_cli(
        ["eval", llama_dynamo, "--text", ids, "--seq-len", "32", "--max-tokens", "256", "--reference", llama_dynamo, "--json", "-q"], capsys
    )
    assert code == 0, err
    data = json.loads(out)
    ref = data["reference"]
    assert ref["top1"] == 1.0 and abs(ref["kl"]) < 1e-6
    assert ref["tokens"] == data["tokens"] == 8 * 31
    assert ref["reference_perplexity"] == pytest.approx(data["value"], rel=1e-6)
    code, out, _ = run_cli(["eval", llama_dynamo, "--text", ids, "--seq-len", "32", "--max-tokens", "64", "--reference", llama_dynamo, "-q"], capsys)
    assert code == 0 and "top-1 agreement 100.00%" in out


def test_eval_reference_differs_after_optimize(llama_dynamo, ids, tmp_path, capsys):
    small = tmp_path / "small.onnx"
    code, _, err = run_cli(["optimize", llama_dynamo, "--ratio", "0.5", "-o", small, "--calib", ids, "--tokens", "512", "--seq-len", "32", "-q"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", small, "--text", ids, "--seq-len", "32", "--max-tokens", "256", "--reference", llama_dynamo, "--json", "-q"], capsys)
    assert code == 0, err
    ref = json.loads(out)["reference"]
    assert 0.0 <= ref["top1"] < 1.0 and ref["kl"] > 1e-4
    flops = weight_flops_per_token(load_model(small)), weight_flops_per_token(load_model(llama_dynamo))
    assert 0 < flops[0] < flops[1]


def test_flops_count_weight_matmuls(llama_dynamo):
    # hidden 64, MLP 128, 2 layers, 4 heads / 2 KV heads (head 16), vocabulary 256
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    assert weight_flops_per_token(load_model(llama_dynamo)) == 2 * (2 * per_layer + 64 * 256)


# Tiny Llama: 2 layers, 4 query heads of 16 (2 KV heads); weight FLOPs per token 180,224.
LAYERS, HEADS, HEAD = 2, 4, 16


def _attention_flops(batch: int, new: int, context: int) -> int:
    """Q·Kᵀ and scores·V of every layer: 2 products × 2·S·T·head per query head."""
    return 2 * 2 * batch * new * context * HEAD * HEADS * LAYERS


@pytest.mark.parametrize("fixture", ["llama_dynamo", "llama_legacy", "llama_optimum", "llama_genai"])
def test_matmul_flops_closed_form(fixture, request):
    """Every matrix product at real sizes: the weight products (= weight_flops_per_token per
    token) plus attention's two activation products, in the unfused exports (MatMul), the
    TorchScript ones and onnxruntime-genai's GroupQueryAttention alike."""
    model = load_model(request.getfixturevalue(fixture))
    weight = weight_flops_per_token(model)
    assert weight == 180_224
    runs = [(1, 8, 0), (3, 5, 0)]
    has_past = fixture in ("llama_optimum", "llama_genai")
    if has_past:
        runs += [(1, 1, 8), (2, 1, 20)]
    counted = matmul_flops(model, runs)
    for found, (batch, seq, past) in zip(counted, runs, strict=True):
        assert found.weight == weight * batch * seq
        assert found.activation == _attention_flops(batch, seq, past + seq)
        assert found.total == found.weight + found.activation
    assert counted[0].per_token == 180_224 + 2 * 2 * 8 * HEAD * HEADS * LAYERS == 184_320
    if fixture == "llama_genai":
        assert counted[0].by_op["GroupQueryAttention"] == counted[0].activation
    if has_past:  # mean over steps 0..3 after an 8-token prompt: contexts 9..12
        assert decode_flops_per_token(model, prompt_len=8, steps=4) == weight + _attention_flops(1, 1, 10.5)
    else:
        with pytest.raises(UnsupportedModelError):
            decode_flops_per_token(model, prompt_len=8, steps=4)
    assert all(node.name for node in model.graph)  # names given for ORT's profile are put back...
    assert len({node.name for node in model.graph}) <= len(list(model.graph))


def test_matmul_flops_fused_and_resized(llama_dynamo, llama_optimum, ids, tmp_path, capsys):
    """``optimize --ratio 0 --fuse`` moves attention into MultiHeadAttention (dynamo) or
    GroupQueryAttention (TorchScript with its KV cache) without changing the count; an MLP
    resize shrinks only the weight products."""
    for source, fused_op in ((llama_dynamo, "MultiHeadAttention"), (llama_optimum, "GroupQueryAttention")):
        fused = tmp_path / f"{source.stem}.fused.onnx"
        code, _, err = run_cli(["optimize", source, "--ratio", "0", "--fuse", "-o", fused, "-q"], capsys)
        assert code == 0, err
        plain, merged = (matmul_flops(load_model(p), [(2, 8, 0)])[0] for p in (source, fused))
        assert fused_op in merged.by_op and fused_op not in plain.by_op
        assert (merged.weight, merged.activation) == (plain.weight, plain.activation) == (2 * 8 * 180_224, _attention_flops(2, 8, 8))
    small = tmp_path / "small.onnx"
    code, _, err = run_cli(["optimize", llama_dynamo, "--ratio", "0.5", "--target", "mlp", "-o", small, "--calib", ids, "--tokens", "512", "--seq-len", "32", "-q"], capsys)
    assert code == 0, err
    resized = load_model(small)
    found = matmul_flops(resized, [(1, 8, 0)])[0]
    assert found.activation == _attention_flops(1, 8, 8)
    assert found.weight == 8 * weight_flops_per_token(resized) < 8 * 180_224


def test_bench_decode(llama_dynamo, llama_optimum, capsys):
    code, out, err = run_cli(
        ["bench", llama_dynamo, llama_optimum, "--runs", "4", "--warmup", "1", "--seq", "8", "--decode", "3", "--json"], capsys
    )
    assert code == 0, err
    data = json.loads(out)
    assert data[str(llama_dynamo)]["decode"]["mode"] == DECODE_REGROW
    assert data[str(llama_optimum)]["decode"]["mode"] == DECODE_KV
    for entry in data.values():
        assert entry["tokens_per_s"] > 0 and entry["decode"]["median_ms_per_token"] > 0 and entry["decode"]["steps"] == 3
    code, out, err = run_cli(["bench", llama_optimum, "--runs", "2", "--seq", "8", "--decode", "2"], capsys)
    assert code == 0, err
    assert "ms/token" in out and "kv-cache" in out


def test_latency_pauses_before_each_timed_run(llama_dynamo, monkeypatch):
    """Side-by-side timing waits ``settle_s`` before every timed run (not the warm-up ones),
    so one session's spinning workers do not slow the next."""
    from graphresize.verify import evaluate

    pauses, sleep = [], evaluate.time.sleep

    def record(seconds: float) -> None:  # other threads of the test process sleep too
        (pauses.append if seconds == 0.25 else sleep)(seconds)

    monkeypatch.setattr(evaluate.time, "sleep", record)
    sessions = {name: make_session(load_model(llama_dynamo)) for name in ("a", "b")}
    found = evaluate.latency(sessions, seq_len=4, runs=3, warmup=1, settle_s=0.25)
    assert pauses == [0.25] * 6 and all(len(r.times_ms) == 3 for r in found.values())


def test_kv_decode_matches_full_rerun(llama_optimum):
    """Greedy tokens from the cache path equal those from re-running the grown sequence."""
    session = make_session(load_model(llama_optimum))
    assert len(cache_io(session)) == 4
    prompt = np.random.default_rng(0).integers(0, 200, size=(1, 6), dtype=np.int64)
    from graphresize.verify.evaluate import _Decoder

    seen = {}
    for mode_cache in (True, False):
        decoder = _Decoder(session, prompt, 4)
        if not mode_cache:
            decoder.cache = {}
        decoder.run()
        seen[mode_cache] = [t.tolist() for t in decoder.tokens]
    assert len(seen[True]) == 4
    assert seen[True] == seen[False]
    assert decode_latency({"m": session}, prompt_len=4, steps=2, runs=1)["m"].mode == DECODE_KV


def _bench_module():
    return load_script(REPO / "benchmarks" / "run.py", "bench_run")


def test_benchmark_script_end_to_end(llama_dynamo, ids, tmp_path):
    run = _bench_module()
    methods = [
        {"label": "dot", "method": "dotresize"},
        {"label": "prune", "method": "prune"},
        {"label": "prune-heal", "method": "prune", "heal_steps": 2, "ratios": (0.3,)},
        {"label": "elsewhere", "method": "prune", "ratios": (0.5,)},  # not at this ratio: no row, no note
        {"label": "future", "method": "dotresize", "no_such_option": 1},
        {"label": "bad-method", "method": "nope"},
    ]
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [
        "--model", str(llama_dynamo), "--calib", str(ids), "--text", str(ids), "--out", str(out), "--work", str(work),
        "--ratios", "0.3", "--eval-tokens", "128", "--eval-seq-len", "32", "--calib-tokens", "512", "--calib-seq-len", "32",
        "--latency-runs", "2", "--in-process",
    ]  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:results:start -->\nstale\n<!-- bench:results:end -->\noutro\n")
    assert run.main([*argv, "--readme", str(readme)], methods=methods) == 0
    table = (out / "results.md").read_text()
    block = readme.read_text().split("<!-- bench:results:start -->\n")[1].split("<!-- bench:results:end -->")[0]
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("outro\n") and "stale" not in block
    assert [ln for ln in block.splitlines() if ln.startswith("| ")] == [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in lines[1:]] == ["dense", "dot", "prune", "prune-heal"]
    assert "`future` (ratio 0.3): skipped, the pipeline rejects its options (TypeError" in table
    assert "`bad-method` (ratio 0.3): skipped, the pipeline rejects its options (UsageError" in table
    assert "`elsewhere` (ratio" not in table
    heal_row = next(ln for ln in lines if ln.startswith("| prune-heal "))
    assert float(heal_row.split("|")[14].split("(")[0].split("/")[3]) > 0  # the heal stage's seconds in the cost cell
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all(r["params"] < json.loads((out / "results.json").read_text())["dense"]["params"] for r in rows)
    assert all(r["timings"]["calibrate"] > 0 and r["peak_rss_mb"]["calibrate"] > 0 for r in rows)
    # The rows read the same values: the second takes its statistics from the first's cache.
    assert [r["label"] for r in rows] == ["dot", "prune", "prune-heal"] and rows[0]["stats_cached"] == 0 < rows[1]["stats_cached"]
    assert "heal" not in rows[1]["timings"] and rows[2]["timings"]["heal"] > 0
    assert "| cached / " in lines[3] and "Tool cost over these 1 runs" in table
    # speed: batch-8 throughput for every row, decode only through a KV cache (this export has none),
    # against the dense model fused by optimize --ratio 0, itself compared with the unfused input
    assert all(r["batch_ratio"] > 0 and r.get("decode_ratio") is None and r["fusion"]["after"] for r in rows)
    assert lines[2].split("|")[11].strip() == "–" and len(lines[2].split("|")[13].split("/")) == 3
    assert "Fused dense (`optimize --ratio 0`" in table and "MultiHeadAttention 2" in table
    # the total in parentheses is the sum of the stages (the report's own total is not a stage)
    total = float(lines[2].split("|")[14].split("(")[1].rstrip(") "))
    assert total == pytest.approx(rows[0]["timings"]["total"], abs=1.0)
    # A re-run finds every row cached: no optimize, no scoring.
    models = sorted(p.stat().st_mtime_ns for p in (work / "models").glob("*.onnx"))
    assert len(models) == 3
    assert run.main([*argv, "--only", "prune"], methods=methods) == 0
    assert sorted(p.stat().st_mtime_ns for p in (work / "models").glob("*.onnx")) == models
    assert [ln.split("|")[1].strip() for ln in (out / "results.md").read_text().splitlines() if ln.startswith("| ")][1:] == ["dense", "prune"]


def test_genai_decode_times_the_generation_loop(llama_genai, tmp_path, calib_tokens):
    """benchmarks/genai_decode.py: the dense builder folder against its MLP cut at 0.5, timed
    in onnxruntime-genai's own loop; the cut's FLOP ratio is that of its weight products (the
    MLP is 2/3 of the tiny Llama's block weights, attention and head unchanged)."""
    from graphresize.cli.main import main as cli

    small = tmp_path / "small"
    small.mkdir()
    assert cli(["optimize", str(llama_genai), "-o", str(small / "model.onnx"), "--ratio", "0.5", "--calib", str(calib_tokens),
                "--tokens", "2048", "--seq-len", "32", "--target", "mlp", "--allocation", "uniform", "-q"]) == 0
    genai_decode = load_script(REPO / "benchmarks" / "genai_decode.py", "bench_genai_decode")
    out = tmp_path / "genai.md"
    assert genai_decode.main([f"dense={llama_genai.parent}", f"small={small}", "--prompt", "8", "--new", "4",
                              "--runs", "2", "--rounds", "1", "--out", str(out)]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    assert all(len(t["prompt_ms"]) == 2 and len(t["decode_ms"]) == 2 for t in raw["times"].values())
    prompt_ratio = raw["flops"]["small"][0] / raw["flops"]["dense"][0]
    decode_ratio = raw["flops"]["small"][1] / raw["flops"]["dense"][1]
    assert 0.5 < prompt_ratio < 0.95 and 0.5 < decode_ratio < 0.95
    rows = [line for line in out.read_text().splitlines() if line.startswith("| small")]
    assert rows and f"{prompt_ratio:.2f} / {decode_ratio:.2f}" in rows[0]
