"""Peak resident memory of ``graphresize optimize`` on a synthetic model stored with external
data, against the model's size.

    python benchmarks/large_model_rss.py --work /tmp/big --blocks 30 --hidden 1024 --inner 4096 [--engine segment]
    python benchmarks/large_model_rss.py --work /tmp/smol --model /work/cache/smollm2-onnx/model.onnx \
        --calib /work/cache/eval/calib.txt --tokens 4096 --seq-len 256 --method prune --engine segment

The model is ``tests/tiny_graphs.py``'s form (embedding, residual MLP blocks, LM head) at
the given sizes, fp32 (about ``blocks * 2 * hidden * inner * 4`` bytes). Its weights are
written block by block through lazy tensors, so building it never holds them all. ``optimize``
runs in a fresh process (MLP target, ratio 0.3); the script prints the model's bytes, the
report's peak RSS per stage and the process's peak RSS (``getrusage`` of the child: the
number ``/usr/bin/time -v`` prints; the report's largest stage agrees with it since the per-stage
counter stopped resetting the kernel's high-water mark). ``--model`` measures an existing model
instead (its ``.onnx`` and data files are the bytes it is compared with); ``--engine`` picks the
calibration engine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir


def _lazy(name: str, shape: tuple[int, ...], seed: int, scale: float) -> ir.Value:
    def make():
        rng = np.random.default_rng(seed)
        return ir.tensor((scale * rng.standard_normal(shape, dtype=np.float32)), name=name)

    tensor = ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=tensor)


def build(path: Path, blocks: int, hidden: int, inner: int, vocab: int = 256) -> Path:
    """Write the synthetic model with external data beside ``path``."""
    ids = ir.Value(name="input_ids", shape=ir.Shape(["b", "s"]), type=ir.TensorType(ir.DataType.INT64))
    inits = [_lazy("emb", (vocab, hidden), 0, 1.0), _lazy("head", (hidden, vocab), 1, hidden**-0.5)]
    nodes = [ir.node("Gather", [inits[0], ids], name="embed")]
    x = nodes[-1].outputs[0]
    for i in range(blocks):
        w1 = _lazy(f"w1_{i}", (hidden, inner), 10 + 2 * i, hidden**-0.5)
        w2 = _lazy(f"w2_{i}", (inner, hidden), 11 + 2 * i, 0.3 * inner**-0.5)
        inits += [w1, w2]
        fc1 = ir.node("MatMul", [x, w1], name=f"fc1_{i}")
        act = ir.node("Relu", fc1.outputs, name=f"act{i}")
        fc2 = ir.node("MatMul", [act.outputs[0], w2], name=f"fc2_{i}")
        res = ir.node("Add", [x, fc2.outputs[0]], name=f"residual_{i}")
        nodes += [fc1, act, fc2, res]
        x = res.outputs[0]
    head = ir.node("MatMul", [x, inits[1]], name="lm_head")
    nodes.append(head)
    logits = head.outputs[0]
    logits.name, logits.dtype, logits.shape = "logits", ir.DataType.FLOAT, ir.Shape(["b", "s", vocab])
    graph = ir.Graph([ids], [logits], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="big")
    ir.save(ir.Model(graph, ir_version=9), path, external_data=path.name + ".data")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inner", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--method", default="dotresize", help="optimize --method (prune solves fastest)")
    parser.add_argument("--engine", default="whole", help="optimize --engine (whole or segment)")
    parser.add_argument("--target", default="mlp", help="optimize --target (default mlp)")
    parser.add_argument("--model", type=Path, help="measure this model instead of building the synthetic one")
    parser.add_argument("--calib", type=Path, help="calibration text or ids (default: random ids, for the synthetic model)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="optimize --workers (Ray shards; segment engine)")
    parser.add_argument("--keep", action="store_true", help="keep the output model (default: removed after measuring)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        model = args.work / "big.onnx"
        build(model, args.blocks, args.hidden, args.inner)
    else:
        model = args.model
    calib = args.calib
    if calib is None:
        calib = args.work / "tokens.npy"
        np.save(calib, np.random.default_rng(0).integers(0, 256, size=4096))
    out, report = args.work / "big.small.onnx", args.work / "big.small.report.json"
    cmd = [sys.executable, "-m", "graphresize", "optimize", str(model), "-o", str(out), "--ratio", str(args.ratio),
           "--calib", str(calib), "--tokens", str(args.tokens), "--seq-len", str(args.seq_len), "--target", args.target,
           "--method", args.method, "--engine", args.engine, "--overwrite", "--report", str(report), "-q", "--no-sidecars"]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    data = json.loads(report.read_text())
    size_mb = sum(p.stat().st_size for p in model.parent.glob(model.name + "*")) / 2**20
    out_mb = sum(p.stat().st_size for p in args.work.glob("big.small.onnx*")) / 2**20
    print(f"model {size_mb:.0f} MiB on disk, output {out_mb:.0f} MiB; {args.tokens} calibration tokens, wall {wall:.0f} s")
    print(f"peak RSS per stage (MiB): {data['peak_rss_mb']}")
    print(f"time per stage (s): {data.get('timings_s')}")
    print(f"process peak RSS {peak_mb:.0f} MiB = {peak_mb / size_mb:.2f} x the model's bytes"
          f" (report's largest stage: {max(data['peak_rss_mb'].values()):.0f} MiB)")
    if not args.keep:
        for path in args.work.glob("big.small.onnx*"):
            path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
