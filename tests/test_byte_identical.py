"""Restructuring guard: every method × target writes the same bytes as the code that recorded
``tests/golden/optimize_sha256.json``.

A refactor that moves code between modules must not change one float of the written model.
Each case optimizes a tiny fixture (or SmolLM2's MLP at 0.3, slow) and compares the SHA-256 of
every file written with the recorded hash (unfused: `--fuse` is a later, separate step with its own
tests in test_fuse.py). The exported fixtures carry torch stack traces that
name this checkout's files, so each source is copied without them first: the hashes do not
depend on where the repository lives. To record new hashes after an *intended* change of
numbers: ``GRAPHRESIZE_WRITE_GOLDEN=1 pytest tests/test_byte_identical.py`` (and say why in
the commit).

Bytes are only portable between machines with the same CPU family: the eigen-, QR- and
least-squares solvers take different LAPACK kernels on another CPU (the recording machine's
Intel against an AMD EPYC here: 7 of the 9 fast cases differed in the last bits). So a case whose
bytes differ falls back to ``tests/golden/optimize_behaviour.json``: the graph without its weight
values (nodes, names, shapes, dtypes) must hash the same, and the written model's logits for fixed
token ids, projected on 16 fixed random directions, must agree to 1e-4 relative. A real change of
numbers (another neuron kept, another weight solved) moves that fingerprint by far more.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_graphs import attention_lm
from tiny_graphs import calib_tokens as make_calib_tokens

import graphresize

GOLDEN = Path(__file__).parent / "golden" / "optimize_sha256.json"
BEHAVIOUR = Path(__file__).parent / "golden" / "optimize_behaviour.json"
WRITE = os.environ.get("GRAPHRESIZE_WRITE_GOLDEN") == "1"
SMOLLM2 = Path(os.environ.get("GRAPHRESIZE_CACHE", "/work/cache")) / "smollm2-onnx" / "model.onnx"
WIKI = Path(os.environ.get("GRAPHRESIZE_CACHE", "/work/cache")) / "wiki.txt"

# id -> (fixture, optimize keywords). Ratios large enough that every solver changes widths.
CASES: dict[str, tuple[str, dict]] = {
    "llama-dotresize-mlp": ("llama_dynamo", dict(ratio=0.5, target="mlp")),
    "llama-dotresize-residual": ("llama_dynamo", dict(ratio=0.25, target="residual")),
    "llama-dotresize-all": ("llama_dynamo", dict(ratio=0.25, target="all")),
    "llama-dotresize-mlp-ot": ("llama_dynamo", dict(ratio=0.5, target="mlp", unmerge="ot")),
    "llama-dotresize-mlp-pinv": ("llama_dynamo", dict(ratio=0.5, target="mlp", unmerge="pinv")),
    "llama-dotresize-residual-lsq": ("llama_dynamo", dict(ratio=0.25, target="residual", unmerge="lsq")),
    "llama-dotresize-mlp-cosine": ("llama_dynamo", dict(ratio=0.5, target="mlp", metric="cosine")),
    "llama-prune-mlp": ("llama_dynamo", dict(ratio=0.5, target="mlp", method="prune")),
    "llama-prune-residual": ("llama_dynamo", dict(ratio=0.25, target="residual", method="prune")),
    "llama-prune-all": ("llama_dynamo", dict(ratio=0.25, target="all", method="prune")),
    "llama-pca-residual": ("llama_dynamo", dict(ratio=0.25, target="residual", method="pca")),
    "llama-disp-residual": ("llama_dynamo", dict(ratio=0.25, target="residual", method="disp")),
    "llama-disp-all": ("llama_dynamo", dict(ratio=0.25, target="all", method="disp")),
    "llama-disp-free-residual": ("llama_dynamo", dict(ratio=0.25, target="residual", method="disp-free")),
    "llama-dotresize+disp-residual": ("llama_dynamo", dict(ratio=0.25, target="residual", method="dotresize+disp")),
    "llama-dotresize+disp-all": ("llama_dynamo", dict(ratio=0.25, target="all", method="dotresize+disp")),
    "gpt2-dotresize-all": ("gpt2", dict(ratio=0.25, target="all")),
    "gpt2-prune-all": ("gpt2", dict(ratio=0.25, target="all", method="prune")),
    "gpt2-pca-residual": ("gpt2", dict(ratio=0.25, target="residual", method="pca")),
    "gpt2-disp-residual": ("gpt2", dict(ratio=0.25, target="residual", method="disp")),
    "llama-heads-prune": ("llama_dynamo", dict(ratio=0.0, head_ratio=0.5, head_method="prune")),
    "llama-heads-refit": ("llama_dynamo", dict(ratio=0.0, head_ratio=0.5, head_method="refit")),
    "llama-heads-global": ("llama_dynamo", dict(ratio=0.0, head_ratio=0.5, head_method="global")),
    "llama-heads-query": ("llama_dynamo", dict(ratio=0.0, head_ratio=0.5, head_method="query")),
    "llama-heads-ot": ("llama_dynamo", dict(ratio=0.0, head_ratio=0.5, head_method="ot")),
    "llama-heads+mlp": ("llama_dynamo", dict(ratio=0.5, target="mlp", head_ratio=0.5)),
    "gpt2-heads-refit": ("gpt2", dict(ratio=0.0, head_ratio=0.5, head_method="refit")),
    "fused-gqa-heads-refit": ("fused:gqa", dict(ratio=0.0, head_ratio=0.5, head_method="refit")),
    "fused-ms_attention-heads-prune": ("fused:ms_attention", dict(ratio=0.0, head_ratio=0.5, head_method="prune")),
}


def _without_stack_traces(src: Path, dst: Path) -> Path:
    """A copy of ``src`` without torch's stack-trace metadata (it holds file paths); the other
    node metadata (name scopes, which name attention blocks) is kept."""
    model = onnx.load(src)
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            kept = [p for p in node.metadata_props if "stack_trace" not in p.key]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            node.doc_string = ""
    onnx.save(model, dst)
    return dst


# One case per method runs in the fast suite; the whole matrix with ``-m slow`` (make test-all).
FAST = {"llama-dotresize-all", "llama-prune-all", "llama-pca-residual", "llama-disp-residual", "llama-dotresize+disp-all",
        "gpt2-dotresize-all", "llama-heads-refit", "llama-heads-ot", "fused-gqa-heads-refit"}


def _load(path: Path = GOLDEN) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(path: Path, case: str, value: dict) -> None:
    data = _load(path)
    data[case] = value
    path.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")


def _hashes(result, out_dir: Path) -> dict[str, str]:
    return {Path(f).relative_to(out_dir).as_posix(): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in result.files}


def _structure_digest(path: Path) -> str:
    """SHA-256 of the model with every tensor's values removed (names, dims and dtypes kept)."""
    model = onnx.load(path)
    tensors = list(model.graph.initializer)
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data"):
            tensor.ClearField(field)
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _fingerprint(path: Path) -> list[float]:
    """The first output for seeded token ids [2, 16] below 64 (every fixture's vocabulary), fed as
    the tool feeds a model, projected on 16 fixed unit directions."""
    import onnx_ir as ir

    from graphresize.io.ort_utils import make_feeds, make_session

    session = make_session(ir.load(path))
    ids = np.random.default_rng(1).integers(0, 64, size=(2, 16))
    first = np.asarray(session.run(None, make_feeds(session, ids))[0], dtype=np.float64).reshape(-1)
    directions = np.random.default_rng(0).standard_normal((first.size, 16)) / np.sqrt(first.size)
    return [float(v) for v in first @ directions]


