"""Weights on disk, not in RAM: the memory-bounded path of ``--engine segment``.

Three rules, each applied tensor by tensor so that no step holds more than one tensor:

* :func:`externalize` — an ONNX file with weights *inside* its protobuf is rewritten once into
  a temporary copy whose large initializers are external data (``<dir>/model.onnx`` +
  ``weights.data``). The input file is scanned field by field in the protobuf wire format
  (hand-written here: ``onnx`` can only convert a fully parsed ``ModelProto``, which would hold
  every weight in memory): each ``TensorProto`` of the graph is parsed alone, its bytes appended
  to the data file (64-byte aligned), and it is re-encoded with ``external_data`` entries; every
  other field is copied verbatim. Loading the copy with ``onnx_ir`` then gives lazy
  memory-mapped ``ExternalTensor`` weights.
* :class:`WeightSpill` — a rewritten (in-memory) initializer above ``min_bytes`` is appended to
  a spill data file and replaced by an ``ExternalTensor`` over it, so the resized weights of
  finished segments live on disk until the output is written (``ir.save`` then copies them
  with ``copy_file_range``).
* :func:`release` — every memory map that an ``ExternalTensor`` opened when it was read is
  closed (its touched pages count in the process's resident set while mapped); a map still
  exported to a live numpy view is left open.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

#: Initializers at least this large go to the data file (smaller ones stay in the protobuf).
MIN_EXTERNAL_BYTES = 1024
_ALIGN = 64

# protobuf field numbers (onnx.proto3): ModelProto.graph, GraphProto.initializer
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5


class _FileBytes:
    """A file's bytes by ``pread`` (``buf[i]``, ``buf[a:b]``, ``len(buf)``): unlike a memory
    map, nothing read stays resident in the process (the page cache is not counted in its RSS)."""

    def __init__(self, f) -> None:
        self._fd = f.fileno()
        self._size = os.fstat(self._fd).st_size
        self._block, self._start = b"", 0

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key):
        if isinstance(key, slice):
            return os.pread(self._fd, key.stop - key.start, key.start)
        if not self._start <= key < self._start + len(self._block):  # varint bytes: read ahead a little
            self._start, self._block = key, os.pread(self._fd, 4096, key)
        return self._block[key - self._start]


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, field start, payload start, payload end) of the
    message ``buf[start:end]`` (payload of a varint/fixed field: its bytes)."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(buf, pos)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if after > end:
            raise ValueError("truncated protobuf field")
        yield number, wire, field_start, pos, after
        pos = after


def has_embedded_weights(path: Path, min_bytes: int = MIN_EXTERNAL_BYTES) -> bool:
    """Whether the graph of the ONNX file at ``path`` holds an initializer of at least
    ``min_bytes`` inside the protobuf (reads field headers only)."""
    with open(path, "rb") as f:
        buf = _FileBytes(f)
        for number, wire, _, start, end in _fields(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and wire == 2:
                for gnum, gwire, _, tstart, tend in _fields(buf, start, end):
                    if gnum == _GRAPH_INITIALIZER and gwire == 2 and tend - tstart >= min_bytes:
                        return True
    return False


def externalize(path: Path, folder: Path, min_bytes: int = MIN_EXTERNAL_BYTES) -> Path:
    """Write ``folder/model.onnx`` + ``folder/weights.data``: the model at ``path`` with every
    initializer of at least ``min_bytes`` moved to external data (module docstring); the input
    is read with ``pread``, one tensor decoded at a time. Returns the new model's path."""
    out_model, data_name = folder / "model.onnx", "weights.data"
    with open(path, "rb") as f, open(folder / data_name, "wb") as data, open(out_model, "wb") as out:
        buf = _FileBytes(f)
        for number, wire, field_start, start, end in _fields(buf, 0, len(buf)):
            if number != _MODEL_GRAPH or wire != 2:
                out.write(buf[field_start:end])
                continue
            graph = bytearray()
            for gnum, gwire, gfield_start, tstart, tend in _fields(buf, start, end):
                if gnum != _GRAPH_INITIALIZER or gwire != 2 or tend - tstart < min_bytes:
                    graph += buf[gfield_start:tend]
                    continue
                tensor = onnx.TensorProto.FromString(buf[tstart:tend])
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    raise ValueError(f"initializer {tensor.name!r} mixes embedded and external data")
                _to_external(tensor, data, data_name)
                body = tensor.SerializeToString()
                graph += _encode_varint((_GRAPH_INITIALIZER << 3) | 2) + _encode_varint(len(body)) + body
                del tensor, body
            out.write(_encode_varint((_MODEL_GRAPH << 3) | 2) + _encode_varint(len(graph)))
            out.write(graph)
            del graph
    return out_model


