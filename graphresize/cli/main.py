"""Command line: ``graphresize analyze | optimize | heal | eval | bench | export``.

Exit codes: 0 ok, 1 input/output error, 2 usage, 3 unsupported model, 4 verification failed
(the graph does not run, or a --verify-tolerance / --min-top1 gate is missed).
Errors print one line to stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from graphresize import errors
from graphresize.cli import options as cliopts
from graphresize.io import exporting
from graphresize.methods import registry
from graphresize.options import TARGETS

EPILOG = (
    "exit codes: 0 ok, 1 input/output error, 2 usage (bad flag or config key), 3 unsupported model, "
    "4 verification failed (graph does not run in ONNX Runtime, or a quality gate is missed; nothing written)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(errors.EXIT_USAGE, f"graphresize: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphresize", description="Make exported transformer ONNX graphs narrower.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    analyze = sub.add_parser("analyze", help="list the width groups of a model", epilog=EPILOG)
    analyze.add_argument("model", type=Path, help="input .onnx")
    analyze.add_argument("--json", action="store_true", help="print the groups as JSON on stdout")
    _common(analyze)

    opt = sub.add_parser(
        "optimize", help="narrow a model and write the result", epilog=EPILOG,
        description="Narrow a model and write the result. `graphresize optimize model.onnx --ratio 0.3` alone uses the "
                    "default recipe (graphresize/methods/defaults.py: prune the MLP neurons, the best measured row per "
                    "parameter), the calibration text shipped with graphresize, and writes model.r30.onnx beside the input.",
    )
    opt.add_argument("model", type=Path, nargs="?", help="input .onnx (never modified)")
    opt.add_argument("-o", "--output", type=Path, help="output .onnx (written atomically; default: beside the input, named by the ratio in percent: model.onnx at --ratio 0.3 -> model.r30.onnx; an existing file is never replaced without --overwrite)")
    opt.add_argument("--ratio", type=float, help="share to remove, in [0, 1) (required here or in --config). With the default recipe (--target mlp --method prune --allocation global unless given) it is the share of the transformer-block parameters removed (every float weight except the embedding and LM head), placed over the layers' MLP neurons by one budget (SmolLM2-135M at 0.3: 134.5M -> 102.7M parameters); with --allocation uniform it is the share of each targeted width removed in every layer, rounded to --multiple-of. The summary states the parameters and FLOPs removed")
    opt.add_argument("--target", choices=tuple(TARGETS), default="all", help="widths to resize: MLP intermediate, residual stream (hidden size), or both (default: the recipe's mlp; all when the --method given cannot run on mlp: pca, disp)")
    opt.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                     help="uniform (flag default; the recipe's is global for --target mlp): every group loses the --ratio share of its width; global (--target mlp): "
                     "--ratio is the share of transformer-block parameters removed (every float weight except the "
                     "embedding/LM-head tables, tied ones once), the MLP widths placed per layer where the calibrated "
                     "output error relative to the stream is least (rounded to --multiple-of, the budget never exceeded)")
    opt.add_argument("--ratio-mlp", type=float, default=None, help="ratio for MLP groups (default: --ratio)")
    opt.add_argument("--ratio-residual", type=float, default=None, help="ratio for the residual stream (default: --ratio)")
    opt.add_argument("--method", choices=registry.names(), default=registry.names()[0],
                     help="; ".join(f"{spec.name}: {spec.help}" for spec in registry.specs()) + " (default: the recipe's prune when --method is not given)")
    opt.add_argument("--unmerge", choices=("auto", "lsq", "ot", "pinv"), default="auto", help="reader map: least squares on calibration statistics (lsq), the OT plan's own (ot), or the pseudo-inverse (pinv; on the residual the orthogonal projection Qᵀ); auto (default): lsq on MLP widths, pinv on the residual stream")
    opt.add_argument("--ratio-heads", type=float, default=0.0, help="share of attention heads to remove per layer (GQA: whole KV groups; default 0)")
    opt.add_argument("--head-method", choices=("refit", "prune", "global", "query", "ot"), default="refit",
                     help="which heads go (whole KV groups under GQA): least output lost after refitting the output projection (refit, default), least output energy (prune), refit loss with one budget over all layers (global); query: the same number of query heads from every KV group; ot: merge the removed units into the kept ones (values combined, output rows fitted)")
    opt.add_argument("--calib", type=Path, help="calibration text (.txt) or token ids (.npy); default: the English Wikipedia lead paragraphs shipped with graphresize (CC BY-SA 4.0), tokenised with the model's tokenizer.json")
    opt.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: beside the model)")
    opt.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    opt.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    opt.add_argument("--batch-size", type=int, default=4, help="windows per ORT run (default 4)")
    opt.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows (default 0)")
    opt.add_argument("--reg", type=float, default=None, help="entropic regularisation on the median-normalised cost (default 0: exact OT plan)")
    opt.add_argument("--target-mass", choices=("cluster", "uniform"), default="cluster", help="OT target masses: cluster shares (default) or uniform 1/d as in the DOTResize paper")
    opt.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean", help="neuron distance")
    opt.add_argument("--stats-cache", type=Path, metavar="DIR", help="keep calibration statistics in DIR and reuse them in later runs on the same model, text and windows (another ratio or method)")
    opt.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=False, help="rewrite the output into ONNX Runtime's fused ops (RMSNorm, skip-norm, rotary, attention) where the patterns match, each checked against the unfused graph (default off: the fused graph runs only in ONNX Runtime, and onnx.checker rejects it since ORT registers some fused ops in the ONNX domain; on ORT CPU it decodes ~10%% faster, benchmarks/speed.md)")
    opt.add_argument("--engine", choices=("whole", "segment"), default="whole", help="whole: calibrate the whole model in one pass (flag default); segment (the recipe's with --target mlp): segment by segment, one segment in memory at a time, each sub-block's statistics from its already-resized input (--allocation global: from the dense segments, the whole engine's model in bounded memory)")
    opt.add_argument("--workers", type=int, default=0, metavar="N", help="with --engine segment: shard each segment's calibration over a local Ray cluster of N workers (needs graphresize[ray])")
    opt.add_argument("--ray-address", metavar="ADDR", help="with --engine segment: shard each segment's calibration over the Ray cluster at ADDR")
    opt.add_argument("--multiple-of", type=int, default=8, help="round new widths to a multiple of this (default 8)")
    opt.add_argument("--report", type=Path, help="write the JSON report here (default OUT.report.json)")
    opt.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    opt.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _common(opt)
    cliopts.add_optimize_flags(opt)
    cliopts.add_heal_flags(opt)

    heal = sub.add_parser("heal", help="recover an optimized model's quality by distillation from its dense model (needs torch)", epilog=EPILOG)
    heal.add_argument("dense", type=Path, help="the dense model the narrow one was optimized from (never modified)")
    heal.add_argument("narrow", type=Path, help="the optimized model (never modified)")
    heal.add_argument("-o", "--output", type=Path, required=True, help="healed .onnx (written atomically)")
    heal.add_argument("--calib", type=Path, required=True, help="calibration text (.txt) or token ids (.npy); use optimize's to train on the same windows")
    heal.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: beside the dense model)")
    heal.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    heal.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    heal.add_argument("--steps", type=int, default=24, help="training steps (default 24)")
    heal.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (warm-up, cosine to 0; default 3e-4)")
    heal.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    heal.add_argument("--seed", type=int, default=0, help="seed of the windows and the training order (default 0)")
    heal.add_argument("--threads", type=int, default=1, help="torch/ONNX Runtime threads (default 1; 0: torch's default)")
    heal.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto (default): bf16 autocast where the CPU has native bf16, else fp32")
    heal.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    heal.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    _common(heal)

    ev = sub.add_parser("eval", help="perplexity of a model on a text in ONNX Runtime", epilog=EPILOG)
    ev.add_argument("model", type=Path, help="input .onnx")
    ev.add_argument("--text", type=Path, required=True, help="evaluation text (.txt) or token ids (.npy)")
    ev.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: beside the model)")
    ev.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    ev.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    ev.add_argument("--reference", type=Path, help="reference .onnx (e.g. the original): top-1 agreement and mean KL(reference||model) over the same windows")
    ev.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ev.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider (default cpu)")
    _common(ev)

    bench = sub.add_parser("bench", help="prompt and decode latency of one or more models, measured side by side", epilog=EPILOG)
    bench.add_argument("models", type=Path, nargs="+", help="input .onnx files")
    bench.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--batch", type=int, default=1, help="sequences per run (default 1)")
    bench.add_argument("--seq", type=int, default=128, help="prompt tokens (default 128)")
    bench.add_argument("--runs", type=int, default=20, help="timed runs per model (default 20; decode: a quarter, at least 3)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed runs per model first (default 2)")
    bench.add_argument("--decode", type=int, default=0, metavar="N", help="also time N generated tokens after the prompt (KV cache when the graph has one, else re-running the grown sequence)")
    bench.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    _common(bench)
    exporting.add_parser(sub, EPILOG, _common)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _version() -> str:
    from graphresize import __version__

    return __version__


def cmd_analyze(args: argparse.Namespace) -> int:
    from graphresize.cli import report
    from graphresize.pipeline import analyze

    groups = analyze(args.model)
    if args.json:
        print(json.dumps(report.groups_json(groups), indent=2))
    else:
        print(report.groups_table(groups))
    return errors.EXIT_OK


def cmd_optimize(args: argparse.Namespace) -> int:
    from graphresize.options import DEFAULT_REG, OptimizeOptions

    merge = cliopts.prepare(args, build_parser())  # usage errors before the stages are imported
    from graphresize.cli import report
    from graphresize.io.modelio import check_writable
    from graphresize.io.publish import check_target
    from graphresize.pipeline import run_optimize

    options = OptimizeOptions(
        ratio=args.ratio,
        method=args.method,
        unmerge=args.unmerge,
        calib=args.calib,
        tokenizer=args.tokenizer,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        reg=DEFAULT_REG if args.reg is None else args.reg,
        metric=args.metric,
        target_mass=args.target_mass,
        multiple_of=args.multiple_of,
        target=args.target,
        kind_ratios={k: r for k, r in (("mlp", args.ratio_mlp), ("residual", args.ratio_residual)) if r is not None},
        overwrite=args.overwrite,
        progress=not args.quiet,
        head_ratio=args.ratio_heads,
        head_method=args.head_method,
        stats_cache=args.stats_cache,
        fuse=args.fuse,
        engine=args.engine,
        workers=args.workers,
        ray_address=args.ray_address,
        allocation=args.allocation,
        plots=not args.no_sidecars,
        heal_steps=args.heal_steps,
        heal_lr=args.heal_lr,
        heal_batch_size=args.heal_batch_size,
        heal_tokens=args.heal_tokens,
        heal_threads=args.heal_threads,
        heal_precision=args.heal_precision,
    )
    options = merge.finish(options)
    if options.reg < 0:
        raise errors.UsageError("--reg must not be negative")
    if args.report is not None and args.report.resolve() in (args.model.resolve(), args.output.resolve()):
        raise errors.UsageError("--report must not be the input or output model path")
    if args.report is not None:  # before the run: a bad report path must not leave a model behind
        check_target(args.report, overwrite=args.overwrite, what="reports")
        check_writable(args.report)
    result = run_optimize(args.model, args.output, options)
    data = report.optimize_report(result, config=merge.effective(options))
    cliopts.add_sidecars(args, result, data)
    if args.report is not None:
        report.write_json(data, args.report, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(data, indent=2))
    if not args.quiet:
        print(report.summary_table(result, args.report, recipe=getattr(args, "recipe", None)), file=sys.stderr)
    return errors.EXIT_OK


def cmd_heal(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.batch_size < 1 or not args.lr > 0 or args.tokens < 1 or args.seq_len < 2:
        raise errors.UsageError("--steps, --batch-size, --lr and --tokens must be positive, --seq-len at least 2")
    for path in (args.dense, args.narrow):
        if not path.is_file():
            raise errors.InputError(f"{path}: model file not found")
    from graphresize.recover import heal_file, require_torch

    require_torch()  # before any work
    from graphresize.cli import report

    result = heal_file(args.dense, args.narrow, args.output, args.calib, tokenizer=args.tokenizer, tokens=args.tokens,
                       seq_len=args.seq_len, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                       threads=args.threads, precision=args.precision, overwrite=args.overwrite, progress=not args.quiet)
    if args.json:
        print(json.dumps({"output": str(result.output), "files": [str(f) for f in result.files],
                          "calib_source": result.calib_source, "calib_windows": result.calib_windows,
                          "check_windows": result.check_windows, **report.heal_json(result.heal)}))
    if not args.quiet:
        print(report.heal_line(result.heal), file=sys.stderr)
        print(f"{'wrote:':<13}{result.output}", file=sys.stderr)
    return errors.EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from graphresize.calibrate import tokens
    from graphresize.io.modelio import load_model
    from graphresize.io.ort_utils import make_session
    from graphresize.verify.evaluate import evaluate_text

    if args.seq_len < 2:
        raise errors.UsageError("--seq-len must be at least 2")
    tokenizer = None if args.text.suffix == ".npy" or not args.text.is_file() else tokens.find_tokenizer(args.model, args.tokenizer)
    stream = tokens.read_token_stream(args.text, tokenizer)
    if stream.size < args.seq_len:
        raise errors.InputError(f"{args.text}: {stream.size} tokens is fewer than --seq-len {args.seq_len}")
    session = make_session(load_model(args.model), provider=args.provider)
    reference = make_session(load_model(args.reference), provider=args.provider) if args.reference is not None else None
    result, agreement = evaluate_text(
        session, stream, seq_len=args.seq_len, max_tokens=args.max_tokens, reference=reference, progress=not args.quiet
    )
    if args.json:
        data = dataclasses.asdict(result)
        if agreement is not None:
            data["reference"] = {"path": str(args.reference), **dataclasses.asdict(agreement)}
        print(json.dumps(data))
    else:
        print(f"perplexity {result.value:.3f} over {result.tokens} tokens (windows of {result.seq_len})")
        if agreement is not None:
            print(
                f"vs {args.reference}: top-1 agreement {100 * agreement.top1:.2f}%, mean KL(ref||model) "
                f"{agreement.kl:.4f} nats/token, reference perplexity {agreement.reference_perplexity:.3f}"
            )
    return errors.EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from graphresize.io.modelio import load_model
    from graphresize.io.ort_utils import make_session
    from graphresize.verify.evaluate import decode_latency, latency

    if min(args.batch, args.seq, args.runs) < 1 or args.warmup < 0 or args.decode < 0:
        raise errors.UsageError("--batch, --seq and --runs must be positive, --warmup and --decode not negative")
    sessions = {str(p): make_session(load_model(p), provider=args.provider, threads=args.threads) for p in args.models}
    prompt = latency(sessions, batch=args.batch, seq_len=args.seq, runs=args.runs, warmup=args.warmup)
    decode = {}
    if args.decode:
        decode = decode_latency(
            sessions, batch=args.batch, prompt_len=args.seq, steps=args.decode, runs=max(3, args.runs // 4), warmup=min(args.warmup, 1)
        )
    if args.json:
        data = {name: dataclasses.asdict(r) for name, r in prompt.items()}
        for name, r in decode.items():
            data[name]["decode"] = dataclasses.asdict(r)
        print(json.dumps(data))
        return errors.EXIT_OK
    first = next(iter(prompt.values())).median_ms
    print(f"prompt: batch {args.batch} x {args.seq} tokens, median of {args.runs} runs interleaved ({args.provider})")
    for name, r in prompt.items():
        print(f"{r.median_ms:9.2f} ms median  {r.p90_ms:9.2f} ms p90  {r.tokens_per_s:9.1f} tok/s  x{first / r.median_ms:5.2f}  {name}")
    if decode:
        first = next(iter(decode.values())).median_ms_per_token
        d0 = next(iter(decode.values()))
        print(f"decode: {args.decode} tokens after the prompt, batch {args.batch}, median of {d0.runs} runs interleaved")
        for name, r in decode.items():
            print(
                f"{r.median_ms_per_token:9.2f} ms/token  {r.p90_ms_per_token:9.2f} ms p90  {r.tokens_per_s:9.1f} tok/s"
                f"  x{first / r.median_ms_per_token:5.2f}  {name} ({r.mode})"
            )
    return errors.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR)
    if not args.debug:
        warnings.filterwarnings("ignore")
    handler = {"analyze": cmd_analyze, "optimize": cmd_optimize, "heal": cmd_heal, "eval": cmd_eval, "bench": cmd_bench, "export": exporting.cmd_export}[args.command]
    try:
        return handler(args)
    except errors.GraphresizeError as exc:
        if args.debug:
            raise
        if errors.out_of_memory(exc) and not isinstance(exc, errors.UsageError):  # e.g. a session that did not load
            print(f"graphresize: error: out of memory ({exc})", file=sys.stderr)
            return errors.EXIT_ERROR
        print(f"graphresize: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("graphresize: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless --debug
        if args.debug:
            raise
        if errors.out_of_memory(exc):
            print(f"graphresize: error: out of memory ({type(exc).__name__}); free memory or use a machine with more", file=sys.stderr)
            return errors.EXIT_ERROR
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"graphresize: internal error: {type(exc).__name__}: {first} (rerun with --debug)", file=sys.stderr)
        return errors.EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
