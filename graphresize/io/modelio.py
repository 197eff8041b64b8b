"""Load models with clear errors and save them atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx
import onnx_ir as ir

from graphresize import errors
from graphresize.errors import InputError, UnsupportedModelError
from graphresize.io import publish

# Above this many bytes of tensors a model is written with external data (protobuf limit 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Above this many bytes of tensors the external data is split into shards of at most this size.
MAX_SHARD_BYTES = 2_000_000_000

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
    except MemoryError:
        raise
    except Exception as exc:  # protobuf DecodeError, OSError, ValueError ...
        if errors.out_of_memory(exc):
            raise
        raise InputError(f"{path}: not a readable ONNX model ({_short(exc)})") from None
    if len(model.graph) == 0:
        raise InputError(f"{path}: the ONNX graph has no nodes")
    _check_inputs_defined(model, path)
    _check_external_data(model, path)
    _check_tensor_sizes(model, path)
    return model


def _check_inputs_defined(model: ir.Model, path: Path) -> None:
    """Every input of a main-graph node is a graph input, an initializer or a node output."""
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.producer() is None and not value.is_graph_input() and not value.is_initializer():
                raise InputError(f"{path}: node {node.name!r} reads {value.name!r}, which nothing defines")


def _check_external_data(model: ir.Model, path: Path) -> None:
    for init in model.graph.initializers.values():
        tensor = init.const_value
        if isinstance(tensor, ir.ExternalTensor):
            location = Path(tensor.base_dir) / tensor.location
            if not location.exists():
                raise InputError(f"{path}: external data file {tensor.location!r} is missing")
            if location.stat().st_size < (tensor.offset or 0) + (tensor.length or 0):
                raise InputError(f"{path}: external data file {tensor.location!r} is truncated")


def _check_tensor_sizes(model: ir.Model, path: Path) -> None:
    """Refuse initializers whose stored bytes do not match their shape and type (a corrupt
    file often still parses); reads sizes only, no tensor data is decoded."""
    for init in model.graph.initializers.values():
        tensor = init.const_value
        if not isinstance(tensor, ir.serde.TensorProtoTensor):
            continue
        proto = tensor.raw
        if not proto.HasField("raw_data"):
            continue
        try:
            expected = tensor.nbytes
        except Exception:  # unknown data type, negative dims ...
            raise InputError(f"{path}: initializer {init.name!r} has an invalid type or shape") from None
        if len(proto.raw_data) != expected:
            raise InputError(
                f"{path}: initializer {init.name!r} holds {len(proto.raw_data)} bytes, its shape needs {expected}"
            )


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
    if output_path.exists() and input_path.exists() and _same_file(output_path, input_path):
        raise InputError(f"{output_path}: output path is the input model; choose another path")
    if not output_path.name or output_path.name in (".", ".."):
        raise InputError(f"{str(output_path)!r}: not a file name")
    publish.check_target(output_path, overwrite=overwrite)
    check_writable(output_path)


def check_writable(path: Path) -> None:
    """Raise ``InputError`` unless a file can be created beside ``path``."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: output directory does not exist")
    try:  # a real probe: os.access says yes to root on read-only file systems
        with tempfile.TemporaryFile(prefix=f".{path.name}.", dir=parent):
            pass
    except OSError as exc:
        raise InputError(f"{parent}: output directory is not writable ({_short(exc)})") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def external_files(model: ir.Model) -> set[Path]:
    """The external data files the model's initializers read from."""
    found = set()
    for init in model.graph.initializers.values():
        tensor = init.const_value
        if isinstance(tensor, ir.ExternalTensor):
            found.add((Path(tensor.base_dir) / tensor.location).resolve())
    return found


def save_model_atomic(model: ir.Model, output_path: str | os.PathLike, *, overwrite: bool = True, keep: Iterable[Path] = (),
                      inline: bool = False) -> list[Path]:
    """Write ``model`` to ``output_path`` so that the path holds either the whole new model or
    what it held before, never a graph beside another run's data; return the files written.

    The model and its external data (above ~1.8 GB of tensors, or when the model was loaded
    with external data: ``<name>.<tag>.data``, ``tag`` unique to this write; split into
    ``<name>.<tag>-0000i-of-0000n.data`` shards of at most ``MAX_SHARD_BYTES`` when larger)
    are written into a temporary folder beside the target, tensor by tensor (external tensors
    are read from their memory map one at a time), then published by
    :func:`graphresize.io.publish.publish_model`: data first, the graph last (exclusively unless
    ``overwrite``), the data files of a replaced output removed after. Leftovers of earlier
    writes to the same path that were killed are removed first. Any failure (disk full,
    permissions, lost race) raises ``InputError`` and leaves no temporary file behind.

    ``inline``: the weights go inside the protobuf even though some are external tensors (the
    segment engine keeps an inline input's weights on disk, ``io/spill.py``), when they are
    under the external-data threshold: written with external data into a staging folder, then
    streamed back inline by ``spill.internalize`` (the same bytes as an in-memory save).
    """
    output_path = Path(output_path)
    parent = output_path.parent if str(output_path.parent) else Path(".")
    output_path = parent / output_path.name
    publish.check_target(output_path, overwrite=overwrite)
    publish.clean_stale(output_path, _data_files_of)
    tag = publish.new_tag()
    total = tensor_bytes(model)
    stream_inline = inline and total <= EXTERNAL_DATA_THRESHOLD and needs_external_data(model)
    external = publish.data_name(output_path, tag) if needs_external_data(model) else None
    sharded = external is not None and total > MAX_SHARD_BYTES
    inputs = external_files(model) | {Path(k).resolve() for k in keep}
    tmp_dir = publish.temp_dir(output_path, tag)
    try:
        if stream_inline:
            from graphresize.io import spill

            stage = tmp_dir / ".stage"
            stage.mkdir()
            ir.save(model, stage / output_path.name, external_data=external)
            spill.internalize(stage / output_path.name, tmp_dir / output_path.name)
            shutil.rmtree(stage)
        else:
            ir.save(model, tmp_dir / output_path.name, external_data=external,
                    max_shard_size_bytes=MAX_SHARD_BYTES if sharded else None)
        return publish.publish_model(tmp_dir, output_path, tag, overwrite=overwrite,
                                     old_data=_own_data_files(output_path), keep=inputs)
    except OSError as exc:
        raise InputError(f"{output_path}: cannot write ({_short(exc)})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _own_data_files(path: Path) -> set[str]:
    """The data files of the graph at ``path`` that a write of ``path`` may remove when it
    replaces it: those whose names start like the graph's (``OUT.onnx.data``,
    ``OUT-00001-of-00002.onnx.data``, ``OUT.onnx.<tag>.data``), not another model's."""
    return {n for n in _data_files_of(path) if n.startswith(path.name) or n.startswith(path.stem + "-")}


def _data_files_of(path: Path) -> set[str]:
    """External data files (beside ``path``, by name) that an existing ONNX file names; empty
    when there is none or it does not parse. Reads the graph only."""
    if not path.is_file():
        return set()
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:
        return set()
    names = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and Path(entry.value).name == entry.value:
                names.add(entry.value)
    return names


def needs_external_data(model: ir.Model) -> bool:
    """Whether the model must be written with external data: its tensors pass the protobuf
    limit, or some still live in an external file (saving them inline would keep references
    to the input's data file)."""
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        return True
    return tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD


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
