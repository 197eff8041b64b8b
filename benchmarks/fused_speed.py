"""Unfused against fused, side by side: prompt latency, batch throughput and decode per token.

    python benchmarks/fused_speed.py --dense model.onnx --dense-fused dense.fused.onnx \\
        --row prune-mlp=prune.nofuse.onnx,prune.fuse.onnx [--row ...] [--out speed.md]

Every graph is loaded at once and the runs alternate between them (as ``graphresize bench``
does), so load on a shared machine hits all alike. Unfused rows are compared with the dense
input, fused rows with the dense model fused by ``optimize --ratio 0``; latency/FLOP divides each
time ratio by the row's weight-FLOP ratio. Decode is timed only for graphs with past/present
inputs. Writes a Markdown table (stdout, or ``--out``) and the raw numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from graphresize.fusion import fused_op_histogram
from graphresize.io.modelio import load_model
from graphresize.io.ort_utils import make_session
from graphresize.verify.evaluate import cache_io, decode_latency, latency, weight_flops_per_token


def _row(spec: str) -> tuple[str, Path, Path]:
    label, _, paths = spec.partition("=")
    plain, _, fused = paths.partition(",")
    if not (label and plain and fused):
        raise argparse.ArgumentTypeError(f"--row LABEL=UNFUSED.onnx,FUSED.onnx, got {spec!r}")
    return label, Path(plain), Path(fused)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, required=True)
    parser.add_argument("--dense-fused", type=Path, required=True)
    parser.add_argument("--row", type=_row, action="append", default=[])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-runs", type=int, default=3)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--decode-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    graphs = {("dense", False): args.dense, ("dense", True): args.dense_fused}
    for label, plain, fused in args.row:
        graphs[(label, False)], graphs[(label, True)] = plain, fused
    sessions, flops, ops = {}, {}, {}
    for key, path in graphs.items():
        model = load_model(path)
        flops[key], ops[key] = weight_flops_per_token(model), fused_op_histogram(model)
        sessions[key] = make_session(model, threads=args.threads)
        del model
    named = {f"{k[0]}|{int(k[1])}": s for k, s in sessions.items()}
    print(f"prompt: batch 1 x {args.seq}, {args.runs} runs", file=sys.stderr)
    prompt = latency(named, batch=1, seq_len=args.seq, runs=args.runs)
    print(f"throughput: batch {args.batch} x {args.seq}, {args.batch_runs} runs", file=sys.stderr)
    batch = latency(named, batch=args.batch, seq_len=args.seq, runs=args.batch_runs, warmup=1) if args.batch else {}
    cached = {n: s for n, s in named.items() if cache_io(s)}
    decode = {}
    if args.decode and cached:
        print(f"decode: {args.decode} tokens through the KV cache, {args.decode_runs} runs", file=sys.stderr)
        decode = decode_latency(cached, batch=1, prompt_len=args.seq, steps=args.decode, runs=args.decode_runs)

    lines = [
        f"| row | fused | FLOP ratio | prompt ms (b1×{args.seq}) | b{args.batch} tok/s | decode tok/s | prompt lat/FLOP "
        f"| b{args.batch} lat/FLOP | decode lat/FLOP | fused vs unfused: prompt / b{args.batch} / decode | fused ops |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    raw = {}
    for key in graphs:
        name, ref = f"{key[0]}|{int(key[1])}", f"dense|{int(key[1])}"
        twin = f"{key[0]}|0"
        fr = flops[key] / flops[("dense", key[1])]

        def per_flop(found, attr, name=name, ref=ref, fr=fr):
            if name not in found or ref not in found:
                return "–"
            return f"{getattr(found[name], attr) / getattr(found[ref], attr) / fr:.2f}"

        def vs_twin(found, attr, name=name, twin=twin, fused=key[1]):
            if not fused or name not in found or twin not in found:
                return "–"
            return f"{getattr(found[name], attr) / getattr(found[twin], attr):.2f}"

        tps = f"{batch[name].tokens_per_s:.0f}" if name in batch else "–"
        dps = f"{decode[name].tokens_per_s:.1f}" if name in decode else "–"
        twin_cell = " / ".join((vs_twin(prompt, "median_ms"), vs_twin(batch, "median_ms"), vs_twin(decode, "median_ms_per_token")))
        hist = ", ".join(f"{k} {v}" for k, v in ops[key].items()) or "none"
        lines.append(
            f"| {key[0]} | {'yes' if key[1] else 'no'} | {fr:.2f} | {prompt[name].median_ms:.1f} | {tps} | {dps} "
            f"| {per_flop(prompt, 'median_ms')} | {per_flop(batch, 'median_ms')} | {per_flop(decode, 'median_ms_per_token')} "
            f"| {twin_cell} | {hist} |"
        )
        raw[name] = {"path": str(graphs[key]), "flops_per_token": flops[key], "fused_ops": ops[key],
                     "prompt_ms": prompt[name].median_ms,
                     "batch_tokens_per_s": batch[name].tokens_per_s if name in batch else None,
                     "decode_tokens_per_s": decode[name].tokens_per_s if name in decode else None}
    table = "\n".join(lines) + "\n"
    if args.out is None:
        print(table)
    else:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