def internalize(path: Path, out: Path, chunk: int = 64 * 2**20) -> None:
    """Write ``out``: the model at ``path`` (external data beside it) with every external
    initializer's bytes back inside the protobuf as ``raw_data``, streamed in ``chunk``-sized
    reads. Each tensor is re-encoded with its fields in field-number order, ``raw_data`` (field
    9) in its place, so the file is the bytes ``ir.save`` writes for the same model held in
    memory. The graph's length is computed from the tensors' headers first, so no tensor's
    data is ever held whole."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf, open(out, "wb") as dst:
        for number, wire, field_start, start, end in _fields(buf, 0, len(buf)):
            if number != _MODEL_GRAPH or wire != 2:
                dst.write(buf[field_start:end])
                continue
            pieces: list[bytes | tuple[Path, int, int]] = []  # bytes, or (file, offset, length) to copy
            for gnum, gwire, gfield_start, tstart, tend in _fields(buf, start, end):
                tensor = onnx.TensorProto.FromString(buf[tstart:tend]) if gnum == _GRAPH_INITIALIZER and gwire == 2 else None
                if tensor is None or tensor.data_location != onnx.TensorProto.EXTERNAL:
                    pieces.append(buf[gfield_start:tend])
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                source = path.parent / info["location"]
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else source.stat().st_size - offset
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                head = tensor.SerializeToString()
                before = bytearray()
                after = bytearray()
                for tnum, _, tfield_start, _, tfield_end in _fields(head, 0, len(head)):
                    (before if tnum < 9 else after).extend(head[tfield_start:tfield_end])
                raw_key = _encode_varint((9 << 3) | 2) + _encode_varint(length)
                size = len(before) + len(raw_key) + length + len(after)
                pieces.append(_encode_varint((_GRAPH_INITIALIZER << 3) | 2) + _encode_varint(size) + bytes(before) + raw_key)
                pieces.append((source, offset, length))
                pieces.append(bytes(after))
            total = sum(len(p) if isinstance(p, bytes) else p[2] for p in pieces)
            dst.write(_encode_varint((_MODEL_GRAPH << 3) | 2) + _encode_varint(total))
            for piece in pieces:
                if isinstance(piece, bytes):
                    dst.write(piece)
                    continue
                source, offset, length = piece
                with open(source, "rb") as src:
                    src.seek(offset)
                    while length:
                        block = src.read(min(chunk, length))
                        if not block:
                            raise OSError(f"{source}: shorter than its tensors say")
                        dst.write(block)
                        length -= len(block)


def _to_external(tensor: onnx.TensorProto, data, location: str) -> None:
    """Append ``tensor``'s bytes to ``data`` (aligned) and point it there."""
    if tensor.HasField("raw_data"):
        raw = tensor.raw_data
    else:  # typed fields (float_data ...): little-endian bytes as ONNX stores raw_data
        raw = onnx.numpy_helper.to_array(tensor).astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<")).tobytes()
    offset = _pad(data)
    data.write(raw)
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(name)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _pad(data) -> int:
    offset = data.tell()
    if offset % _ALIGN:
        data.write(b"\0" * (_ALIGN - offset % _ALIGN))
        offset = data.tell()
    return offset


