"""Benchmark every method row of ``methods.py`` at several ratios: quality, size, speed, tool cost.

    make bench                                   # the embedded SmolLM2, every row, ratios 0.1-0.5
    python benchmarks/run.py --only prune-mlp --ratios 0.1,0.3 --eval-tokens 4096

For each row × ratio: ``optimize`` runs in a fresh process (so its time and peak memory per
stage are its own), then the parent scores the result: parameters, weight FLOPs per token,
perplexity on PTB test and on held-out wiki text (the calibration text's last paragraphs,
never used to calibrate), top-1 agreement and KL against the dense model on the wiki windows,
and speed measured interleaved with the dense model: prompt latency (batch 1), batch-8 prompt
throughput, and decode latency through the KV cache when the export has past/present inputs,
each divided by the row's FLOP ratio counted over every matrix product at the timed sizes
(weights and attention, ``graphresize.verify.flops``; the weight-only ratio is shown beside it).
Rows are optimized with ``--fuse`` (off by default in ``optimize``, on here; ``--no-fuse`` turns it off), and
their speed is compared with the dense model fused the same way (``optimize --ratio 0``), which
is itself compared with the unfused dense input in a line under the table. Writes ``results.md``,
``results.png`` and ``results.json`` into ``--out`` (default: this folder). Every optimized
model and its scores are cached in ``--work`` under a hash of the options, inputs and
settings, so a re-run only computes rows that are not finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
os.environ.setdefault("GRAPHRESIZE_CACHE", str(REPO / ".cache"))

import numpy as np  # noqa: E402

from graphresize import errors  # noqa: E402
from graphresize.calibrate import tokens  # noqa: E402
from graphresize.io.modelio import load_model  # noqa: E402
from graphresize.io.ort_utils import make_session  # noqa: E402
from graphresize.pipeline import OptimizeOptions, parameter_count  # noqa: E402
from graphresize.verify.evaluate import (  # noqa: E402
    cache_io,
    decode_latency,
    evaluate_text,
    latency,
    weight_flops_per_token,
)
from graphresize.verify.flops import matmul_flops  # noqa: E402

HOLDOUT_FRACTION = 0.1  # share of the calibration text held out for the wiki perplexity
#: Stages of ``OptimizeResult.timings`` shown in the table, and what they are called there.
COST_STAGES = (("calib", ("session", "calibrate")), ("solve", ("solve",)), ("rewrite", ("rewrite",)), ("heal", ("heal",)))


def _load_methods() -> tuple[list[dict], tuple[float, ...]]:
    spec = importlib.util.spec_from_file_location("graphresize_bench_methods", HERE / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.METHODS), tuple(module.RATIOS)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _code_version() -> str:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return proc.stdout.strip() or "unknown"


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------- inputs


def default_inputs() -> tuple[Path, Path, Path]:
    """The embedded SmolLM2 export, wiki calibration text and PTB test text (built once)."""
    spec = importlib.util.spec_from_file_location("graphresize_demo", REPO / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.build_inputs(Path(os.environ["GRAPHRESIZE_CACHE"]))


def split_calibration(calib: Path, data_dir: Path) -> tuple[Path, Path]:
    """Write the calibration source minus its tail (``calib``) and the tail (``heldout``):
    the last ``HOLDOUT_FRACTION`` of the paragraphs of a text, or of the ids of a ``.npy``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if calib.suffix == ".npy":
        ids = np.load(calib, allow_pickle=False).reshape(-1)
        cut = len(ids) - max(1, int(len(ids) * HOLDOUT_FRACTION))
        parts = {"calib.npy": ids[:cut], "heldout.npy": ids[cut:]}
        for name, part in parts.items():
            np.save(data_dir / name, part)
        return data_dir / "calib.npy", data_dir / "heldout.npy"
    paragraphs = [p for p in calib.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    cut = len(paragraphs) - max(1, int(len(paragraphs) * HOLDOUT_FRACTION))
    for name, part in (("calib.txt", paragraphs[:cut]), ("heldout.txt", paragraphs[cut:])):
        target = data_dir / name
        text = "\n\n".join(part) + "\n"
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
    return data_dir / "calib.txt", data_dir / "heldout.txt"


def token_stream(path: Path, model: Path, tokenizer: Path | None) -> np.ndarray:
    tok = None if path.suffix == ".npy" else tokens.find_tokenizer(model, tokenizer)
    return tokens.read_token_stream(path, tok)


# ---------------------------------------------------------------------------------- optimize


def optimize_once(model: Path, output: Path, options: dict) -> dict:
    """One optimize; returns ``{"status": "ok", "report": ...}`` or ``{"status": "rejected" |
    "failed", "error": one line}`` (a row that cannot run is noted, never fatal to the run)."""
    from graphresize.cli import report
    from graphresize.pipeline import run_optimize

    options = dict(options)
    for key in ("calib", "tokenizer", "stats_cache"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    try:
        opts = OptimizeOptions(**options)
    except TypeError as exc:
        return {"status": "rejected", "error": f"TypeError: {exc}"}
    try:
        result = run_optimize(model, output, opts)
    except errors.UsageError as exc:
        return {"status": "rejected", "error": f"UsageError: {exc}"}
    except Exception as exc:
        traceback.print_exc()
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return {"status": "failed", "error": f"{type(exc).__name__}: {first}"}
    data = report.optimize_report(result)
    data.pop("groups", None)
    return {"status": "ok", "report": data}


def _worker(spec_path: Path) -> int:
    """Child process: run one optimize and write what came of it."""
    spec = json.loads(spec_path.read_text())
    _write_json(Path(spec["result"]), optimize_once(Path(spec["model"]), Path(spec["output"]), spec["options"]))
    return 0


def run_optimize_isolated(model: Path, output: Path, options: dict, *, in_process: bool = False, nice: int = 0) -> dict:
    """:func:`optimize_once` in a child process (its time and memory are its own), or here;
    ``nice``: the child's niceness increment (builds yield the CPU to the timing in the parent
    and to other work on a shared machine)."""
    result_path = output.with_suffix(".optimize.json")
    result_path.unlink(missing_ok=True)
    if in_process:
        data = optimize_once(model, output, options)
        _write_json(result_path, data)
        return data
    spec_path = output.with_suffix(".spec.json")
    _write_json(spec_path, {"model": str(model), "output": str(output), "options": options, "result": str(result_path)})
    log = output.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)], stdout=f, stderr=f,
                              preexec_fn=(lambda: os.nice(nice)) if nice else None)
    data = _read_json(result_path)
    if data is None:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        how = f"killed by signal {-proc.returncode} (SIGKILL: out of memory?)" if proc.returncode == -9 else f"exited with {proc.returncode}"
        data = {"status": "failed", "error": f"the optimize process {how}: {tail[0][:300]}"}
    return data


