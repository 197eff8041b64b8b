"""Unfused against fused, side by side: prompt latency, batch throughput and decode per token.

    python benchmarks/fused_speed.py --dense model.onnx --dense-fused dense.fused.onnx \\
        --row prune-mlp=prune.nofuse.onnx,prune.fuse.onnx [--row disp=disp.fuse.onnx ...] [--rounds 3] [--out speed.md]

Every graph is loaded at once and the runs alternate between them (as ``graphresize bench``
does), so load on a shared machine hits all alike; ``--rounds`` repeats the whole
prompt / batch / decode sequence. Unfused rows are compared with the dense input, fused rows
with the dense model fused by ``optimize --ratio 0``; latency/FLOP divides each time ratio by
the row's FLOP ratio (the median of the per-run ratios to the reference's run made beside it;
``--flops all``: every matrix product at the timed sizes,
``graphresize.verify.flops``; ``weight``: the weight products only). Fused ÷ unfused is taken
per pair of runs made side by side (run i of the fused graph against run i of its unfused twin)
and reported as the median with the 10th-90th percentile of those paired ratios. Decode is timed
only for graphs with past/present inputs. Writes a Markdown table (stdout, or ``--out``) and the
raw numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from graphresize.fusion import fused_op_histogram
from graphresize.io.modelio import load_model
from graphresize.io.ort_utils import make_session
from graphresize.verify.evaluate import cache_io, decode_latency, latency, weight_flops_per_token
from graphresize.verify.flops import matmul_flops


def _row(spec: str) -> tuple[str, Path | None, Path]:
    """``LABEL=UNFUSED.onnx,FUSED.onnx``, or ``LABEL=FUSED.onnx`` for a fused graph alone."""
    label, _, paths = spec.partition("=")
    plain, comma, fused = paths.partition(",")
    if not comma:
        plain, fused = "", plain
    if not (label and fused and (plain or not comma)):
        raise argparse.ArgumentTypeError(f"--row LABEL=UNFUSED.onnx,FUSED.onnx or LABEL=FUSED.onnx, got {spec!r}")
    return label, Path(plain) if plain else None, Path(fused)


def _spread(values: list[float]) -> str:
    """``median [p10–p90]`` of a list of ratios."""
    q = np.percentile(values, [50, 10, 90])
    return f"{q[0]:.2f} [{q[1]:.2f}–{q[2]:.2f}]"


def _flops(model, seq: int, decode: int, kind: str) -> tuple[float, float | None]:
    """(prompt, decode) FLOPs per token: every matrix product at the timed sizes, or weights only."""
    if kind == "weight":
        weight = weight_flops_per_token(model)
        return weight, weight
    has_cache = any("past" in v.name.lower() or "cache" in v.name.lower() for v in model.graph.inputs)
    if not (has_cache and decode):
        return matmul_flops(model, [(1, seq, 0)])[0].per_token, None
    prompt, first, last = matmul_flops(model, [(1, seq, 0), (1, 1, seq), (1, 1, seq + decode - 1)])
    return prompt.per_token, (first.total + last.total) / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, required=True)
    parser.add_argument("--dense-fused", type=Path, required=True)
    parser.add_argument("--row", type=_row, action="append", default=[])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10, help="prompt runs per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-runs", type=int, default=3, help="batch runs per round")
    parser.add_argument("--decode", type=int, default=16, help="tokens per decode run")
    parser.add_argument("--decode-runs", type=int, default=3, help="decode runs per round")
    parser.add_argument("--rounds", type=int, default=1, help="repeat prompt / batch / decode this many times (default 1)")
    parser.add_argument("--flops", choices=("all", "weight"), default="all", help="FLOPs that latency/FLOP divides by (default all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    graphs = {("dense", False): args.dense, ("dense", True): args.dense_fused}
    for label, plain, fused in args.row:
        if plain is not None:
            graphs[(label, False)] = plain
        graphs[(label, True)] = fused
    sessions, flops, ops = {}, {}, {}
    for key, path in graphs.items():
        model = load_model(path)
        flops[key], ops[key] = _flops(model, args.seq, args.decode, args.flops), fused_op_histogram(model)
        sessions[key] = make_session(model, threads=args.threads)
        del model
    named = {f"{k[0]}|{int(k[1])}": s for k, s in sessions.items()}
    cached = {n: s for n, s in named.items() if cache_io(s)}
    prompt = {n: [] for n in named}
    batch = {n: [] for n in named} if args.batch else {}
    decode = {n: [] for n in cached} if args.decode else {}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}: prompt b1 x {args.seq} ({args.runs} runs)", file=sys.stderr)
        for n, r in latency(named, batch=1, seq_len=args.seq, runs=args.runs).items():
            prompt[n] += r.times_ms
        if args.batch:
            print(f"round {round_ + 1}: batch {args.batch} x {args.seq} ({args.batch_runs} runs)", file=sys.stderr)
            for n, r in latency(named, batch=args.batch, seq_len=args.seq, runs=args.batch_runs, warmup=1).items():
                batch[n] += r.times_ms
        if decode:
            print(f"round {round_ + 1}: decode {args.decode} tokens through the KV cache ({args.decode_runs} runs)", file=sys.stderr)
            for n, r in decode_latency(cached, batch=1, prompt_len=args.seq, steps=args.decode, runs=args.decode_runs).items():
                decode[n] += r.times_ms_per_token

    lines = [
        f"| row | fused | FLOP ratio: prompt / decode ({args.flops}) | prompt ms (b1×{args.seq}) | b{args.batch} tok/s | decode ms/token "
        f"| latency/FLOP: prompt / b{args.batch} / decode | fused ÷ unfused, paired runs, median [p10–p90]: prompt | b{args.batch} | decode | fused ops |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    raw = {}
    for key in graphs:
        name, ref, twin = f"{key[0]}|{int(key[1])}", f"dense|{int(key[1])}", f"{key[0]}|0"
        ref_flops = flops[("dense", key[1])]
        ratios = [flops[key][i] / ref_flops[i] if flops[key][i] and ref_flops[i] else None for i in (0, 1)]
        med = {k: {n: float(np.median(t)) for n, t in found.items() if t} for k, found in (("prompt", prompt), ("batch", batch), ("decode", decode))}

        def per_flop(kind, ratio, name=name, ref=ref):
            found = {"prompt": prompt, "batch": batch, "decode": decode}[kind]
            if not found.get(name) or not found.get(ref) or not ratio:
                return "–"
            return f"{float(np.median([a / b for a, b in zip(found[name], found[ref], strict=True)])) / ratio:.2f}"

        def paired(found, name=name, twin=twin, fused=key[1]):
            if not fused or not found.get(name) or not found.get(twin):
                return "–"
            return _spread([a / b for a, b in zip(found[name], found[twin], strict=True)])

        tps = f"{args.batch * args.seq * 1000.0 / med['batch'][name]:.0f}" if name in med["batch"] else "–"
        dms = f"{med['decode'][name]:.1f}" if name in med["decode"] else "–"
        flop_cell = " / ".join("–" if r is None else f"{r:.2f}" for r in ratios)
        per_flop_cell = " / ".join((per_flop("prompt", ratios[0]), per_flop("batch", ratios[0]), per_flop("decode", ratios[1])))
        hist = ", ".join(f"{k} {v}" for k, v in ops[key].items()) or "none"
        lines.append(
            f"| {key[0]} | {'yes' if key[1] else 'no'} | {flop_cell} | {med['prompt'][name]:.1f} | {tps} | {dms} | {per_flop_cell} "
            f"| {paired(prompt)} | {paired(batch)} | {paired(decode)} | {hist} |"
        )
        raw[name] = {"path": str(graphs[key]), "flops_per_token": {"prompt": flops[key][0], "decode": flops[key][1], "kind": args.flops},
                     "fused_ops": ops[key], "prompt_ms": prompt[name], "batch_ms": batch.get(name), "decode_ms_per_token": decode.get(name)}
    table = "\n".join(lines) + "\n"
    if args.out is None:
        print(table)
    else:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
