"""Index-node overhead of DISP graphs in ONNX Runtime CPU, against a physically narrow graph.

    python benchmarks/disp_overhead.py dense=ORIG.onnx disp=DISP.onnx narrow=NARROW.onnx \
        [--seq 128] [--runs 20] [--threads 2] [--fuse DIR] [--decode 32 --decode-runs 6] \
        [--out benchmarks/disp_overhead.md]

``--fuse DIR``: every graph is first put through ``optimize --fuse``'s step
(``graphresize.fusion.fuse_for_ort``, checked against the unfused graph) and the fused copy,
written to ``DIR``, is what is timed and profiled. Every ``NAME=PATH`` graph is timed in one
process with runs interleaved between the graphs (``--runs`` prompt passes), so load on a
shared machine hits all alike. For each: weight FLOPs per token, the prompt FLOP ratio to the
first graph counting every matrix product (``graphresize.verify.flops``: weights and
attention), median latency, the median of the per-run ratios to the first graph's run made
beside it (paired: robust to load drift), that ratio over the FLOP ratio (latency/FLOP);
with ``--decode N`` (graphs with a KV cache) the same for ``N`` greedy tokens after the
prompt (time per token, over the decode FLOP ratio of those steps); the share of ORT node time spent in the nodes DISP
added (names containing ``.disp_``: Slice or Expand/GatherElements before the readers,
Pad/Expand/GatherElements after the writers (Pad alone for a contiguous subset), and the shared Shape/Concat
of the expand shapes) from ORT's node profile, and the
fused-op histogram of ORT's optimised graph (``SessionOptions.optimized_model_filepath``):
how many residual ``Add`` + norm pairs ORT fused into ``SkipSimplifiedLayerNormalization``.
Writes a markdown table to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphresize.io.ort_utils import make_feeds
from graphresize.verify.evaluate import decode_latency, latency, weight_flops_per_token
from graphresize.verify.flops import decode_flops_per_token, prompt_flops_per_token

FUSED = ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "ScatterElements", "GatherElements", "Pad", "Slice")


def _options(threads: int, profile: str | None = None, optimized: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    if optimized:
        options.optimized_model_filepath = optimized
    return options


def fused_histogram(path: str, threads: int) -> collections.Counter:
    """Op types of ORT's optimised graph (what the CPU provider actually runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(path, _options(threads, optimized=out), providers=["CPUExecutionProvider"])
        model = onnx.load(out, load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)


def index_share(path: str, ids: np.ndarray, runs: int, threads: int) -> tuple[float, dict[str, float]]:
    """Share of ORT node time in DISP's nodes, in all and by op type."""
    with tempfile.TemporaryDirectory() as tmp:
        session = ort.InferenceSession(path, _options(threads, profile=str(Path(tmp) / "p")), providers=["CPUExecutionProvider"])
        feeds = make_feeds(session, ids)
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes) or 1
    by_op: dict[str, float] = collections.defaultdict(float)
    for e in nodes:
        if ".disp_" in e["name"]:
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"] / total
    return sum(by_op.values()), dict(by_op)


def fused_copy(path: Path, out: Path) -> Path:
    """``path`` through ``optimize --fuse``'s fusion step, saved to ``out``."""
    from graphresize.fusion import fuse_for_ort
    from graphresize.io.modelio import save_model_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    model, outcome = fuse_for_ort(ir.load(path))
    print(f"{path.name}: fused {dict(outcome.after)}, skipped {outcome.skipped}", flush=True)
    save_model_atomic(model, out, overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", help="NAME=PATH, the first is the reference")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fuse", type=Path, default=None, metavar="DIR", help="fuse every graph first (optimize --fuse's step), copies in DIR")
    parser.add_argument("--decode", type=int, default=0, help="greedy tokens per decode run (0: no decode timing)")
    parser.add_argument("--decode-runs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    graphs = dict(g.split("=", 1) for g in args.graphs)
    if args.fuse:
        graphs = {name: str(fused_copy(Path(path), args.fuse / f"{name}.fused.onnx")) for name, path in graphs.items()}
    ids = np.random.default_rng(0).integers(0, 100, size=(1, args.seq), dtype=np.int64)
    sessions = {name: ort.InferenceSession(path, _options(args.threads), providers=["CPUExecutionProvider"]) for name, path in graphs.items()}
    times = latency(sessions, seq_len=args.seq, runs=args.runs, warmup=2)
    decode = decode_latency(sessions, prompt_len=args.seq, steps=args.decode, runs=args.decode_runs) if args.decode else None
    del sessions
    reference = next(iter(graphs))
    rows = [
        "| graph | weight GFLOP/token | prompt FLOP ratio | median ms | × " + reference + " (paired median) | latency/FLOP | "
        + ("decode × " + reference + " (paired median) | decode latency/FLOP | " if decode else "")
        + "index nodes, share of node time | SkipSimplifiedLayerNorm / SimplifiedLayerNorm after ORT | index ops after ORT |",
        "|---|---|---|---|---|---|" + ("---|---|" if decode else "") + "---|---|---|",
    ]
    ref_flops = ref_decode = None
    for name, path in graphs.items():
        model = ir.load(path)
        flops = weight_flops_per_token(model) / 1e9
        prompt = prompt_flops_per_token(model, args.seq)
        ref_flops = ref_flops or prompt
        paired = float(np.median(np.asarray(times[name].times_ms) / np.asarray(times[reference].times_ms)))
        decode_cells = ""
        if decode:
            steps = decode_flops_per_token(model, args.seq, args.decode)
            ref_decode = ref_decode or steps
            dpaired = float(np.median(np.asarray(decode[name].times_ms_per_token) / np.asarray(decode[reference].times_ms_per_token)))
            decode_cells = f"{dpaired:.2f} | {dpaired * ref_decode / steps:.2f} | "
        del model
        share, by_op = index_share(path, ids, max(args.runs // 4, 3), args.threads)
        hist = fused_histogram(path, args.threads)
        ops = ", ".join(f"{op} {hist[op]}" for op in FUSED[2:] if hist[op])
        detail = ", ".join(f"{op} {100 * v:.1f}%" for op, v in sorted(by_op.items(), key=lambda kv: -kv[1]))
        rows.append(
            f"| {name} | {flops:.3f} | {prompt / ref_flops:.3f} | {times[name].median_ms:.1f} | {paired:.2f} | {paired * ref_flops / prompt:.2f} | {decode_cells}"
            f"{100 * share:.1f}%{' (' + detail + ')' if detail else ''} | "
            f"{hist['SkipSimplifiedLayerNormalization']} / {hist['SimplifiedLayerNormalization']} | {ops or '-'} |"
        )
    table = "\n".join(rows)
    header = f"ORT {ort.__version__} CPU, {args.threads} threads, batch 1 × {args.seq} tokens, median of {args.runs} interleaved runs\n\n"
    print(header + table)
    if args.out:
        args.out.write_text(header + table + "\n")


if __name__ == "__main__":
    main()