# ---------------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class Settings:
    eval_tokens: int
    eval_seq_len: int
    calib_tokens: int
    latency_runs: int
    latency_seq: int
    latency: bool
    batch: int = 8  # sequences per run of the throughput measurement (0: not measured)
    batch_runs: int = 3
    decode_steps: int = 16  # greedy tokens timed through the KV cache (0: not measured)
    decode_runs: int = 3
    fuse: bool = True  # rows and the speed reference in ORT's fused form


class CachedSession:
    """Stands in for the dense session as the agreement reference: each distinct run's outputs
    are computed once and kept (the dense logits of the wiki windows), so every row compares
    against them without re-running the dense model."""

    def __init__(self, session) -> None:
        self.session = session
        self._runs: dict[bytes, list] = {}

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        key = hashlib.sha256(repr(names).encode() + b"".join(np.ascontiguousarray(feeds[k]).tobytes() for k in sorted(feeds))).digest()
        if key not in self._runs:
            self._runs[key] = self.session.run(names, feeds)
        return self._runs[key]


def score_model(path: Path, streams: dict[str, np.ndarray], dense_session, settings: Settings) -> tuple[dict, object]:
    """Parameters, FLOPs and perplexities of ``path``; agreement with the dense session on
    the wiki windows when ``dense_session`` is given. Returns the scores and the session."""
    model = load_model(path)
    scores = {"params": parameter_count(model), "flops_per_token": weight_flops_per_token(model)}
    session = make_session(model)
    del model
    for name, stream in streams.items():
        ref = dense_session if name == "wiki" else None
        ppl, agreement = evaluate_text(session, stream, seq_len=settings.eval_seq_len, max_tokens=settings.eval_tokens, reference=ref)
        scores[f"{name}_ppl"] = ppl.value
        scores[f"{name}_tokens"] = ppl.tokens
        if agreement is not None:
            scores["wiki_top1"] = agreement.top1
            scores["wiki_kl"] = agreement.kl
    return scores, session