class WeightSpill:
    """An append-only data file in ``folder`` holding rewritten initializers (module docstring)."""

    def __init__(self, folder: Path, min_bytes: int = MIN_EXTERNAL_BYTES) -> None:
        self.folder, self.min_bytes = folder, min_bytes
        self.location = "spilled.data"
        self.written = 0  # tensors spilled so far

    def spill(self, model: ir.Model) -> int:
        """Move every in-memory initializer of ``model`` of at least ``min_bytes`` to the spill
        file; returns how many moved."""
        moved = 0
        with open(self.folder / self.location, "ab") as data:
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < self.min_bytes:
                    continue
                if tensor.dtype.bitwidth < 8 or tensor.dtype == ir.DataType.STRING:
                    continue
                array = np.ascontiguousarray(tensor.numpy())
                offset = _pad(data)
                data.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
                data.flush()
                value.const_value = DiskTensor(self.location, offset, array.nbytes, tensor.dtype,
                                                      shape=tensor.shape, name=tensor.name or value.name,
                                                      base_dir=self.folder)
                moved += 1
        self.written += moved
        return moved


class DiskTensor(ir.ExternalTensor):
    """An external tensor read with ``pread`` into a fresh array on every ``numpy()`` (not
    memory-mapped, not cached): what a reader holds is freed when it drops it, so walking every
    weight (a cleanup pass, a save) never makes the whole file resident. Writing it out still
    copies file to file (``tofile``)."""

    def _read(self) -> np.ndarray:
        self._check_validity()
        self._check_path_containment()  # as onnx_ir's own read: no path outside the model's folder
        dtype = np.dtype(self.dtype.numpy()).newbyteorder("<")
        count = self.size
        array = np.empty(count, dtype=dtype)
        if count:
            view = memoryview(array.view(np.uint8).reshape(-1))
            with open(self.path, "rb") as f:
                done, offset = 0, self.offset or 0
                while done < view.nbytes:
                    n = os.preadv(f.fileno(), [view[done:]], offset + done)
                    if n <= 0:
                        raise OSError(f"{self.path}: shorter than tensor {self.name!r} says")
                    done += n
        return array.reshape(self.shape.numpy())

    def numpy(self) -> np.ndarray:
        return self._read()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self._read()
        return array if dtype is None else array.astype(dtype)

    def tobytes(self) -> bytes:
        return self._read().tobytes()


def read_from_disk(model: ir.Model) -> int:
    """Replace every plain-dtype ``ExternalTensor`` initializer of ``model`` by a
    :class:`DiskTensor` over the same bytes; returns how many."""
    swapped = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if type(tensor) is ir.ExternalTensor and tensor.dtype.bitwidth >= 8 and tensor.dtype != ir.DataType.STRING:
            tensor.release()
            value.const_value = DiskTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                                           name=tensor.name, base_dir=tensor.base_dir)
            swapped += 1
    return swapped


#: ``model.meta`` key of the run's :class:`WeightSpill` (set by the pipeline for ``--engine segment``).
META_KEY = "graphresize.weight_spill"


def settle(model: ir.Model) -> None:
    """Spill the rewritten weights (when the run has a :class:`WeightSpill`) and close the
    read memory maps: called by the segment engine after each segment."""
    store = model.meta.get(META_KEY)
    if store is not None:
        store.spill(model)
        release(model)


def release(model: ir.Model) -> None:
    """Close the memory map of every external initializer that was read (see module docstring)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.raw is not None:
            with contextlib.suppress(BufferError):  # a numpy view still reads it: mapped until dropped
                tensor.release()


class Workspace:
    """A temporary folder for the externalized input and the spill file, removed on close."""

    def __init__(self, near: Path | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="graphresize-weights-"))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def data_bytes(path: Path) -> int:
    """Bytes of the ONNX file plus its external data files (the 'weight bytes' that peak
    memory is compared with)."""
    total = path.stat().st_size
    proto = onnx.load(path, load_external_data=False)
    seen = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                total += (path.parent / entry.value).stat().st_size
    return total


__all__ = ["META_KEY", "MIN_EXTERNAL_BYTES", "WeightSpill", "Workspace", "data_bytes", "externalize", "has_embedded_weights", "internalize", "read_from_disk", "release", "settle", "DiskTensor"]

