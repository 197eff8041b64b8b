"""``graphresize export HF_MODEL_DIR -o model.onnx``: capture a Hugging Face model directory.

Rule: the dynamo exporter (``torch.onnx.export(dynamo=True)``) first, the TorchScript
(legacy) exporter when it fails or when ``--legacy`` is given; the config and tokenizer files
are copied beside the graph; the graph must then load and run in ONNX Runtime (exit 4
otherwise). torch and transformers come with the ``[export]`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from graphresize import errors


def add_parser(sub, epilog: str, common: Callable[[argparse.ArgumentParser], None]) -> None:
    ex = sub.add_parser("export", help="export a Hugging Face model directory to ONNX", epilog=epilog)
    ex.add_argument("model_dir", type=Path, help="Hugging Face model directory (config.json, weights, tokenizer)")
    ex.add_argument("-o", "--output", type=Path, required=True, help="output .onnx; config and tokenizer files are copied beside it")
    ex.add_argument("--with-past", action="store_true", help="add position_ids and the key/value cache (Optimum I/O layout)")
    ex.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    ex.add_argument("--legacy", action="store_true", help="use the TorchScript exporter only (default: dynamo, legacy as a fallback)")
    ex.add_argument("--no-optimize", action="store_true", help="skip the onnxscript optimizer of the dynamo exporter (faster export)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ex.add_argument("--json", action="store_true", help="print what was written as JSON on stdout")
    common(ex)


def _check_dependencies() -> None:
    missing = []
    for name in ("torch", "transformers"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise errors.UsageError(
            f"export needs {' and '.join(missing)}: pip install 'graphresize[export]'"
        )


def _check_paths(model_dir: Path, output: Path, overwrite: bool) -> None:
    if not model_dir.is_dir():
        raise errors.InputError(f"{model_dir}: no such model directory")
    if not (model_dir / "config.json").is_file():
        raise errors.InputError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    from graphresize.io.publish import check_target

    check_target(output, overwrite=overwrite)  # a folder, device, pipe or socket: never; a file: with --overwrite
    if output.suffix != ".onnx":
        raise errors.UsageError(f"{output}: the output must end in .onnx")


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def run_export(model_dir: Path, output: Path, *, with_past: bool, opset: int | None, legacy: bool, optimize: bool, quiet: bool) -> dict:
    """Export, falling back to the legacy exporter; return what was done."""
    from transformers.utils import logging as hf_logging

    from graphresize.io.capture import export_onnx

    if quiet:
        hf_logging.disable_progress_bar()
    output.parent.mkdir(parents=True, exist_ok=True)
    styles = ["legacy"] if legacy else ["dynamo", "legacy"]
    failures = []
    for style in styles:
        start = time.perf_counter()
        _say(f"exporting {model_dir} with the {style} exporter ...", quiet)
        try:
            export_onnx(model_dir, output, style=style, with_past=with_past, opset=opset, optimize=optimize)
        except (errors.GraphresizeError, KeyboardInterrupt):
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            failures.append(f"{style}: {type(exc).__name__}: {first}")
            if style != styles[-1]:
                _say(f"the {style} exporter failed ({first}); falling back to the legacy exporter", quiet)
            continue
        return {"style": style, "seconds": round(time.perf_counter() - start, 3), "fallback_from": failures}
    _remove(output)
    raise errors.UnsupportedModelError(f"{model_dir}: export failed ({'; '.join(failures)})")


def _remove(output: Path) -> None:
    for path in (output, output.with_name(output.name + ".data")):
        path.unlink(missing_ok=True)


def _smoke_test(output: Path) -> list[str]:
    """Load the graph in ONNX Runtime and run it on 8 tokens; return its input names."""
    import numpy as np

    from graphresize.io.modelio import load_model
    from graphresize.io.ort_utils import make_feeds, make_session

    try:
        session = make_session(load_model(output))
        session.run(None, make_feeds(session, np.zeros((1, 8), dtype=np.int64)))
    except Exception as exc:
        _remove(output)
        raise errors.VerificationError(f"{output}: the exported graph does not run in ONNX Runtime ({str(exc).splitlines()[0][:200]})") from None
    return [i.name for i in session.get_inputs()]


def cmd_export(args: argparse.Namespace) -> int:
    from graphresize.io.capture import DEFAULT_OPSET, SIDECAR_FILES
    from graphresize.io.modelio import file_sha256

    _check_dependencies()
    _check_paths(args.model_dir, args.output, args.overwrite)
    if args.opset is not None and args.opset < 14:
        raise errors.UsageError(f"--opset must be at least 14, got {args.opset}")
    done = run_export(
        args.model_dir, args.output, with_past=args.with_past, opset=args.opset,
        legacy=args.legacy, optimize=not args.no_optimize, quiet=args.quiet,
    )
    inputs = _smoke_test(args.output)
    data_file = args.output.with_name(args.output.name + ".data")
    sidecars = [n for n in SIDECAR_FILES if (args.model_dir / n).is_file()]
    result = {
        "model_dir": str(args.model_dir),
        "output": str(args.output),
        "sha256": file_sha256(args.output),
        "external_data": str(data_file) if data_file.exists() else None,
        "exporter": done["style"],
        "fallback_from": done["fallback_from"],
        "with_past": args.with_past,
        "opset": DEFAULT_OPSET if args.opset is None else args.opset,
        "inputs": inputs,
        "sidecars": sidecars,
        "seconds": done["seconds"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    _say(
        f"wrote {args.output} ({done['style']} exporter, {done['seconds']:.1f}s; inputs {', '.join(inputs)})"
        + (f" and {', '.join(sidecars)} beside it" if sidecars else ""),
        args.quiet,
    )
    return errors.EXIT_OK
