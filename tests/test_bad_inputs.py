"""Bad inputs through the CLI: one line on stderr, the documented exit code, no traceback, no
output or temporary file left behind, the input unchanged."""

from __future__ import annotations

import builtins
import errno
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_graphs import MLP_ONLY_ARGS, mlp_lm

from graphresize.cli.main import main
from graphresize.io.modelio import file_sha256


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def fails_cleanly(capsys, args, code, message, *, inputs=(), out_dir=None):
    """Run the CLI; check the exit code, a one-line message and that nothing changed."""
    digests = {p: file_sha256(p) for p in inputs}
    before = _listing(out_dir) if out_dir is not None else None
    got = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert got == code, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("graphresize: error: "), err
    assert message in err and "Traceback" not in err
    assert {p: file_sha256(p) for p in inputs} == digests
    if out_dir is not None:
        assert _listing(out_dir) == before  # no output, no temporary file
    return err


# ---------------------------------------------------------------------------- unreadable files


def _corrupt(path: Path, kind: str, source: Path) -> Path:
    data = source.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("this is a text file, not a model\n" * 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "dangling_input":  # parses, but a node reads a value nothing defines
        model = onnx.load_from_string(data)
        model.graph.node[1].input[0] = "nowhere"
        path.write_bytes(model.SerializeToString())
    elif kind == "short_tensor":  # parses, but a weight holds fewer bytes than its shape needs
        model = onnx.load_from_string(data)
        tensor = next(t for t in model.graph.initializer if t.name == "w1_0")
        tensor.raw_data = tensor.raw_data[:100]
        path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "not a readable ONNX model"),
        ("random_bytes", "not a readable ONNX model"),
        ("text", "not a readable ONNX model"),
        ("empty", "has no nodes"),
        ("dangling_input", "which nothing defines"),
        ("short_tensor", "holds 100 bytes, its shape needs 2048"),
    ],
)
@pytest.mark.parametrize("command", ["optimize", "analyze"])
def test_unreadable_model(command, kind, message, mlp_model, mlp_calib, tmp_path, capsys):
    bad = _corrupt(tmp_path / "bad.onnx", kind, mlp_model)
    args = [command, bad] + (["-o", tmp_path / "out.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS] if command == "optimize" else [])
    fails_cleanly(capsys, args, 1, message, inputs=[bad], out_dir=tmp_path)


def _external(src: Path, folder: Path, name: str = "m.onnx", data: str | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    ir.save(ir.load(src), path, external_data=data or name + ".data", size_threshold_bytes=0)
    return path


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_external_data_file_damaged(damage, mlp_model, mlp_calib, tmp_path, capsys):
    model = _external(mlp_model, tmp_path / "in")
    data = tmp_path / "in" / "m.onnx.data"
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:1000])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["optimize", model, "-o", out_dir / "small.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS]
    fails_cleanly(capsys, args, 1, f"external data file 'm.onnx.data' is {damage}", inputs=[model], out_dir=out_dir)


# ---------------------------------------------------------------------------- quantized models


def _quantized(path: Path, form: str) -> Path:
    rng = np.random.default_rng(0)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 16])
    emb = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"])]
    inits = [emb, numpy_helper.from_array(np.array(0.05, np.float32), "scale")]
    if form == "DequantizeLinear":  # weight-only int8: DequantizeLinear feeding a MatMul
        inits += [numpy_helper.from_array(rng.integers(-8, 8, (16, 16)).astype(np.int8), "wq"),
                  numpy_helper.from_array(np.array(0, np.int8), "zero")]  # fmt: skip
        nodes += [helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["logits"])]
    elif form == "QLinearMatMul":
        inits += [numpy_helper.from_array(rng.integers(0, 255, (16, 16)).astype(np.uint8), "wq"),
                  numpy_helper.from_array(np.array(128, np.uint8), "zero")]  # fmt: skip
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
            helper.make_node("QLinearMatMul", ["xq", "scale", "zero", "wq", "scale", "zero", "scale", "zero"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "scale", "zero"], ["logits"]),
        ]
    else:  # MatMulNBits: 4-bit blocks in com.microsoft
        inits += [numpy_helper.from_array(rng.integers(0, 255, (16, 1, 8)).astype(np.uint8), "wq"),
                  numpy_helper.from_array(np.full(16, 0.05, np.float32), "scales")]  # fmt: skip
        nodes.append(helper.make_node("MatMulNBits", ["x", "wq", "scales"], ["logits"], domain="com.microsoft", K=16, N=16, bits=4, block_size=16))
    graph = helper.make_graph(nodes, "q", [ids], [out], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


@pytest.mark.parametrize("form", ["DequantizeLinear", "QLinearMatMul", "MatMulNBits"])
def test_quantized_model_is_refused(form, mlp_calib, tmp_path, capsys):
    model = _quantized(tmp_path / "q.onnx", form)
    args = ["optimize", model, "-o", tmp_path / "out.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS]
    err = fails_cleanly(capsys, args, 3, "resize before quantizing", inputs=[model], out_dir=tmp_path)
    assert form in err
    fails_cleanly(capsys, ["analyze", model], 3, "resize before quantizing", inputs=[model])


# ---------------------------------------------------------------------------- output paths


def test_output_directory_missing(mlp_model, mlp_calib, tmp_path, capsys):
    args = ["optimize", mlp_model, "-o", tmp_path / "nodir" / "out.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS]
    fails_cleanly(capsys, args, 1, "output directory does not exist", inputs=[mlp_model], out_dir=tmp_path)
    (tmp_path / "file").write_text("x")
    args = ["optimize", mlp_model, "-o", tmp_path / "file" / "out.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS]
    fails_cleanly(capsys, args, 1, "output directory does not exist", inputs=[mlp_model], out_dir=tmp_path)


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores modes: use /sys)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return folder
    if Path("/sys").is_dir() and not _can_create(Path("/sys")):
        return Path("/sys")
    pytest.skip("running as root without a read-only directory")


def _can_create(folder: Path) -> bool:
    try:
        (folder / ".graphresize-probe").touch()
    except OSError:
        return False
    (folder / ".graphresize-probe").unlink()
    return True


def test_output_directory_not_writable(mlp_model, mlp_calib, tmp_path, capsys):
    folder = _unwritable_dir(tmp_path)
    args = ["optimize", mlp_model, "-o", folder / "out.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS]
    fails_cleanly(capsys, args, 1, "output directory is not writable", inputs=[mlp_model])
    assert not (folder / "out.onnx").exists()
    # A report that cannot be written is refused before any model is written.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["optimize", mlp_model, "-o", out_dir / "small.onnx", "--report", folder / "r.json", "--calib", mlp_calib, *MLP_ONLY_ARGS]
    fails_cleanly(capsys, args, 1, "output directory is not writable", inputs=[mlp_model], out_dir=out_dir)


def test_output_path_is_the_input(mlp_model, mlp_calib, tmp_path, capsys):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(mlp_model.read_bytes())
    link = tmp_path / "hardlink.onnx"
    os.link(copy, link)
    for target in (copy, tmp_path / "." / "m.onnx", link):
        for extra in ([], ["--overwrite"]):
            args = ["optimize", copy, "-o", target, "--calib", mlp_calib, *MLP_ONLY_ARGS, *extra]
            fails_cleanly(capsys, args, 1, "output path is the input model", inputs=[copy], out_dir=tmp_path)


def test_output_data_file_is_the_inputs(mlp_model, mlp_calib, tmp_path, capsys):
    """``a.onnx`` reads ``b.onnx.data``; writing ``b.onnx`` writes its data under a name of its
    own, and replacing ``b.onnx`` (which named ``b.onnx.data``) does not remove the input's data."""
    model = _external(mlp_model, tmp_path, name="a.onnx", data="b.onnx.data")
    before = {p: file_sha256(p) for p in (model, tmp_path / "b.onnx.data")}
    ir.save(ir.load(model), tmp_path / "b.onnx")  # an old b.onnx that reads b.onnx.data too
    for extra in ([], ["--overwrite"]):
        code = main([str(a) for a in ["optimize", model, "-o", tmp_path / "b.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS, *extra]])
        assert code == (1 if not extra else 0), capsys.readouterr().err
    assert {p: file_sha256(p) for p in before} == before
    data = {v.const_value.location for v in ir.load(tmp_path / "b.onnx").graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}
    assert len(data) == 1 and data != {"b.onnx.data"}


class _FullDisk:
    """``open`` for files under ``folder`` opened for writing: the first write stores half of
    its bytes, then fails with ENOSPC."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.real = str(folder.resolve()), builtins.open
        self.hits = 0

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = self.real(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and str(Path(file).resolve()).startswith(self.folder) and "w" in mode:
            self.hits += 1
            return _FailingWriter(handle)
        return handle


class _FailingWriter:
    def __init__(self, handle) -> None:
        self.handle = handle

    def write(self, data) -> int:
        self.handle.write(bytes(data)[: len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


@pytest.mark.parametrize("external", [False, True])
def test_disk_full_during_save(external, mlp_model, mlp_calib, tmp_path, capsys, monkeypatch):
    model = _external(mlp_model, tmp_path / "in") if external else mlp_model
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "small.onnx").write_bytes(b"previous model")
    (out_dir / "small.onnx.data").write_bytes(b"previous data")
    full = _FullDisk(out_dir)
    monkeypatch.setattr(builtins, "open", full)
    args = ["optimize", model, "-o", out_dir / "small.onnx", "--overwrite", "--calib", mlp_calib, *MLP_ONLY_ARGS]
    fails_cleanly(capsys, args, 1, "No space left on device", inputs=[model], out_dir=out_dir)
    assert full.hits >= 1
    assert (out_dir / "small.onnx").read_bytes() == b"previous model"  # the old files are kept whole
    assert (out_dir / "small.onnx.data").read_bytes() == b"previous data"


# ---------------------------------------------------------------------------- partly resizable graphs


def _run_ok(capsys, args) -> str:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _mlp_widths(path: Path) -> dict[str, int]:
    """Intermediate width of each block, read from its first weight ``w1_i``."""
    model = onnx.load(path)
    return {t.name: t.dims[1] for t in model.graph.initializer if t.name.startswith("w1_")}


def test_unknown_op_freezes_one_group(mlp_calib, tmp_path, capsys):
    model = mlp_lm(tmp_path / "hardmax.onnx", ("Relu", "Hardmax", "Relu"))
    listing = _run_ok(capsys, ["analyze", model])
    assert listing.count("frozen: unsupported op Hardmax (act1)") == 2  # both sides of the op
    out = tmp_path / "small.onnx"
    _run_ok(capsys, ["optimize", model, "-o", out, "--calib", mlp_calib, *MLP_ONLY_ARGS])
    assert _mlp_widths(out) == {"w1_0": 16, "w1_1": 32, "w1_2": 16}


def _subgraphs(path: Path) -> dict[str, bytes]:
    """Each If/Loop body, node names cleared (the rewrite names anonymous nodes)."""
    found = {}
    for node in onnx.load(path).graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                for inner in attr.g.node:
                    inner.name = ""
                found[f"{node.name}.{attr.name}"] = attr.g.SerializeToString(deterministic=True)
    return found


def test_control_flow_is_left_unchanged_and_reported(mlp_calib, tmp_path, capsys):
    model = mlp_lm(tmp_path / "cf.onnx", ("Relu", "If", "Loop"))
    listing = _run_ok(capsys, ["analyze", model])
    assert "frozen: control flow If (if1)" in listing and "frozen: control flow Loop (loop2)" in listing
    assert "used inside a subgraph" in listing
    out = tmp_path / "small.onnx"
    _run_ok(capsys, ["optimize", model, "-o", out, "--calib", mlp_calib, *MLP_ONLY_ARGS])
    assert _mlp_widths(out) == {"w1_0": 16, "w1_1": 32, "w1_2": 32}
    assert _subgraphs(out) == _subgraphs(model) and len(_subgraphs(model)) == 3
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": np.arange(8).reshape(1, 8)})
    assert logits.shape == (1, 8, 64) and np.isfinite(logits).all()


def test_corrupt_tokenizer(mlp_model, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    (tmp_path / "calib.txt").write_text("some calibration text\n\nmore text\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["optimize", mlp_model, "-o", out_dir / "small.onnx", "--calib", tmp_path / "calib.txt", "--tokenizer", tmp_path / "tok", *MLP_ONLY_ARGS]
    fails_cleanly(capsys, args, 1, "not a readable tokenizer.json", inputs=[mlp_model], out_dir=out_dir)


def test_disk_full_in_the_temporary_copy(mlp_model, mlp_calib, tmp_path, capsys, monkeypatch):
    """Models with external data reach ONNX Runtime through a temporary copy: a full /tmp is an
    input/output error (exit 1), not a rewrite that fails verification (exit 4)."""
    model = _external(mlp_model, tmp_path / "in")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(builtins, "open", _FullDisk(scratch))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["optimize", model, "-o", out_dir / "small.onnx", "--calib", mlp_calib, *MLP_ONLY_ARGS]
    fails_cleanly(capsys, args, 1, "cannot write a temporary copy", inputs=[model], out_dir=out_dir)
    assert list(scratch.iterdir()) == []
