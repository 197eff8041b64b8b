"""Compute the dense model's healing targets for every calibration window once and save them
in ``heal_run.py --teacher-cache``'s format, so that several heals (other narrow models,
steps, learning rates) on the same windows reuse them.

    python benchmarks/heal_teacher.py DENSE.onnx --calib calib.txt --tokens 262144 OUT.pt

The windows are drawn exactly as ``heal_file`` draws them (same ``--tokens``, ``--seq-len``,
``--seed``, 4 hold-out windows); the targets are top-``--top-k`` log-probabilities at
``--temperature`` (the cache is only valid for the settings it was made with).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from graphresize.passes import prepare_passes
from heal_run import add_window_options, save_teacher

from graphresize.calibrate import tokens as token_windows
from graphresize.io import modelio
from graphresize.io.ort_utils import make_session
from graphresize.recover import distill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path)
    parser.add_argument("output", type=Path)
    add_window_options(parser)
    parser.add_argument("--reuse", type=Path, action="append", default=[],
                        help="an earlier cache made with the same settings: its windows' targets are copied, not recomputed")
    args = parser.parse_args()
    start = time.perf_counter()
    dense = modelio.load_model(args.dense)
    prepare_passes()(dense)
    tok = token_windows.find_tokenizer(args.dense, None)
    stream = token_windows.read_token_stream(args.calib, tok)
    windows = token_windows.make_windows(stream, seq_len=args.seq_len, tokens=args.tokens, holdout_windows=4, seed=args.seed,
                                         source=str(args.calib)).calib
    settings = distill.HealSettings(batch_size=args.batch_size, temperature=args.temperature, top_k=args.top_k,
                                    threads=args.threads)
    session = make_session(dense, threads=args.threads or None)
    known = _reusable(args.reuse, stream, args)
    missing = [i for i, row in enumerate(windows) if row.tobytes() not in known]
    teacher = distill._teacher(session, dense, windows, missing, settings, True)
    logp, ids = teacher.logp, teacher.ids
    if logp is None:  # every window was cached
        first = next(iter(known.values()))
        logp = torch.zeros(len(windows), windows.shape[1], first[0].shape[-1], dtype=torch.float32)
        ids = torch.zeros(len(windows), windows.shape[1], first[0].shape[-1], dtype=torch.int64)
    for i, row in enumerate(windows):
        if row.tobytes() in known:
            logp[i], ids[i] = known[row.tobytes()]
    save_teacher(args.output, windows, logp, ids)
    print(json.dumps({"windows": len(windows), "computed": len(missing), "seconds": round(time.perf_counter() - start, 1),
                      "output": str(args.output)}))
    return 0


def _reusable(paths: list[Path], stream, args) -> dict[bytes, tuple]:
    """Targets by window bytes from earlier caches (their windows recovered by drawing with
    the token count their shape says)."""
    known = {}
    for path in paths:
        saved = torch.load(path)
        n, seq = saved["shape"]
        if seq != args.seq_len:
            continue
        old = token_windows.make_windows(stream, seq_len=seq, tokens=n * seq, holdout_windows=4, seed=args.seed,
                                         source=str(args.calib)).calib
        if int(old.sum()) != int(saved["sum"]):
            raise SystemExit(f"{path}: its windows are not the ones drawn from {args.calib}")
        for i, row in enumerate(old):
            known[row.tobytes()] = (saved["logp"][i], saved["ids"][i])
    return known


if __name__ == "__main__":
    raise SystemExit(main())
