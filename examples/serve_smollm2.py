"""Serve the compressed SmolLM2 with ONNX Runtime: greedy generation from a prompt.

    python examples/serve_smollm2.py "What is the capital of France?"
    python examples/serve_smollm2.py --model small.onnx --provider cuda --max-new-tokens 64 "Hi"

The model defaults to the `make demo` output (`$GRAPHRESIZE_CACHE/out/smollm2.r30.onnx`, the
cache defaulting to ./.cache). The tokenizer is `tokenizer.json` beside the model, else beside
the input model named in the model's report (`*.report.json`), else `--tokenizer DIR`.
Graphs without a key/value cache are run on the whole sequence at every step; graphs with one
(`graphresize export --with-past`) feed back `present.*` as `past_key_values.*`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
CHAT = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def default_model() -> Path:
    cache = Path(os.environ.get("GRAPHRESIZE_CACHE", REPO / ".cache"))
    return cache / "out" / "smollm2.r30.onnx"


def find_tokenizer(model: Path, explicit: Path | None) -> Path:
    """tokenizer.json: --tokenizer, beside the model, or beside the input named in its report."""
    candidates = [explicit] if explicit else []
    candidates.append(model.parent)
    report = model.with_name(model.stem + ".report.json")
    if report.is_file():
        candidates.append(Path(json.loads(report.read_text())["input"]["path"]).parent)
    for folder in candidates:
        path = folder / "tokenizer.json" if folder.is_dir() else folder
        if path.is_file():
            return path
    raise SystemExit(f"no tokenizer.json for {model}: pass --tokenizer DIR")


class Generator:
    """Greedy decoding with an ONNX Runtime session over a transformer graph."""

    def __init__(self, model: Path, provider: str = "cpu", threads: int | None = None):
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
        if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit("CUDAExecutionProvider is not available: install onnxruntime-gpu")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), options, providers=providers)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]

    def _feeds(self, ids: np.ndarray, past: dict[str, np.ndarray], total: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None, :]
        for name in self.past:
            if name in past:
                feeds[name] = past[name]
            else:  # empty cache: [batch, kv_heads, 0, head_dim]
                shape = [d if isinstance(d, int) else 0 for d in self.inputs[name].shape]
                shape[0] = 1
                feeds[name] = np.zeros(shape, dtype=np.float32)
        return feeds

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop: set[int]):
        """Yield each new token id, greedy (argmax of the last position's logits)."""
        ids = list(prompt_ids)
        past: dict[str, np.ndarray] = {}
        step = np.array([ids], dtype=np.int64)
        outputs = [o.name for o in self.session.get_outputs()]
        for _ in range(max_new_tokens):
            results = self.session.run(None, self._feeds(step, past, len(ids)))
            token = int(results[0][0, -1].argmax())
            if token in stop:
                return
            yield token
            ids.append(token)
            if self.past:  # feed the cache back, then only the new token
                past = {n.replace("present.", "past_key_values."): r for n, r in zip(outputs[1:], results[1:], strict=True)}
                step = np.array([[token]], dtype=np.int64)
            else:
                step = np.array([ids], dtype=np.int64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--model", type=Path, default=default_model(), help="compressed .onnx (default: the make demo output)")
    parser.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: not found; run `make demo` first or pass --model")

    tokenizer = Tokenizer.from_file(str(find_tokenizer(args.model, args.tokenizer)))
    text = args.prompt if args.raw else CHAT.format(prompt=args.prompt)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
    stop = {i for i in (tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")) if i is not None}

    t0 = time.perf_counter()
    generator = Generator(args.model, args.provider, args.threads)
    load_s = time.perf_counter() - t0
    print(f"{args.model} ({', '.join(generator.session.get_providers())}; {'with' if generator.past else 'no'} KV cache), loaded in {load_s:.1f}s", file=sys.stderr)
    print(args.prompt if args.raw else f"> {args.prompt}", file=sys.stderr)

    new: list[int] = []
    start = time.perf_counter()
    first = None
    for token in generator.generate(prompt_ids, args.max_new_tokens, stop):
        if first is None:
            first = time.perf_counter() - start
        new.append(token)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(new, skip_special_tokens=True))
    rate = len(new) / elapsed if elapsed > 0 else float("nan")
    print(
        f"{len(new)} tokens in {elapsed:.2f}s: {rate:.1f} tokens/s "
        f"(prompt {len(prompt_ids)} tokens, first token after {1000 * (first or 0):.0f} ms)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
