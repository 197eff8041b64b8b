"""Op-type shares of ONNX Runtime node time, several graphs alternated (benchmarks/gqa.md).

    python benchmarks/gqa_op_shares.py --seq 1 --past 128 --rounds 4 A.onnx B.onnx ...

Each graph gets a profiling CPU session (2 intra-op threads); after one warm-up run each,
``--rounds`` times every graph runs 4 times in turn, so load on a shared machine hits all
alike. Prints per graph the node time per run, the share of it outside the weight products
(every op but MatMul / FusedMatMul / Gemm / MatMulNBits: the width-independent work; in an
unfused graph attention's own MatMuls count as weight products here), also from the fastest
single run of each part (the least disturbed by other processes), and the top op types with
their share and nodes per run. Shares move less with load than wall-clock times.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphresize.io.ort_utils import make_feeds

WEIGHT_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "MatMulNBits"})


def _per_run_times(events: list[dict], runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Node time (µs) of the weight products and of every other op in each of ``runs``."""
    weight, other = np.zeros(len(runs)), np.zeros(len(runs))
    for i, run in enumerate(runs):
        start, end = run["ts"], run["ts"] + run["dur"]
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and start <= e["ts"] <= end:
                if e["args"]["op_name"] in WEIGHT_OPS:
                    weight[i] += e["dur"]
                else:
                    other[i] += e["dur"]
    return weight, other


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--seq", type=int, default=1, help="new tokens per run (default 1)")
    parser.add_argument("--past", type=int, default=128, help="cached tokens (default 128)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    sessions = []
    for path in args.models:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.enable_profiling = True
        options.profile_file_prefix = tempfile.mkdtemp() + "/profile"
        options.log_severity_level = 3
        sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    ids = np.random.default_rng(0).integers(0, 1000, size=(1, args.seq), dtype=np.int64)
    feeds = [make_feeds(s, ids, past_len=args.past) for s in sessions]
    for session, feed in zip(sessions, feeds, strict=True):
        session.run(None, feed)  # warm-up, dropped below
    for _ in range(args.rounds):
        for session, feed in zip(sessions, feeds, strict=True):
            for _ in range(4):
                session.run(None, feed)
    for path, session in zip(args.models, sessions, strict=True):
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
        warm_end = runs[0]["ts"] + runs[0]["dur"]
        time, count = collections.Counter(), collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= warm_end:
                time[e["args"]["op_name"]] += e["dur"]
                count[e["args"]["op_name"]] += 1
        k, total = len(runs) - 1, sum(time.values())
        other = sum(v for op, v in time.items() if op not in WEIGHT_OPS)
        weight, rest = _per_run_times(events, runs[1:])
        print(f"{path} seq {args.seq} past {args.past}: {k} runs, node time/run {total / k / 1000:.1f} ms, "
              f"width-independent {100 * other / total:.1f}% ({other / k / 1000:.1f} ms/run); fastest run of each "
              f"part: weight {weight.min() / 1000:.1f} ms, other {rest.min() / 1000:.1f} ms, share "
              f"{100 * rest.min() / (rest.min() + weight.min()):.1f}%; nodes/run {sum(count.values()) // k}")
        print("   " + ", ".join(f"{op} {100 * v / total:.1f}% ({count[op] // k})" for op, v in time.most_common(12)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
