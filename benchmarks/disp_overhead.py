"""Index-node overhead of a DISP graph (``--method disp``) in ONNX Runtime CPU.

    python benchmarks/disp_overhead.py ORIGINAL.onnx DISP.onnx [--seq 128] [--runs 10]

Prints the median latency of both graphs and, from ORT's node profile of the DISP graph, the
share of node time spent in the nodes DISP added (names containing ``.disp_``: Gather/Slice
before the readers, Shape/Expand/ScatterElements or Pad after the writers, fp16 Casts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphresize.ort_utils import make_feeds


def _session(path: str, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def latency(path: str, ids: np.ndarray, runs: int) -> float:
    session = _session(path)
    feeds = make_feeds(session, ids)
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def index_share(path: str, ids: np.ndarray, runs: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(path, str(Path(tmp) / "disp"))
        feeds = make_feeds(session, ids)
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes)
    added = [e for e in nodes if ".disp_" in e["name"]]
    by_op: dict[str, float] = {}
    for e in added:
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"] / total
    print("DISP node time by op: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])))
    return (sum(e["dur"] for e in added) / total if total else 0.0), len({e["name"] for e in added})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original")
    parser.add_argument("disp")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    ids = np.random.default_rng(0).integers(0, 1000, size=(1, args.seq))
    before, after = latency(args.original, ids, args.runs), latency(args.disp, ids, args.runs)
    share, count = index_share(args.disp, ids, args.runs)
    print(f"original {1000 * before:.1f} ms, disp {1000 * after:.1f} ms ({after / before:.2f}x); "
          f"DISP index nodes: {count}, {100 * share:.1f}% of node time")


if __name__ == "__main__":
    main()