def measure_latency(dense_session, session, settings: Settings) -> dict:
    """Prompt latency (batch 1), batch-``settings.batch`` prompt throughput and, when both graphs
    carry a KV cache, decode latency per token: each ``model`` against ``dense``, runs
    interleaved. Ratios are model / dense (time; lower is faster)."""
    if not settings.latency:
        return {}
    pair = {"dense": dense_session, "model": session}
    found = latency(pair, batch=1, seq_len=settings.latency_seq, runs=settings.latency_runs)
    scores = {
        "latency_ms": found["model"].median_ms,
        "dense_latency_ms": found["dense"].median_ms,
        "latency_ratio": found["model"].median_ms / found["dense"].median_ms,
    }
    if settings.batch:
        found = latency(pair, batch=settings.batch, seq_len=settings.latency_seq, runs=settings.batch_runs, warmup=1)
        scores.update(
            batch_tokens_per_s=found["model"].tokens_per_s,
            dense_batch_tokens_per_s=found["dense"].tokens_per_s,
            batch_ratio=found["model"].median_ms / found["dense"].median_ms,
        )
    if settings.decode_steps and cache_io(session) and cache_io(dense_session):
        found = decode_latency(pair, batch=1, prompt_len=settings.latency_seq, steps=settings.decode_steps, runs=settings.decode_runs)
        scores.update(
            decode_tokens_per_s=found["model"].tokens_per_s,
            dense_decode_tokens_per_s=found["dense"].tokens_per_s,
            decode_ratio=found["model"].median_ms_per_token / found["dense"].median_ms_per_token,
        )
    return scores


def _per_flop(row: dict, key: str, flop_ratio: float | None):
    return None if row.get(key) is None or not flop_ratio else row[key] / flop_ratio


