"""Prompt and decode speed in onnxruntime-genai's own generation loop, dense against resized.

    python benchmarks/genai_decode.py dense=DIR LABEL=DIR [...] [--prompt 128] [--new 32] \\
        [--runs 5] [--rounds 3] [--out benchmarks/genai_decode.md]

Each ``DIR`` is a folder onnxruntime-genai loads: ``model.onnx`` and ``genai_config.json``, as
its model builder writes them and as ``graphresize optimize`` keeps them for MLP and head cuts
(a residual cut changes the hidden size the config records, so it writes none). One run is one
greedy generation of ``--new`` tokens after a ``--prompt``-token prompt of fixed random ids
through ``og.Generator``: the prompt time is the ``append_tokens`` call (the prefill), the
decode time the mean over the ``generate_next_token`` calls. Runs alternate between the models,
each after ``SETTLE_S`` of rest (ORT's spin-waiting workers of the run before would otherwise
take cores from it), so load on a shared machine hits all alike; the first model is the
reference. latency/FLOP is the median of the per-run time ratios to the reference's run made
beside it, divided by the FLOP ratio (every matrix product at the timed sizes,
``graphresize.verify.flops.matmul_flops``: the prompt, and the mean of the first and last
decode step). Writes a Markdown table (stdout, or ``--out``) and the raw times as JSON beside
it. Needs ``onnxruntime-genai`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from graphresize.io.modelio import load_model
from graphresize.verify.evaluate import SETTLE_S
from graphresize.verify.flops import matmul_flops


def _flops(folder: Path, prompt: int, new: int) -> tuple[float, float]:
    """(prompt FLOPs per token, mean FLOPs of one decode step) of ``folder/model.onnx``."""
    model = load_model(folder / "model.onnx")
    first, one, last = matmul_flops(model, [(1, prompt, 0), (1, 1, prompt), (1, 1, prompt + new - 1)])
    return first.per_token, (one.total + last.total) / 2


def _generate(og, model, ids: np.ndarray, new: int) -> tuple[float, float]:
    """One greedy generation: (prompt ms, decode ms per token)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    prompt_ms = (time.perf_counter() - start) * 1e3
    steps = 0
    start = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return prompt_ms, (time.perf_counter() - start) * 1e3 / max(1, steps)


def _median_ratio(times: list[float], reference: list[float]) -> float:
    return float(np.median([a / b for a, b in zip(times, reference, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="LABEL=DIR, the first is the reference")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--new", type=int, default=32, help="generated tokens per run (default 32)")
    parser.add_argument("--runs", type=int, default=5, help="runs per model per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import onnxruntime_genai as og
    except ImportError:
        print("genai_decode: onnxruntime-genai is not installed (pip install -e '.[dev]')", file=sys.stderr)
        return 2

    folders = dict(spec.split("=", 1) for spec in args.models)
    models = {label: og.Model(str(Path(folder))) for label, folder in folders.items()}
    flops = {label: _flops(Path(folder), args.prompt, args.new) for label, folder in folders.items()}
    vocab = min(32000, json.loads((Path(next(iter(folders.values()))) / "genai_config.json").read_text())["model"]["vocab_size"])
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, args.prompt), dtype=np.int32)
    times = {label: {"prompt_ms": [], "decode_ms": []} for label in models}
    for model in models.values():  # one untimed generation each: allocations, prepacking
        _generate(og, model, ids, 2)
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}: {args.runs} generations per model", file=sys.stderr)
        for _ in range(args.runs):
            for label, model in models.items():
                time.sleep(SETTLE_S)
                prompt_ms, decode_ms = _generate(og, model, ids, args.new)
                times[label]["prompt_ms"].append(prompt_ms)
                times[label]["decode_ms"].append(decode_ms)

    reference = next(iter(models))
    lines = [
        f"| model | FLOP ratio: prompt / decode | prompt ms (b1×{args.prompt}) | decode ms/token | decode tokens/s "
        "| × reference: prompt / decode | latency/FLOP: prompt / decode |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in models:
        ratios = [flops[label][i] / flops[reference][i] for i in (0, 1)]
        rel = [_median_ratio(times[label][k], times[reference][k]) for k in ("prompt_ms", "decode_ms")]
        prompt_ms, decode_ms = (float(np.median(times[label][k])) for k in ("prompt_ms", "decode_ms"))
        lines.append(
            f"| {label} | {ratios[0]:.2f} / {ratios[1]:.2f} | {prompt_ms:.1f} | {decode_ms:.2f} | {1e3 / decode_ms:.1f} "
            f"| {rel[0]:.2f} / {rel[1]:.2f} | {rel[0] / ratios[0]:.2f} / {rel[1] / ratios[1]:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    header = (f"onnxruntime-genai {og.__version__}, {args.rounds} rounds × {args.runs} greedy generations of "
              f"{args.new} tokens after a {args.prompt}-token prompt per model, interleaved\n\n")
    print(header + table)
    if args.out:
        args.out.write_text(header + table)
        args.out.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "flops": flops, "times": times}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
