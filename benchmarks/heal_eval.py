"""Score models with the bench protocol (``benchmarks/run.py``): perplexity on the first
``--eval-tokens`` of PTB test and of the held-out tail of the calibration text (wiki), windows
of 512, and KL(dense‖model) on the wiki windows.

    python benchmarks/heal_eval.py DENSE.onnx MODEL.onnx [MODEL.onnx ...] --data DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402

from graphresize.io.modelio import load_model  # noqa: E402
from graphresize.io.ort_utils import make_session  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--text", type=Path, required=True, help="PTB test text")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out tail of the calibration text (run.split_calibration)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args()
    streams = {"ptb": run.token_stream(args.text, args.dense, None), "wiki": run.token_stream(args.heldout, args.dense, None)}
    settings = run.Settings(args.eval_tokens, 512, 0, 0, 0, False)
    dense = run.CachedSession(make_session(load_model(args.dense)))
    for path in args.models:
        scores, _ = run.score_model(path, streams, dense, settings)
        print(json.dumps({"model": str(path), **scores}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
