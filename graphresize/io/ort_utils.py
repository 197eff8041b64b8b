"""ONNX Runtime sessions for in-memory models, and input feeds for transformer graphs."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphresize.errors import InputError, UnsupportedModelError, UsageError, VerificationError
from graphresize.io.modelio import tensor_bytes

# Above this many bytes of tensors a session is built from a temporary file with external data
# rather than from serialized bytes, which would hold two more copies of every weight (the
# protobuf and its serialization) while ONNX Runtime reads them.
SESSION_BYTES_INLINE = 256 * 2**20

_ORT_DTYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
}


def providers_for(name: str = "cpu") -> list[str]:
    """ORT execution providers for ``cpu`` or ``cuda`` (CUDA falls back to CPU for unsupported
    ops); a provider this onnxruntime lacks is a usage error."""
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            available = ", ".join(ort.get_available_providers())
            raise UsageError(
                f"--provider cuda: CUDAExecutionProvider is not available in this onnxruntime "
                f"(has {available}); install onnxruntime-gpu in place of onnxruntime"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise UsageError(f"unknown provider {name!r}; choose cpu or cuda")


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # errors reach the caller as exceptions; ORT's own log lines only with --debug
    options.log_severity_level = 3 if logging.getLogger().isEnabledFor(logging.DEBUG) else 4
    if threads:
        options.intra_op_num_threads = threads
    return options


@contextlib.contextmanager
def _with_outputs(model: ir.Model, names: Sequence[str]) -> Iterator[None]:
    """Temporarily expose the values ``names`` as extra graph outputs."""
    graph = model.graph
    existing = {v.name for v in graph.outputs}
    values = {v.name: v for node in graph for v in node.outputs}
    added = [values[n] for n in names if n not in existing]
    graph.outputs.extend(added)
    try:
        yield
    finally:
        for value in added:
            graph.outputs.remove(value)


def make_session(
    model: ir.Model,
    extra_outputs: Sequence[str] = (),
    *,
    provider: str = "cpu",
    threads: int | None = None,
) -> ort.InferenceSession:
    """An ORT session for an in-memory model, with ``extra_outputs`` exposed as outputs.

    Models above ``SESSION_BYTES_INLINE``, or loaded with external data, go through a
    temporary file with external data, written tensor by tensor (ORT refuses external paths for
    a model given as bytes): a whole copy of the model in ``$TMPDIR`` (``tempfile.gettempdir()``)
    while the session loads, removed after; set ``TMPDIR`` to a disk with room for it.
    """
    providers = providers_for(provider)
    session = _load_session(model, extra_outputs, providers, threads)
    session.graphresize_cache_head_sizes = cache_head_sizes(model)
    return session


def _load_session(model: ir.Model, extra_outputs: Sequence[str], providers: list[str], threads: int | None) -> ort.InferenceSession:
    with _with_outputs(model, extra_outputs):
        try:
            external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
            if not external and tensor_bytes(model) <= SESSION_BYTES_INLINE:
                data = ir.to_proto(model).SerializeToString()
                return _checked(ort.InferenceSession(data, session_options(threads), providers=providers), providers)
            with tempfile.TemporaryDirectory(prefix="graphresize-") as tmp:
                path = Path(tmp) / "model.onnx"
                try:
                    ir.save(model, path, external_data="model.onnx.data")
                except OSError as exc:  # e.g. a full temporary directory: not the graph's fault
                    raise InputError(f"cannot write a temporary copy of the model for ONNX Runtime ({exc})") from None
                return _checked(ort.InferenceSession(str(path), session_options(threads), providers=providers), providers)
        except (UsageError, InputError):
            raise
        except Exception as exc:  # ORT raises its own pybind exception types
            raise VerificationError(f"ONNX Runtime cannot load the graph: {str(exc).splitlines()[0][:300]}") from None


def cache_head_sizes(model: ir.Model) -> dict[str, int]:
    """Head size of each past key/value graph input that ``GroupQueryAttention`` reads, where
    the graph leaves it symbolic (onnxruntime-genai's ``kv_cache_dim``): the query width over
    the number of heads (over all q, k and v heads when the query input packs them)."""
    sizes: dict[str, int] = {}
    for node in model.graph:
        if node.op_type != "GroupQueryAttention" or len(node.inputs) < 5:
            continue
        width = _last_dim(node.inputs[0])
        if width is None:
            continue
        heads = node.attributes.get_int("num_heads", 0)
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        heads += 2 * node.attributes.get_int("kv_num_heads", 0) if packed else 0
        for past in node.inputs[3:5]:
            if past is not None and past.is_graph_input() and heads and width % heads == 0:
                sizes[past.name] = width // heads
    return sizes


def _last_dim(value: ir.Value, depth: int = 4) -> int | None:
    """The static last dimension of ``value``, else of the constant weight of the MatMul that
    makes it (through a bias Add): a rewrite that narrowed the weight may leave the shape unset."""
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    if node is None or depth == 0:
        return None
    if node.op_type == "Add":
        return _last_dim(node.inputs[0], depth - 1)
    if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        return node.inputs[1].const_value.shape[-1]
    return None


def _checked(session: ort.InferenceSession, providers: list[str]) -> ort.InferenceSession:
    """Refuse a session that asked for CUDA and silently fell back to the CPU (ORT does so
    when the CUDA libraries fail to load)."""
    if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in session.get_providers():
        raise UsageError("--provider cuda: onnxruntime could not start CUDAExecutionProvider (check the CUDA and cuDNN libraries)")
    return session


def make_feeds(session: ort.InferenceSession, input_ids: np.ndarray, past_len: int = 0) -> dict[str, np.ndarray]:
    """Feeds for a transformer graph from token ids ``[batch, seq]`` that follow ``past_len``
    cached positions.

    Inputs are recognised by the names exporters give them: ``input_ids``, ``attention_mask``
    (ones over ``past_len + seq``), ``position_ids`` (``past_len .. past_len+seq-1``),
    ``token_type_ids`` (zeros) and past key/value caches (zeros: batch on the first symbolic
    axis, ``past_len`` on the others, but a symbolic head size that ``make_session`` found in
    the graph, see ``cache_head_sizes``).
    """
    batch, seq = input_ids.shape
    feeds = {}
    for spec in session.get_inputs():
        name, dtype = spec.name, _ORT_DTYPES.get(spec.type)
        lower = name.lower()
        if dtype is None:
            raise UnsupportedModelError(f"graph input {name} has unsupported type {spec.type}")
        if lower in ("input_ids", "input", "ids", "tokens") or (lower.endswith("input_ids")):
            feeds[name] = input_ids.astype(dtype)
        elif "attention_mask" in lower or lower == "mask":
            feeds[name] = np.ones((batch, past_len + seq), dtype=dtype)
        elif "position_ids" in lower:
            feeds[name] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=dtype), (batch, seq)).copy()
        elif "token_type_ids" in lower:
            feeds[name] = np.zeros((batch, seq), dtype=dtype)
        elif "past" in lower or "cache" in lower:
            head = getattr(session, "graphresize_cache_head_sizes", {}).get(name)
            shape = _empty_cache_shape(spec.shape, batch, past_len)
            if head is not None and len(shape) == 4 and not isinstance(spec.shape[-1], int):
                shape[-1] = head
            feeds[name] = np.zeros(shape, dtype=dtype)
        else:
            raise UnsupportedModelError(f"do not know how to feed graph input {name!r}")
    return feeds


def _empty_cache_shape(shape: Sequence[int | str | None], batch: int, past_len: int = 0) -> list[int]:
    dims, batch_set = [], False
    for dim in shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif not batch_set:
            dims.append(batch)
            batch_set = True
        else:
            dims.append(past_len)
    return dims