def speed_flops(path: Path, work: Path, settings: Settings) -> dict:
    """All matrix-product FLOPs per token at the timed sizes (``graphresize.verify.flops``):
    ``prompt_flops_per_token`` for a ``1 × latency_seq`` prompt (batch ``b`` has the same count
    per token) and, for a graph with past/present inputs, ``decode_flops_per_token``, the mean
    over the ``decode_steps`` timed steps. Cached in ``work/flops`` under the file and the sizes."""
    key = _digest({"model": _file_key(path), "seq": settings.latency_seq, "steps": settings.decode_steps})
    cache = work / "flops" / f"{key}.json"
    found = _read_json(cache)
    if found is not None:
        return found
    model = load_model(path)
    runs = [(1, settings.latency_seq, 0)]
    has_cache = any("past" in v.name.lower() or "cache" in v.name.lower() for v in model.graph.inputs)
    if has_cache and settings.decode_steps:
        runs += [(1, 1, settings.latency_seq), (1, 1, settings.latency_seq + settings.decode_steps - 1)]
    counts = matmul_flops(model, runs)
    found = {
        "prompt_flops_per_token": counts[0].per_token,
        "prompt_weight_flops_per_token": counts[0].weight_per_token,
        "prompt_flops_by_op": counts[0].by_op,
        "decode_flops_per_token": (counts[1].total + counts[2].total) / 2 if len(counts) == 3 else None,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_json(cache, found)
    return found


def flop_ratios(row: dict, dense: dict) -> tuple[float, float | None, float | None]:
    """Weight, prompt and decode FLOP ratios of a row to the dense model (None: not counted)."""
    def ratio(key):
        return row[key] / dense[key] if row.get(key) and dense.get(key) else None
    return row["flops_per_token"] / dense["flops_per_token"], ratio("prompt_flops_per_token"), ratio("decode_flops_per_token")


def fused_dense(model: Path, work: Path, in_process: bool, nice: int = 0) -> dict:
    """``optimize --ratio 0`` of the dense model (fusion only), cached in ``work/dense``."""
    output = work / "dense" / f"fused.{_digest(_file_key(model))}.onnx"
    output.parent.mkdir(parents=True, exist_ok=True)
    done = _read_json(output.with_suffix(".optimize.json"))
    if done and done.get("status") == "ok" and output.is_file():
        return {**done, "model": str(output)}
    done = run_optimize_isolated(model, output, {"ratio": 0.0, "fuse": True, "progress": False, "overwrite": True}, in_process=in_process, nice=nice)
    return {**done, "model": str(output)}


# ---------------------------------------------------------------------------------- output


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _stages(timings: dict) -> dict:
    """Seconds per stage (the report's ``total`` is their sum, not a stage)."""
    return {k: v for k, v in timings.items() if k != "total"}


def _cost(timings: dict, memory: dict, cached: bool = False) -> tuple[str, str]:
    timings = _stages(timings)
    parts = [f"{sum(timings.get(s, 0.0) for s in stages):.1f}" for _, stages in COST_STAGES]
    if cached:
        parts[0] = "cached"
    time_cell = " / ".join(parts) + f" ({sum(timings.values()):.0f})"
    peaks = [max((memory.get(s, 0.0) for s in stages), default=0.0) for _, stages in COST_STAGES]
    memory_cell = " / ".join(f"{p:.0f}" for p in peaks) if memory else "–"
    return time_cell, memory_cell


def _cost_summary(rows: list[dict]) -> str | None:
    """How the optimize time splits, summed over the rows that calibrated in full (rows that
    read statistics from the cache have no forward passes to compare with)."""
    rows = [r for r in rows if not r.get("stats_cached")]
    if not rows:
        return None
    total = {}
    for r in rows:
        for stage, seconds in _stages(r["timings"]).items():
            total[stage] = total.get(stage, 0.0) + seconds
    forward = total.get("calibrate", 0.0)
    solve_rewrite = total.get("solve", 0.0) + total.get("rewrite", 0.0)
    rest = sum(total.values()) - forward - solve_rewrite
    if forward <= 0:
        return None
    return (
        f"Tool cost over these {len(rows)} runs: calibration forward passes {forward:.0f} s; solve + rewrite {solve_rewrite:.0f} s "
        f"({solve_rewrite / forward:.0%} of the forward passes; the goal is under 50%); everything else (load, analyze, "
        f"tokenize, ORT sessions, verify, save) {rest:.0f} s ({rest / forward:.0%}). Peak memory of any stage: "
        f"{max(max(r['peak_rss_mb'].values(), default=0.0) for r in rows):.0f} MiB."
    )


def write_table(out: Path, dense: dict, rows: list[dict], notes: list[str], header: dict) -> Path:
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{header['command']}` on {header['date']} ({header['machine']}; code {header['code']}); do not edit by hand.",
        "",
        f"* model: `{header['model']}`; calibration: {header['calib_tokens']} tokens from `{header['calib']}` "
        f"(its last {HOLDOUT_FRACTION:.0%} of paragraphs held out), seed 0",
        f"* perplexity: first {header['eval_tokens']} tokens of `{header['text']}` (PTB) and of the held-out tail of the "
        f"calibration text (wiki), non-overlapping windows of {header['eval_seq_len']}; top-1 / KL: agreement of the next-token "
        "distribution with the dense model on the wiki windows (KL(dense‖model), nats per token)",
        "* FLOPs per token: 2·K·N for every MatMul/Gemm with a constant K×N weight (weight FLOPs, the first FLOP ratio); "
        f"prompt / decode FLOP ratio: all matrix products of the graph as ORT runs it (weight products and attention's Q·Kᵀ and "
        f"scores·V, also inside fused attention operators; `graphresize.verify.flops`), per token of a 1 × {header['latency_seq']} "
        f"prompt and per token of the {header.get('decode_steps', 16)} decode steps after it; latency/FLOP divides the prompt and "
        "batch time ratios by the prompt FLOP ratio and the decode ratio by the decode FLOP ratio",
        (
            f"* latency: ONNX Runtime {header['ort']} CPU, batch 1 × {header['latency_seq']} tokens (prompt), median of "
            f"{header['latency_runs']} runs interleaved with the {header.get('reference', 'dense model')}; b{header.get('batch', 8)}: "
            f"batch {header.get('batch', 8)} × {header['latency_seq']} tokens, median of {header.get('batch_runs', 3)} runs; decode: "
            f"{header.get('decode_steps', 16)} greedy tokens through the KV cache after the prompt, median of "
            f"{header.get('decode_runs', 3)} runs (– when the export has no past/present inputs); ratio = model / dense time "
            "(lower is faster); latency/FLOP = latency ratio ÷ FLOP ratio for prompt / batch / decode (1.0: speed tracks "
            "FLOPs; above 1: less speed-up than FLOPs promise)"
            if header["latency"]
            else "* latency: not measured (--no-latency)"
        ),
        "* optimize cost: seconds in calibration (ORT session + forward passes) / solve / rewrite / healing (`optimize --heal-steps`: "
        "dense targets and training), and the whole run in "
        "parentheses (load, verify, save included); `cached`: the row read its calibration statistics from an earlier row "
        "(some or all of them; `optimize --stats-cache`); peak resident memory (MiB) of the optimize process in each of those stages",
        "",
        f"| method | ratio | params | FLOPs/token | PTB ppl | wiki ppl | top-1 | KL | latency ratio | b{header.get('batch', 8)} ratio "
        "| decode ratio | FLOP ratio: weight / prompt / decode | latency/FLOP: prompt / batch / decode "
        "| optimize s: calib / solve / rewrite / heal (total) | peak MiB: calib / solve / rewrite / heal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | 0 | {dense['params'] / 1e6:.1f}M | {dense['flops_per_token'] / 1e6:.1f}M | {dense['ptb_ppl']:.2f} "
        f"| {dense['wiki_ppl']:.2f} | – | – | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | – | – |",
    ]
    for r in rows:
        weight_ratio, prompt_ratio, decode_ratio = flop_ratios(r, dense)
        flop_cell = f"{weight_ratio:.2f} / {_fmt(prompt_ratio, '.2f')} / {_fmt(decode_ratio, '.2f')}"
        time_cell, memory_cell = _cost(r["timings"], r["peak_rss_mb"], bool(r.get("stats_cached")))
        per_flop = " / ".join(
            _fmt(_per_flop(r, k, f), ".2f") for k, f in (("latency_ratio", prompt_ratio), ("batch_ratio", prompt_ratio), ("decode_ratio", decode_ratio))
        )
        lines.append(
            f"| {r['label']} | {r['ratio']:g} | {r['params'] / 1e6:.1f}M ({r['params'] / dense['params']:.0%}) "
            f"| {r['flops_per_token'] / 1e6:.1f}M | {r['ptb_ppl']:.2f} | {r['wiki_ppl']:.2f} | {_fmt(r.get('wiki_top1'), '.3f')} "
            f"| {_fmt(r.get('wiki_kl'), '.4f')} | {_fmt(r.get('latency_ratio'), '.2f')} | {_fmt(r.get('batch_ratio'), '.2f')} "
            f"| {_fmt(r.get('decode_ratio'), '.2f')} | {flop_cell} | {per_flop} | {time_cell} | {memory_cell} |"
        )
    if header.get("fused_dense"):
        lines += ["", _fused_dense_line(header["fused_dense"])]
    cost = _cost_summary(rows)
    if cost:
        lines += ["", cost]
    if notes:
        lines += ["", "Rows not measured:", ""] + [f"* {n}" for n in notes]
    lines += ["", "Rows (`benchmarks/methods.py`):", ""]
    lines += [f"* `{m['label']}`: `{json.dumps({k: v for k, v in m.items() if k != 'label'}, sort_keys=True)}`" for m in header["methods"]]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fused_dense_line(fd: dict) -> str:
    """The dense model fused (``optimize --ratio 0``) against the unfused dense input."""
    if fd.get("status") != "ok":
        return f"Fused dense: not measured ({fd.get('error', 'optimize failed')})."
    parts = [f"prompt ×{fd['latency_ratio']:.2f}" if fd.get("latency_ratio") else None,
             f"batch ×{fd['batch_ratio']:.2f}" if fd.get("batch_ratio") else None,
             f"decode ×{fd['decode_ratio']:.2f}" if fd.get("decode_ratio") else None]
    fusion = fd.get("fusion") or {}
    ops = ", ".join(f"{k} {v}" for k, v in (fusion.get("after") or {}).items()) or "none"
    skipped = "; skipped: " + ", ".join(fusion["skipped"]) if fusion.get("skipped") else ""
    return (f"Fused dense (`optimize --ratio 0`, the speed reference of the rows) against the unfused dense input: time "
            f"{', '.join(p for p in parts if p) or 'not measured'} (below 1: faster); fused ops {ops}{skipped}; "
            f"largest relative output difference {_fmt(fusion.get('max_relative_difference'), '.1e')}.")


README_START, README_END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def update_readme(readme: Path, results_md: Path) -> bool:
    """Put ``results.md`` (less its title and protocol bullets) between the README's result
    markers; False when the README has no such block."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    body = results_md.read_text(encoding="utf-8").splitlines()
    generated = next(ln for ln in body if ln.startswith("Generated by"))
    table = next(i for i, ln in enumerate(body) if ln.startswith("| method"))
    rows_list = next((i for i, ln in enumerate(body) if ln.startswith("Rows (")), len(body))
    link = results_md.relative_to(readme.parent).as_posix() if results_md.is_relative_to(readme.parent) else str(results_md)
    lines = [README_START, generated, "", *body[table:rows_list], f"Protocol and row options: [`{link}`]({link})."]
    block = "\n".join(lines)
    readme.write_text(text[:start] + block + "\n" + text[end:], encoding="utf-8")
    return True


def write_plot(out: Path, dense: dict, rows: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        _say("matplotlib is not installed (extra `bench`): no plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "ptb_ppl", "PTB test"), (axes[1], "wiki_ppl", "held-out wiki")):
        for label in dict.fromkeys(r["label"] for r in rows):
            points = sorted((r["params"] / dense["params"], r[key]) for r in rows if r["label"] == label)
            points.append((1.0, dense[key]))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.scatter([1.0], [dense[key]], marker="*", s=160, color="black", zorder=5, label="dense")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))  # powers of ten
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("parameters / dense parameters")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None, ratios: tuple[float, ...]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="input .onnx (default: the embedded SmolLM2, built once)")
    parser.add_argument("--calib", type=Path, help="calibration text or .npy; its tail is the held-out wiki text (default: wiki)")
    parser.add_argument("--text", type=Path, help="PTB-style evaluation text or .npy (default: PTB test)")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: beside the model)")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md/.png/.json go (default: benchmarks/)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench", help="cache of optimized models and scores (default: .cache/bench of this checkout)")
    parser.add_argument("--only", default=None, help="comma-separated row labels to run (default: all)")
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in ratios), help="comma-separated ratios")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored per text (default 4096)")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window (default 512)")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens per optimize (default 16384)")
    parser.add_argument("--calib-seq-len", type=int, default=None, help="calibration window (default: the pipeline's)")
    parser.add_argument("--latency-runs", type=int, default=10, help="timed runs per latency pair (default 10)")
    parser.add_argument("--latency-seq", type=int, default=128, help="prompt tokens for latency (default 128)")
    parser.add_argument("--no-latency", action="store_true", help="skip latency (the table shows –)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per run of the throughput measurement (default 8; 0: skip)")
    parser.add_argument("--batch-runs", type=int, default=3, help="timed runs per batch pair (default 3)")
    parser.add_argument("--decode-steps", type=int, default=16, help="tokens timed through the KV cache, where the export has one (default 16; 0: skip)")
    parser.add_argument("--decode-runs", type=int, default=3, help="timed decode runs per pair (default 3)")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True, help="optimize rows with --fuse and time them against the fused dense model (default on)")
    parser.add_argument("--rebuild", action="store_true", help="ignore cached models and scores (the cache key is the options and inputs, not the code)")
    parser.add_argument("--readme", type=Path, default=None, help="also copy the table into this README between its bench:results markers (make bench: README.md)")
    parser.add_argument("--no-stats-cache", action="store_true", help="calibrate every row afresh (default: rows share calibration statistics through optimize --stats-cache WORK/stats; the tool-cost line counts only rows that calibrated)")
    parser.add_argument("--in-process", action="store_true", help="run optimize in this process (faster start; peak memory then includes the scorer's)")
    parser.add_argument("--build-nice", type=int, default=0, help="niceness increment of the optimize processes (e.g. 10: builds yield the CPU to the timing; default 0)")
    parser.add_argument("--no-heal", action="store_true", help="skip the rows that heal (optimize --heal-steps; minutes per step on 2 cores)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, methods: list[dict] | None = None) -> int:
    default_methods, default_ratios = _load_methods()
    args = parse_args(argv, default_ratios)
    if args.worker is not None:
        return _worker(args.worker)
    methods = default_methods if methods is None else methods
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    if only is not None and not only <= {m["label"] for m in methods}:
        raise SystemExit(f"--only: unknown labels {sorted(only - {m['label'] for m in methods})}")
    settings = Settings(args.eval_tokens, args.eval_seq_len, args.calib_tokens, args.latency_runs, args.latency_seq, not args.no_latency,
                        args.batch, args.batch_runs, args.decode_steps, args.decode_runs, args.fuse)

    if args.model is None or args.calib is None or args.text is None:
        model, calib, text = default_inputs()
        model, calib, text = args.model or model, args.calib or calib, args.text or text
    else:
        model, calib, text = args.model, args.calib, args.text
    model, calib, text = model.resolve(), calib.resolve(), text.resolve()
    work = args.work.resolve()
    (work / "models").mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    calib_part, heldout = split_calibration(calib, work / "data")
    streams = {"ptb": token_stream(text, model, args.tokenizer), "wiki": token_stream(heldout, model, args.tokenizer)}
    for name, stream in streams.items():
        if stream.size < settings.eval_seq_len:
            raise SystemExit(f"{name} text: {stream.size} tokens, fewer than one window of {settings.eval_seq_len}")

    base_key = {"model": _file_key(model), "calib": hashlib.sha256(calib_part.read_bytes()).hexdigest()}
    score_key = _digest({**dataclasses.asdict(settings), "text": _file_key(text), "heldout": hashlib.sha256(heldout.read_bytes()).hexdigest()})

    _say(f"dense: {model}")
    dense_path = work / f"dense.{_digest(base_key['model'])}.{score_key}.json"
    dense = _read_json(dense_path)
    dense_model = load_model(model)
    dense_session = make_session(dense_model)
    dense_reference = CachedSession(dense_session)
    del dense_model
    if dense is None:
        dense, _ = score_model(model, streams, None, settings)
        _write_json(dense_path, dense)
    if settings.latency:
        dense.update(speed_flops(model, work, settings))
    _say(f"dense: PTB ppl {dense['ptb_ppl']:.2f}, wiki ppl {dense['wiki_ppl']:.2f}")

    import onnxruntime

    # The speed reference: the dense model in the rows' own form (fused, unless --no-fuse).
    speed_reference, fused_info = dense_session, None
    if settings.fuse and settings.latency:
        fused_info = fused_dense(model, work, args.in_process, args.build_nice)
        if fused_info["status"] == "ok":
            fused_path = Path(fused_info["model"])
            speed_reference = make_session(load_model(fused_path))
            fd_scores_path = fused_path.with_suffix(f".speed.{score_key}.json")
            fd_scores = None if args.rebuild else _read_json(fd_scores_path)
            if fd_scores is None:
                _say("dense: fused against unfused")
                fd_scores = measure_latency(dense_session, speed_reference, settings)
                _write_json(fd_scores_path, fd_scores)
            fused_info = {"status": "ok", **fd_scores, "fusion": fused_info["report"].get("fusion")}

    header = {
        "command": "make bench" if argv is None and len(sys.argv) == 1 else "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "model": model.name if args.model is None else str(args.model),
        "calib": calib.name,
        "text": text.name,
        "calib_tokens": settings.calib_tokens,
        "eval_tokens": settings.eval_tokens,
        "eval_seq_len": settings.eval_seq_len,
        "latency": settings.latency,
        "latency_runs": settings.latency_runs,
        "latency_seq": settings.latency_seq,
        "ort": onnxruntime.__version__,
        "batch": settings.batch,
        "batch_runs": settings.batch_runs,
        "decode_steps": settings.decode_steps,
        "decode_runs": settings.decode_runs,
        "reference": "dense model fused by `optimize --ratio 0`" if speed_reference is not dense_session else "dense model",
        "fused_dense": fused_info,
        "code": _code_version(),
        "methods": [m for m in methods if only is None or m["label"] in only],
    }
    rows: list[dict] = []
    notes: dict[str, list] = {}

    def publish() -> None:
        order = {m["label"]: i for i, m in enumerate(header["methods"])}
        rows.sort(key=lambda r: (order[r["label"]], r["ratio"]))
        note_lines = [f"`{label}` (ratio {', '.join(f'{r:g}' for r in rs)}): {msg}" for (label, msg), rs in notes.items()]
        write_table(args.out, dense, rows, note_lines, header)
        write_plot(args.out, dense, rows)
        _write_json(args.out / "results.json", {"header": header, "dense": dense, "rows": rows, "notes": note_lines})

    # Ratio-major: an interrupted run has every method at the first ratios (order of --ratios).
    for ratio in ratios:
        for method in header["methods"]:
            label = method["label"]
            if (method.get("ratios") is not None and ratio not in method["ratios"]) or (args.no_heal and method.get("heal_steps")):
                continue  # a row measured at some ratios only (healing rows: their cost), or --no-heal
            options = {k: v for k, v in method.items() if k not in ("label", "ratios")}
            options.update(ratio=ratio, calib=str(calib_part), tokens=settings.calib_tokens, progress=False, overwrite=True)
            options.setdefault("fuse", settings.fuse)
            if args.tokenizer is not None:
                options.setdefault("tokenizer", str(args.tokenizer.resolve()))
            if args.calib_seq_len is not None:
                options.setdefault("seq_len", args.calib_seq_len)
            try:
                OptimizeOptions(**{k: v for k, v in options.items() if k not in ("calib", "tokenizer")})
            except TypeError as exc:
                notes.setdefault((label, f"skipped, the pipeline rejects its options (TypeError: {exc})"), []).append(ratio)
                _say(f"{label} @ {ratio:g}: rejected ({exc})")
                continue
            key = _digest({**base_key, "options": options})
            output = work / "models" / f"{key}.onnx"
            optimized_path = output.with_suffix(".optimize.json")
            optimized = _read_json(optimized_path)
            if args.rebuild or not (optimized and optimized.get("status") == "ok" and output.is_file()):
                _say(f"{label} @ {ratio:g}: optimize")
                # a row that names stats_cache (None: SliceGPT, whose statistics are sequential)
                # keeps it; the others share the whole-model statistics of earlier rows
                shared = not args.no_stats_cache and "stats_cache" not in options
                run_options = {**options, "stats_cache": str(work / "stats")} if shared else options
                optimized = run_optimize_isolated(model, output, run_options, in_process=args.in_process, nice=args.build_nice)
            if optimized["status"] != "ok":
                what = "skipped, the pipeline rejects its options" if optimized["status"] == "rejected" else "failed"
                notes.setdefault((label, f"{what} ({optimized['error']})"), []).append(ratio)
                _say(f"{label} @ {ratio:g}: {optimized['status']}: {optimized['error']}")
                continue
            scores_path = output.with_suffix(f".scores.{score_key}.json")
            scores = None if args.rebuild else _read_json(scores_path)
            if scores is None:
                _say(f"{label} @ {ratio:g}: evaluate")
                scores, session = score_model(output, streams, dense_reference, settings)
                scores.update(measure_latency(speed_reference, session, settings))
                del session
                _write_json(scores_path, scores)
            if settings.latency:
                scores = {**scores, **speed_flops(output, work, settings)}
            report = optimized["report"]
            row = {
                "label": label,
                "ratio": ratio,
                "options": options,
                "model": str(output),
                **scores,
                "timings": report.get("timings_s", {}),
                "peak_rss_mb": report.get("peak_rss_mb", {}),
                "verification": report.get("verification"),
                "stats_cached": report.get("calibration", {}).get("stats_cached", 0),
                "fusion": report.get("fusion"),
            }
            rows.append(row)
            _say(
                f"{label} @ {ratio:g}: params {row['params'] / 1e6:.1f}M, PTB {row['ptb_ppl']:.2f}, wiki {row['wiki_ppl']:.2f}, "
                f"latency ratio {_fmt(row.get('latency_ratio'), '.2f')}, b{settings.batch} {_fmt(row.get('batch_ratio'), '.2f')}, "
                f"decode {_fmt(row.get('decode_ratio'), '.2f')}"
            )
            publish()
    publish()
    _say(f"wrote {args.out / 'results.md'}")
    if args.readme is not None and update_readme(args.readme.resolve(), (args.out / "results.md").resolve()):
        _say(f"updated the results in {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