def _behaviour(result) -> dict:
    path = Path(result.files[0])
    return {"structure": _structure_digest(path), "fingerprint": _fingerprint(path)}


def _check(case: str, result, out_dir: Path) -> None:
    got = _hashes(result, out_dir)
    if WRITE:
        _record(GOLDEN, case, got)
        _record(BEHAVIOUR, case, _behaviour(result))
        return
    want = _load().get(case)
    assert want is not None, f"no golden hash for {case}: record with GRAPHRESIZE_WRITE_GOLDEN=1"
    if got == want:
        return
    recorded = _load(BEHAVIOUR).get(case)
    assert recorded is not None, f"{case}: the written model changed (and no behaviour record to compare across CPUs)"
    found = _behaviour(result)
    assert found["structure"] == recorded["structure"], f"{case}: the written graph's structure changed"
    want_fp, got_fp = np.array(recorded["fingerprint"]), np.array(found["fingerprint"])
    scale = float(np.abs(want_fp).max())
    np.testing.assert_allclose(got_fp, want_fp, rtol=1e-4, atol=1e-4 * scale, err_msg=f"{case}: the written model's outputs changed")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_optimize_writes_recorded_bytes(case, request, tmp_path, calib_tokens):
    fixture, kw = CASES[case]
    if fixture.startswith("fused:"):
        src = attention_lm(tmp_path / "src.onnx", fixture.split(":", 1)[1], past=True)
        calib, tokens, seq_len = make_calib_tokens(tmp_path / "tokens.npy", n=3000), 1024, 16
    else:
        src = _without_stack_traces(request.getfixturevalue(fixture), tmp_path / "src.onnx")
        calib, tokens, seq_len = calib_tokens, 2048, 32
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = graphresize.optimize(src, out_dir / "out.onnx", calib=calib, tokens=tokens, seq_len=seq_len, progress=False, fuse=False, **kw)
    _check(case, result, out_dir)


@pytest.mark.slow
def test_smollm2_mlp_writes_recorded_bytes(tmp_path):
    if not SMOLLM2.is_file() or not WIKI.is_file():
        pytest.skip("SmolLM2 export or wiki.txt missing (GRAPHRESIZE_CACHE)")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = graphresize.optimize(SMOLLM2, out_dir / "out.onnx", ratio=0.3, target="mlp", calib=WIKI, tokens=4096,
                                  seq_len=128, progress=False, fuse=False)
    _check("smollm2-mlp-0.3", result, out_dir)
