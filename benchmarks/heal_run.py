"""Heal a narrowed model against its dense model and print the result as JSON (one line).

    python benchmarks/heal_run.py DENSE.onnx NARROW.onnx OUT.onnx --calib calib.txt --steps 48 --lr 2e-4

``--teacher-cache FILE`` (recipe searches only): the dense targets of every calibration window
are computed once, saved to FILE and reused by later runs with the same dense model, windows,
temperature and top-k (the caller keeps FILE apart per setting); the reported heal seconds then
exclude the dense targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from graphresize.recover import heal_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path)
    parser.add_argument("narrow", type=Path)
    parser.add_argument("output", type=Path)
    add_window_options(parser)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--teacher-cache", type=Path)
    args = parser.parse_args()
    if args.teacher_cache:
        _cache_teacher(args.teacher_cache)
    result = heal_file(args.dense, args.narrow, args.output, args.calib, tokens=args.tokens, seq_len=args.seq_len,
                       steps=args.steps, lr=args.lr, batch_size=args.batch_size, temperature=args.temperature,
                       top_k=args.top_k, seed=args.seed, threads=args.threads, precision=args.precision, overwrite=True)
    heal = {f.name: getattr(result.heal, f.name) for f in dataclasses.fields(result.heal) if f.name != "weights"}
    print(json.dumps({"output": str(result.output), "calib_windows": result.calib_windows, **heal}, default=str))
    return 0


def add_window_options(parser: argparse.ArgumentParser) -> None:
    """The options that fix the calibration windows and the dense targets: a teacher cache is
    valid only for the values it was made with (``heal_teacher.py`` takes the same ones)."""
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)


def save_teacher(path: Path, windows, logp, ids) -> None:
    """The teacher-cache file: the windows' shape and token sum (to recognise them) and the
    top-k log-probabilities with their token ids."""
    import torch

    torch.save({"shape": windows.shape, "sum": int(windows.sum()), "logp": logp, "ids": ids}, path)


def _cache_teacher(path: Path) -> None:
    import torch

    from graphresize.recover import distill

    compute = distill._teacher

    def cached(session, dense, windows, used, settings, progress):
        if path.exists():
            saved = torch.load(path)
            if tuple(saved["shape"]) == windows.shape and int(saved["sum"]) == int(windows.sum()):
                return distill._Teacher(logp=saved["logp"], ids=saved["ids"])
        teacher = compute(session, dense, windows, range(len(windows)), settings, progress)
        save_teacher(path, windows, teacher.logp, teacher.ids)
        return teacher

    distill._teacher = cached


if __name__ == "__main__":
    raise SystemExit(main())
