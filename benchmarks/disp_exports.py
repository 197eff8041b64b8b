"""Does DISP rewrite two exports of the same model alike? (the with-past export against the
plain dynamo one: same weights, different graphs.)

    python benchmarks/disp_exports.py A.onnx B.onnx --calib calib.txt --work DIR \
        [--ratio 0.2] [--tokens 4096] [--method disp|disp-free|disp-nested]

Both exports are optimized with ``--method M --target residual`` (default ``disp``) on the same calibration
text, and compared: the dense exports' logits on the same tokens (the reference: they should
agree to float rounding), the subsets each run chose (site by site, in graph order), and the
DISP graphs' logits on the same tokens (``past`` inputs of a with-past export are empty).
Equal subsets and equal logits: the rewrite is the same on both; equal subsets but different
logits: one rewrite is wrong; different subsets: the scores (calibration, readers found)
differ between the exports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from graphresize.calibrate import tokens
from graphresize.io.modelio import load_model
from graphresize.io.ort_utils import make_feeds, make_session
from graphresize.pipeline import OptimizeOptions, run_optimize


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = make_session(load_model(path))
    return session.run([session.get_outputs()[0].name], make_feeds(session, ids))[0].astype(np.float64)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--method", choices=("disp", "disp-free", "disp-nested"), default="disp")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    stream = tokens.read_token_stream(args.calib, tokens.find_tokenizer(args.a, None))
    ids = stream[-args.seq:].reshape(1, -1).astype(np.int64)  # the text's last tokens: not among the calibration windows
    results = {}
    for name, path in (("a", args.a), ("b", args.b)):
        out = args.work / f"{name}.disp{args.ratio:g}.onnx"
        options = OptimizeOptions(ratio=args.ratio, target="residual", method=args.method, calib=args.calib, tokens=args.tokens,
                                  overwrite=True, progress=False, plots=False)
        result = run_optimize(path, out, options)
        results[name] = (out, result)
        v = result.verification
        print(json.dumps({"export": str(path), "holdout_rel_error": v.relative_error, "holdout_top1": v.top1_agreement}), flush=True)
    (out_a, res_a), (out_b, res_b) = results["a"], results["b"]
    sites_a = [s.keep for s in res_a.disp.inputs + res_a.disp.outputs]
    sites_b = [s.keep for s in res_b.disp.inputs + res_b.disp.outputs]
    same = [ka == kb for ka, kb in zip(sites_a, sites_b, strict=True)]
    overlap = [len(set(ka) & set(kb)) / max(len(ka), 1) for ka, kb in zip(sites_a, sites_b, strict=True)]
    dense = relative(logits(args.b, ids), logits(args.a, ids))
    rewritten = relative(logits(out_b, ids), logits(out_a, ids))
    print(json.dumps({"sites": len(same), "equal_subsets": sum(same), "min_overlap": round(min(overlap), 4),
                      "dense_logits_rel_diff": dense, "disp_logits_rel_diff": rewritten}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
