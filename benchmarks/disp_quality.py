"""Quality of DISP's free subsets against nested ones (prefixes of one feature order: one
permutation of the stream makes every subset a range, read by ``Slice``, written by ``Pad``).

    python benchmarks/disp_quality.py MODEL.onnx --calib calib.txt --work DIR \
        --rows disp:0.2:free,disp:0.2:nested,dotresize+disp:0.3:nested ... \
        [--text ptb.test.txt --heldout heldout.txt] [--json OUT.json]

Each row is ``METHOD:RATIO:SUBSETS`` (``free`` or ``nested``), optimized with ``--target
residual`` and the quality protocol's calibration (``--tokens``, seed 0, the default 4
hold-out windows) from one statistics cache (``DIR/stats``), so the rows of a method differ
only in the selection. Prints per row the hold-out calibration agreement ``optimize``
verifies (relative logit error, top-1, perplexity on the held-back calibration windows: the
numbers to choose by), and, with ``--text``/``--heldout``, PTB and held-out wiki perplexity
on their first ``--eval-tokens`` (windows of 512, ``heal_eval.py``'s protocol; report only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402

from graphresize.io.modelio import load_model  # noqa: E402
from graphresize.io.ort_utils import make_session  # noqa: E402
from graphresize.methods import registry  # noqa: E402
from graphresize.pipeline import OptimizeOptions, run_optimize  # noqa: E402

SUBSETS = {"free": False, "nested": True}


def parse_row(text: str) -> tuple[str, float, str]:
    method, ratio, subsets = text.rsplit(":", 2)
    if subsets not in SUBSETS:
        raise SystemExit(f"row {text}: subsets must be one of {', '.join(SUBSETS)}")
    return method, float(ratio), subsets


def build(model: Path, out: Path, method: str, ratio: float, subsets: str, args) -> dict:
    cls = type(registry.get(method))
    previous = cls.nested
    cls.nested = SUBSETS[subsets]
    try:
        options = OptimizeOptions(ratio=ratio, target="residual", method=method, calib=args.calib, tokens=args.tokens,
                                  stats_cache=args.work / "stats", overwrite=True, progress=False, plots=False)
        start = time.perf_counter()
        result = run_optimize(model, out, options)
    finally:
        cls.nested = previous
    v = result.verification
    return {"method": method, "ratio": ratio, "subsets": subsets, "model": str(out), "params": result.params_after,
            "holdout_rel_error": v.relative_error, "holdout_top1": v.top1_agreement,
            "holdout_ppl": v.perplexity_after, "holdout_ppl_dense": v.perplexity_before,
            "kept_share": result.disp.kept_share() if result.disp else None, "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--text", type=Path)
    parser.add_argument("--heldout", type=Path)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dense = streams = None
    if args.text and args.heldout:
        streams = {"ptb": run.token_stream(args.text, args.model, None), "wiki": run.token_stream(args.heldout, args.model, None)}
        dense = run.CachedSession(make_session(load_model(args.model)))
    settings = run.Settings(args.eval_tokens, 512, 0, 0, 0, False)
    results = []
    for text in args.rows.split(","):
        method, ratio, subsets = parse_row(text)
        out = args.work / f"{method.replace('+', '_')}-{ratio:g}-{subsets}.onnx"
        row = build(args.model, out, method, ratio, subsets, args)
        if streams is not None:
            scores, _ = run.score_model(out, streams, dense, settings)
            row.update({k: scores[k] for k in ("ptb_ppl", "wiki_ppl", "wiki_top1", "wiki_kl") if k in scores})
        print(json.dumps(row), flush=True)
        results.append(row)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
