"""Which exporter × family × target works: each tiny config of ``tests/models.FAMILIES`` is
exported in each style and resized for each target, and the outcome is one table cell.

    python benchmarks/exporter_table.py [--out benchmarks/exporter_table.md] [--family F ...]

Exporters: ``dynamo`` (torch.onnx dynamo, eager attention), ``dynamo-23`` (the same at opset
23 with SDPA attention and a KV cache: ONNX Attention, RotaryEmbedding, RMSNormalization;
without the cache its RotaryEmbedding reads a batch-1 cos/sin cache and ONNX Runtime runs
the graph at batch 1 only),
``legacy`` (TorchScript exporter) and ``optimum`` (Optimum's with-past layout). Targets:
``mlp`` and ``residual`` at ratio 0.3 (DOTResize; the residual run first rotates the stream,
so a frozen stream is reported as such), ``heads`` at ``--ratio-heads 0.5`` alone. A cell is
``ok`` (relative output error of the verification), or the first words of why not: the
export failing, or graphresize refusing with its one-line reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXPORTERS = {
    "dynamo": dict(style="dynamo"),
    "dynamo-23": dict(style="dynamo", opset=23, attn_implementation="sdpa", with_past=True),
    "legacy": dict(style="legacy"),
    "optimum": dict(style="optimum"),
}
TARGETS = ("mlp", "residual", "heads")
FAMILY_ORDER = ("llama", "qwen2", "mistral", "phi3", "phi", "gpt_neox", "gpt2", "opt", "bert")


def export(family: str, exporter: str, out_dir: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.models import export_tiny

    spec = dict(EXPORTERS[exporter])
    style = spec.pop("style")
    if family == "bert":
        spec.pop("with_past", None)  # an encoder has no cache
    return export_tiny(family, style, out_dir=out_dir, name=f"{family}_{exporter}", **spec)


def calib(out_dir: Path) -> Path:
    path = out_dir / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 200, size=6000))  # every tiny vocabulary holds 200
    return path


def cell(model: Path, target: str, tokens: Path, out_dir: Path) -> str:
    """One resize of ``model`` for ``target``: ``ok <relative error>`` or why not."""
    import graphresize

    out = out_dir / f"{model.stem}.{target}.onnx"
    options = dict(calib=tokens, tokens=1024, seq_len=32, progress=False, overwrite=True)
    if target == "heads":
        options.update(ratio=0.0, head_ratio=0.5)
    else:
        options.update(ratio=0.3, target=target, method="dotresize")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            result = graphresize.optimize(model, out, **options)
    except Exception as exc:  # the table records any refusal
        return "no: " + _short(str(exc), model)
    if target == "heads":
        layers = result.heads.layers() if result.heads is not None else []
        if not any(r["new_heads"] != r["heads"] for r in layers):
            reasons = sorted({r["unchanged"] or "" for r in layers} - {""})
            return "no: " + _short(reasons[0] if reasons else "no attention layer found", model)
        left = sum(bool(r["unchanged"]) for r in layers)
        if left:
            return f"part: {len(layers) - left}/{len(layers)} layers"
    elif not result.plan.changed():
        return "no: nothing resized"
    return f"ok {result.verification.relative_error:.2f}"


def _short(text: str, model: Path, words: int = 9) -> str:
    text = text.replace(str(model), "").replace(str(model.parent), "").strip(" :")
    cut = " ".join(text.split()[:words])
    return cut.replace("|", "/") + ("…" if len(text.split()) > words else "")


def table(rows: dict[tuple[str, str], dict[str, str]], families: list[str]) -> str:
    families = [f for f in FAMILY_ORDER if f in {f for f, _ in rows}] + [f for f in families if f not in FAMILY_ORDER]
    head = "| family | exporter | " + " | ".join(TARGETS) + " |"
    lines = [head, "|" + " --- |" * (2 + len(TARGETS))]
    for family in families:
        for exporter in EXPORTERS:
            cells = rows.get((family, exporter))
            if cells is not None:
                lines.append(f"| {family} | {exporter} | " + " | ".join(cells[t] for t in TARGETS) + " |")
    return "\n".join(lines) + "\n"


HEADER = "<!-- written by benchmarks/exporter_table.py; tests/test_exporter_table.py checks cells of it -->\n"


def read_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """The rows of a table this script wrote (to resume an interrupted run)."""
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2 + len(TARGETS) and cells[1] in EXPORTERS:
                rows[(cells[0], cells[1])] = dict(zip(TARGETS, cells[2:], strict=True))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "exporter_table.md")
    parser.add_argument("--family", nargs="*", default=list(FAMILY_ORDER))
    parser.add_argument("--exporter", nargs="*", default=list(EXPORTERS))
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    args = parser.parse_args(argv)
    rows = read_rows(args.out) if args.resume else {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="exporter-table-") as tmp:
        work = Path(tmp)
        tokens = calib(work)
        for family in args.family:
            for exporter in args.exporter:
                if (family == "bert" and exporter == "optimum") or (family, exporter) in rows:
                    continue  # an encoder has no with-past layout; a resumed row stays
                try:
                    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                        model = export(family, exporter, work)
                except Exception as exc:
                    rows[(family, exporter)] = dict.fromkeys(TARGETS, "export fails: " + _short(str(exc), work, 6))
                else:
                    rows[(family, exporter)] = {t: cell(model, t, tokens, work) for t in TARGETS}
                print(f"{family:8s} {exporter:10s} " + " | ".join(rows[(family, exporter)].values()), flush=True)
                args.out.write_text(HEADER + table(rows, args.family))
    args.out.write_text(HEADER + table(rows, args.family))
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
