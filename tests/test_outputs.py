"""What ``optimize`` writes: byte-identical for the same input, ratio and seed; models stored
with external data are written back with external data beside the output, atomically."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphresize.cli.main import main
from graphresize.io import modelio
from graphresize.io.modelio import file_sha256


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("outputs") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 200, size=6000))
    return path


def _optimize(capsys, src, out, calib, *extra) -> None:
    args = ["optimize", src, "--ratio", "0.3", "-o", out, "--calib", calib, "--tokens", "1024", "--seq-len", "32", "--allocation", "uniform", "-q", "--no-report", *extra]
    code = main([str(a) for a in args])
    assert code == 0, capsys.readouterr().err


def _logits(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(0, 200, (2, 16))
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def test_same_seed_same_bytes_through_the_cli(llama_dynamo, calib, tmp_path, capsys):
    for name in ("a", "b"):
        _optimize(capsys, llama_dynamo, tmp_path / f"{name}.onnx", calib, "--seed", "3", "--report", tmp_path / f"{name}.json")
    _optimize(capsys, llama_dynamo, tmp_path / "c.onnx", calib, "--seed", "4")
    a, b, c = ((tmp_path / f"{n}.onnx").read_bytes() for n in "abc")
    assert a == b
    assert a != c  # the seed draws other calibration windows


def test_external_data_model_round_trip(llama_dynamo, calib, tmp_path, capsys, monkeypatch):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "m.onnx"
    ir.save(ir.load(llama_dynamo), src, external_data="m.onnx.data", size_threshold_bytes=0)
    digests = {p: file_sha256(p) for p in src_dir.iterdir()}
    out = out_dir / "small.onnx"
    _optimize(capsys, src, out, calib)
    assert {p: file_sha256(p) for p in src_dir.iterdir()} == digests  # the input is untouched
    # Written with its own data file beside it, nothing else left in the folder ...
    (data,) = _locations(out)  # small.onnx.<tag>.data: a name unique to this write
    assert re.fullmatch(r"small\.onnx\.[0-9a-f]{12}\.data", data)
    assert sorted(p.name for p in out_dir.iterdir()) == ["small.onnx", data]
    # ... it runs on its own (the input's data file moved away) ...
    (src_dir / "m.onnx.data").rename(tmp_path / "elsewhere.data")
    got = _logits(out)
    # ... and equals the result of the same run on the model stored in one file.
    _optimize(capsys, llama_dynamo, tmp_path / "inline.onnx", calib)
    np.testing.assert_array_equal(got, _logits(tmp_path / "inline.onnx"))
    # Replacing it with --overwrite swaps both files and leaves no temporary behind.
    (tmp_path / "elsewhere.data").rename(src_dir / "m.onnx.data")
    _optimize(capsys, src, out, calib, "--overwrite", "--seed", "5")
    (new,) = _locations(out)
    assert new != data and sorted(p.name for p in out_dir.iterdir()) == ["small.onnx", new]  # the old data is gone
    assert np.isfinite(_logits(out)).all()


def test_external_data_threshold(llama_dynamo, tmp_path, monkeypatch):
    inline = modelio.load_model(llama_dynamo)
    assert not modelio.needs_external_data(inline)  # 0.7 MB: one protobuf file
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", modelio.tensor_bytes(inline) - 1)
    assert modelio.needs_external_data(inline)  # over the limit
    monkeypatch.undo()
    ir.save(inline, tmp_path / "ext.onnx", external_data="ext.onnx.data", size_threshold_bytes=0)
    assert modelio.needs_external_data(modelio.load_model(tmp_path / "ext.onnx"))  # stored that way


def test_large_model_is_written_back_sharded(llama_dynamo, calib, tmp_path, capsys, monkeypatch):
    """Thresholds scaled down to the 0.7 MB model: external data in shards of at most 100 kB,
    which ONNX Runtime reads back; the logits equal those of the same run written inline."""
    _optimize(capsys, llama_dynamo, tmp_path / "inline.onnx", calib)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "small.onnx"
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1000)
    monkeypatch.setattr(modelio, "MAX_SHARD_BYTES", 100_000)
    _optimize(capsys, llama_dynamo, out, calib)
    shards = sorted(p for p in out_dir.iterdir() if p.name != "small.onnx")
    assert len(shards) >= 3 and all(p.name.endswith(".data") for p in shards)
    largest_tensor = max(v.const_value.nbytes for v in ir.load(out).graph.initializers.values())
    assert all(p.stat().st_size <= max(100_000, largest_tensor) for p in shards)
    assert _locations(out) == {p.name for p in shards}
    np.testing.assert_array_equal(_logits(out), _logits(tmp_path / "inline.onnx"))
    # Overwritten by a run that needs fewer shards: the old shard files go.
    monkeypatch.setattr(modelio, "MAX_SHARD_BYTES", 250_000)
    _optimize(capsys, llama_dynamo, out, calib, "--overwrite")
    now = sorted(p.name for p in out_dir.iterdir() if p.name != "small.onnx")
    assert len(now) < len(shards)
    assert _locations(out) == set(now)
    np.testing.assert_array_equal(_logits(out), _logits(tmp_path / "inline.onnx"))


def _locations(path: Path) -> set[str]:
    """The external data files a saved model's initializers name."""
    values = ir.load(path).graph.initializers.values()
    return {v.const_value.location for v in values if isinstance(v.const_value, ir.ExternalTensor)}


def test_loading_and_analysis_leave_external_weights_on_disk(llama_dynamo, tmp_path):
    """load + prepare + analysis read no external weight: every one is still an unread,
    memory-mapped ``ExternalTensor`` afterwards (only the rewrite reads the weights it changes)."""
    from graphresize.analysis.groups import find_groups
    from graphresize.pipeline import load_prepared

    src = tmp_path / "m.onnx"
    ir.save(ir.load(llama_dynamo), src, external_data="m.onnx.data", size_threshold_bytes=1024)
    model = load_prepared(src)
    assert find_groups(model).resizable()
    big = [v.const_value for v in model.graph.initializers.values() if v.const_value.nbytes > 1024]
    assert len(big) >= 15
    assert all(isinstance(t, ir.ExternalTensor) and t._array is None for t in big)


def test_session_through_a_file_equals_the_inline_session(llama_dynamo, monkeypatch):
    """Large in-memory models reach ORT through a temporary external-data file (no
    serialized copy in memory); the outputs are the same."""
    from graphresize.io import ort_utils
    from tests.models import run_in_memory

    model = ir.load(llama_dynamo)
    inline = run_in_memory(model)
    monkeypatch.setattr(ort_utils, "SESSION_BYTES_INLINE", 0)
    for want, got in zip(inline, run_in_memory(model), strict=True):
        np.testing.assert_array_equal(got, want)
