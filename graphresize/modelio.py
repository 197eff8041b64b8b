"""Load models with clear errors and save them atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from graphresize.errors import InputError, UnsupportedModelError

# Above this many bytes of tensors a model is written with external data (protobuf limit 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearMatMul",
        "QLinearConv",
        "MatMulInteger",
        "MatMulNBits",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QAttention",
        "GatherBlockQuantized",
        "QMoE",
    }
)


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file (external data memory-mapped) or raise ``InputError``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf DecodeError, OSError, ValueError ...
        raise InputError(f"{path}: not a readable ONNX model ({_short(exc)})") from None
    if len(model.graph) == 0:
        raise InputError(f"{path}: the ONNX graph has no nodes")
    _check_external_data(model, path)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for init in model.graph.initializers.values():
        tensor = init.const_value
        if isinstance(tensor, ir.ExternalTensor):
            location = Path(tensor.base_dir) / tensor.location
            if not location.exists():
                raise InputError(f"{path}: external data file {tensor.location!r} is missing")
            if location.stat().st_size < (tensor.offset or 0) + (tensor.length or 0):
                raise InputError(f"{path}: external data file {tensor.location!r} is truncated")


def check_not_quantized(model: ir.Model) -> None:
    """Refuse quantized graphs: resizing must happen before quantization."""
    found = sorted({node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type in QUANTIZED_OPS})
    if found:
        raise UnsupportedModelError(
            f"the model is quantized ({', '.join(found)}): resize before quantizing"
        )
    for init in model.graph.initializers.values():
        if init.const_value is not None and init.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            raise UnsupportedModelError("the model has 4-bit weights: resize before quantizing")


def tensor_bytes(model: ir.Model) -> int:
    """Total bytes of the model's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def check_output_path(input_path: Path, output_path: Path, *, overwrite: bool) -> None:
    """Raise ``InputError`` when writing ``output_path`` would be unsafe."""
    if output_path.exists() and input_path.exists() and output_path.resolve() == input_path.resolve():
        raise InputError(f"{output_path}: output path is the input model; choose another path")
    if output_path.is_dir():
        raise InputError(f"{output_path}: is a directory")
    if output_path.exists() and not overwrite:
        raise InputError(f"{output_path}: already exists (pass --overwrite to replace it)")
    parent = output_path.parent if str(output_path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: output directory does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: output directory is not writable")


def save_model_atomic(model: ir.Model, output_path: str | os.PathLike) -> list[Path]:
    """Write ``model`` to ``output_path`` so that the path holds either the whole new model or
    what it held before; return the files written.

    The model and its external data (``<name>.data``, used above ~1.8 GB) are written into a
    temporary directory beside the target, then renamed into place, data first.
    """
    output_path = Path(output_path)
    external = output_path.name + ".data" if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD else None
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent or "."))
    try:
        try:
            ir.save(model, tmp_dir / output_path.name, external_data=external)
        except OSError as exc:
            raise InputError(f"{output_path}: cannot write ({_short(exc)})") from None
        written = []
        if external:
            os.replace(tmp_dir / external, output_path.parent / external)
            written.append(output_path.parent / external)
        os.replace(tmp_dir / output_path.name, output_path)
        written.append(output_path)
        return written
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
