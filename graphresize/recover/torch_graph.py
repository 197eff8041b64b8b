"""Run an ONNX graph (``onnx_ir``) as a differentiable torch module.

Hand-written, because the library route does not fit: ``onnx2torch`` 1.5.15 (checked on the
tiny Llama exports and SmolLM2's dynamo export; see ``graphresize/recover/__init__.py``)
stops on ops or opsets that these exports use, and ONNX Runtime's training artifacts are a
separate package. The interpreter is small: the nodes run in topological order, one torch
function per ONNX op (below, ``_OPS``), so gradients flow through every float tensor. Shape
computations (``Shape`` → ``Gather`` → ``Concat`` → ``Reshape``) run as int64 torch tensors
and are turned into Python ints only where an op needs a size. An op not in the table ends
with a one-line :class:`UnsupportedModelError` naming it; subgraphs (``If``/``Loop``) are not
supported.

The initializers named in ``trainable`` become ``torch.nn.Parameter`` s (float32 master
copies; cast to the initializer's dtype where the graph reads them), every other
initializer a frozen tensor that shares the initializer's numpy array where torch can
(``torch.from_numpy``: numpy-backed and memory-mapped tensors; a tensor held as protobuf bytes
is copied out of them, see ``recover/arrays.py``); frozen tensors are only read, never written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch

from graphresize.errors import UnsupportedModelError

_DTYPES: dict[ir.DataType, torch.dtype] = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def torch_dtype(dtype: ir.DataType | int) -> torch.dtype:
    try:
        return _DTYPES[ir.DataType(dtype)]
    except (KeyError, ValueError):
        raise UnsupportedModelError(f"the torch executor does not support tensors of type {ir.DataType(dtype).name}") from None


def tensor_to_torch(tensor: ir.TensorProtocol, *, share: bool = False) -> torch.Tensor:
    """An ``onnx_ir`` tensor as a torch tensor: a copy, or with ``share`` a view of the array
    ``tensor.numpy()`` returns (no copy where that array is the tensor's own: numpy-backed and
    memory-mapped tensors), which the caller must never write (it may be read-only memory)."""
    dtype = torch_dtype(tensor.dtype)
    array = tensor.numpy()
    if dtype == torch.bfloat16:  # numpy has no bf16 (ml_dtypes): the same bits as uint16
        array = array.view(np.uint16)
    if not share:
        array = np.array(array, copy=True)
    with warnings.catch_warnings():  # shared arrays may be read-only; they are never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        out = torch.from_numpy(array)
    return out.view(torch.bfloat16) if dtype == torch.bfloat16 else out.to(dtype)


# ------------------------------------------------------------------------------- helpers


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


# ------------------------------------------------------------------------------- ops
# Each op: f(node, inputs) -> list of outputs. ``inputs`` holds None for omitted inputs.

Op = Callable[[ir.Node, list], list]
_OPS: dict[str, Op] = {}


def _op(*names: str):
    def register(fn: Op) -> Op:
        for name in names:
            _OPS[name] = fn
        return fn

    return register


def _unary(fn):
    return lambda node, x: [fn(x[0])]


for _name, _fn in {
    "Identity": lambda t: t,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Reciprocal": torch.reciprocal,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Relu": torch.relu,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Softplus": torch.nn.functional.softplus,
    "Sign": torch.sign,
}.items():
    _OPS[_name] = _unary(_fn)

for _name, _fn in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Pow": lambda a, b: torch.pow(a, b).to(a.dtype),
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "MatMul": torch.matmul,
}.items():
    _OPS[_name] = (lambda f: lambda node, x: [f(x[0], x[1])])(_fn)


@_op("Div")
def _div(node, x):
    a, b = x
    if a.is_floating_point():
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]


@_op("Mod")
def _mod(node, x):
    if _attr(node, "fmod", 0):
        return [torch.fmod(x[0], x[1])]
    return [torch.remainder(x[0], x[1])]


@_op("Max", "Min", "Sum", "Mean")
def _variadic(node, x):
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op_type]
    out = x[0]
    for t in x[1:]:
        out = fn(out, t)
    return [out / len(x) if node.op_type == "Mean" else out]


@_op("Gelu")
def _gelu(node, x):
    return [torch.nn.functional.gelu(x[0], approximate="tanh" if _attr(node, "approximate", "none") == "tanh" else "none")]


@_op("FastGelu")
def _fast_gelu(node, x):
    t = x[0] if len(x) < 2 or x[1] is None else x[0] + x[1]
    return [torch.nn.functional.gelu(t, approximate="tanh")]


@_op("Clip")
def _clip(node, x):
    lo = x[1] if len(x) > 1 and x[1] is not None else _attr(node, "min")
    hi = x[2] if len(x) > 2 and x[2] is not None else _attr(node, "max")
    return [torch.clamp(x[0], min=lo, max=hi)]


@_op("Where")
def _where(node, x):
    return [torch.where(x[0], x[1], x[2])]


@_op("Cast")
def _cast(node, x):
    return [x[0].to(torch_dtype(_attr(node, "to")))]


@_op("CastLike")
def _cast_like(node, x):
    return [x[0].to(x[1].dtype)]


@_op("Gemm")
def _gemm(node, x):
    a, b = x[0], x[1]
    if _attr(node, "transA", 0):
        a = a.transpose(0, 1)
    if _attr(node, "transB", 0):
        b = b.transpose(0, 1)
    out = _attr(node, "alpha", 1.0) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        out = out + _attr(node, "beta", 1.0) * x[2]
    return [out]


def _reduce_axes(node, x) -> list[int] | None:
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(_attr(node, "axes", []) or [])
    if not axes:
        return [] if _attr(node, "noop_with_empty_axes", 0) else None
    return axes


@_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL2")
def _reduce(node, x):
    t = x[0]
    axes = _reduce_axes(node, x)
    keep = bool(_attr(node, "keepdims", 1))
    if axes == []:
        return [t]
    dims = tuple(range(t.dim())) if axes is None else tuple(_axis(a, t.dim()) for a in axes)
    op = node.op_type
    if op == "ReduceMean":
        return [t.mean(dim=dims, keepdim=keep)]
    if op == "ReduceSum":
        return [t.sum(dim=dims, keepdim=keep)]
    if op == "ReduceSumSquare":
        return [(t * t).sum(dim=dims, keepdim=keep)]
    if op == "ReduceL2":
        return [(t * t).sum(dim=dims, keepdim=keep).sqrt()]
    out = t
    for d in sorted(dims, reverse=True):
        if op == "ReduceMax":
            out = out.amax(dim=d, keepdim=keep)
        elif op == "ReduceMin":
            out = out.amin(dim=d, keepdim=keep)
        else:
            out = out.prod(dim=d, keepdim=keep)
    return [out]


@_op("Softmax", "LogSoftmax")
def _softmax(node, x):
    axis = _attr(node, "axis", -1)
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    return [fn(x[0], dim=axis)]


@_op("Gather")
def _gather(node, x):
    data, idx = x
    axis = _axis(_attr(node, "axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx).long()
    if idx.dim() == 0:
        return [data.select(axis, int(idx))]
    out = data.index_select(axis, idx.reshape(-1))
    return [out.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1:])]


@_op("GatherElements")
def _gather_elements(node, x):
    data, idx = x
    axis = _axis(_attr(node, "axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx).long()
    return [torch.gather(data, axis, idx)]


@_op("GatherND")
def _gather_nd(node, x):
    data, idx = x
    b = _attr(node, "batch_dims", 0)
    k = idx.shape[-1]
    batch = math.prod(data.shape[:b])
    flat_data = data.reshape(batch, *data.shape[b:])
    flat_idx = idx.reshape(batch, -1, k).long()
    sizes = torch.tensor(data.shape[b : b + k])
    flat_idx = torch.where(flat_idx < 0, flat_idx + sizes, flat_idx)
    rows = torch.arange(batch).unsqueeze(1).expand(batch, flat_idx.shape[1])
    out = flat_data[(rows, *(flat_idx[..., i] for i in range(k)))]
    return [out.reshape(*idx.shape[:-1], *data.shape[b + k :])]


@_op("ScatterElements")
def _scatter_elements(node, x):
    data, idx, upd = x
    axis = _axis(_attr(node, "axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx).long()
    reduction = _attr(node, "reduction", "none")
    if reduction == "none":
        return [data.scatter(axis, idx, upd)]
    reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[reduction]
    return [data.scatter_reduce(axis, idx, upd, reduce=reduce)]


@_op("ScatterND")
def _scatter_nd(node, x):
    data, idx, upd = x
    if _attr(node, "reduction", "none") != "none":
        raise UnsupportedModelError("the torch executor supports ScatterND without reduction only")
    out = data.clone()
    k = idx.shape[-1]
    flat = idx.reshape(-1, k).long()
    out[tuple(flat[:, i] for i in range(k))] = upd.reshape(flat.shape[0], *data.shape[k:])
    return [out]


@_op("Reshape")
def _reshape(node, x):
    data, shape = x[0], _ints(x[1])
    if not _attr(node, "allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [data.reshape(shape)]


@_op("Flatten")
def _flatten(node, x):
    axis = _axis(_attr(node, "axis", 1), x[0].dim())
    return [x[0].reshape(math.prod(x[0].shape[:axis]), -1)]


@_op("Transpose")
def _transpose(node, x):
    perm = _attr(node, "perm")
    perm = list(range(x[0].dim()))[::-1] if perm is None else list(perm)
    return [x[0].permute(perm)]


@_op("Unsqueeze")
def _unsqueeze(node, x):
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(_attr(node, "axes"))
    rank = x[0].dim() + len(axes)
    out = x[0]
    for a in sorted(_axis(a, rank) for a in axes):
        out = out.unsqueeze(a)
    return [out]


@_op("Squeeze")
def _squeeze(node, x):
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(_attr(node, "axes", []) or [])
    if not axes:
        return [x[0].squeeze()]
    return [x[0].squeeze(tuple(_axis(a, x[0].dim()) for a in axes))]


@_op("Concat")
def _concat(node, x):
    parts = [t for t in x if t is not None]
    return [torch.cat(parts, dim=_attr(node, "axis"))]


@_op("Split")
def _split(node, x):
    data = x[0]
    axis = _axis(_attr(node, "axis", 0), data.dim())
    if len(x) > 1 and x[1] is not None:
        sizes = _ints(x[1])
    elif _attr(node, "split") is not None:
        sizes = list(_attr(node, "split"))
    else:
        n = _attr(node, "num_outputs", len(node.outputs))
        chunk = -(-data.shape[axis] // n)
        sizes = [min(chunk, data.shape[axis] - i * chunk) for i in range(n)]
    return list(torch.split(data, sizes, dim=axis))


@_op("Slice")
def _slice(node, x):
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    out = data
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, data.dim())
        size = data.shape[axis]
        if step > 0:
            start = max(0, min(size, start + size if start < 0 else start))
            end = max(0, min(size, end + size if end < 0 else end))
            out = out.narrow(axis, start, max(0, end - start))
            if step != 1:
                out = out.index_select(axis, torch.arange(0, out.shape[axis], step))
        else:
            start = max(-1, min(size - 1, start + size if start < 0 else start))
            end = max(-1, min(size - 1, end + size if end < 0 else end))
            idx = torch.arange(start, end, step)
            out = out.index_select(axis, idx)
    return [out]


@_op("Shape")
def _shape(node, x):
    shape = list(x[0].shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return [torch.tensor(shape[start:end], dtype=torch.int64)]


@_op("Size")
def _size(node, x):
    return [torch.tensor(x[0].numel(), dtype=torch.int64)]


@_op("Expand")
def _expand(node, x):
    shape = _ints(x[1])
    target = torch.broadcast_shapes(tuple(x[0].shape), tuple(shape))
    return [x[0].expand(target)]


@_op("Pad")
def _pad(node, x):
    """Constant-mode Pad (DISP's writes); pads as an input (opset 11+) or an attribute."""
    if _attr(node, "mode", "constant") not in ("constant", b"constant"):
        raise UnsupportedModelError("the torch executor supports Pad in constant mode only")
    data = x[0]
    pads = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(_attr(node, "pads", []))
    value = float(x[2].reshape(-1)[0]) if len(x) > 2 and x[2] is not None and x[2].numel() else float(_attr(node, "value", 0.0))
    axes = [_axis(a, data.dim()) for a in _ints(x[3])] if len(x) > 3 and x[3] is not None else list(range(data.dim()))
    n = len(axes)
    spec: list[int] = []
    for axis in reversed(range(data.dim())):  # torch: last axis first, (before, after) pairs
        i = axes.index(axis) if axis in axes else None
        spec += [pads[i], pads[i + n]] if i is not None else [0, 0]
    return [torch.nn.functional.pad(data, spec, value=value)]


@_op("Tile")
def _tile(node, x):
    return [x[0].repeat(_ints(x[1]))]


@_op("Range")
def _range(node, x):
    start, limit, delta = (t.item() for t in x)
    return [torch.arange(start, limit, delta, dtype=x[0].dtype)]


@_op("Trilu")
def _trilu(node, x):
    k = int(x[1].item()) if len(x) > 1 and x[1] is not None else 0
    fn = torch.triu if _attr(node, "upper", 1) else torch.tril
    return [fn(x[0], diagonal=k)]


@_op("ConstantOfShape")
def _constant_of_shape(node, x):
    value = _attr(node, "value")
    fill = tensor_to_torch(value).reshape(()) if value is not None else torch.tensor(0.0)
    return [torch.full(_ints(x[0]), fill.item(), dtype=fill.dtype)]


@_op("Constant")
def _constant(node, x):
    for name, attr in node.attributes.items():
        value = attr.value
        if name in ("value", "sparse_value"):
            return [tensor_to_torch(value)]
        if name == "value_float":
            return [torch.tensor(value, dtype=torch.float32)]
        if name == "value_floats":
            return [torch.tensor(list(value), dtype=torch.float32)]
        if name == "value_int":
            return [torch.tensor(value, dtype=torch.int64)]
        if name == "value_ints":
            return [torch.tensor(list(value), dtype=torch.int64)]
    raise UnsupportedModelError(f"Constant node {node.name!r} has no value the torch executor reads")


@_op("CumSum")
def _cumsum(node, x):
    axis = int(x[1].item())
    data = x[0].flip(axis) if _attr(node, "reverse", 0) else x[0]
    out = data.cumsum(axis)
    if _attr(node, "exclusive", 0):
        out = out - data
    return [out.flip(axis) if _attr(node, "reverse", 0) else out]


@_op("Einsum")
def _einsum(node, x):
    return [torch.einsum(_attr(node, "equation"), *x)]


@_op("Dropout")
def _dropout(node, x):
    return [x[0], torch.ones_like(x[0], dtype=torch.bool)][: len(node.outputs)]


@_op("LayerNormalization")
def _layer_norm(node, x):
    data, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = _axis(_attr(node, "axis", -1), data.dim())
    eps = _attr(node, "epsilon", 1e-5)
    dims = tuple(range(axis, data.dim()))
    mean = data.mean(dim=dims, keepdim=True)
    centered = data - mean
    var = (centered * centered).mean(dim=dims, keepdim=True)
    out = centered * torch.rsqrt(var + eps) * scale
    if bias is not None:
        out = out + bias
    return [out, mean, torch.rsqrt(var + eps)][: len(node.outputs)]


@_op("SimplifiedLayerNormalization", "RMSNormalization")
def _rms_norm(node, x):
    data, scale = x[0], x[1]
    axis = _axis(_attr(node, "axis", -1), data.dim())
    eps = _attr(node, "epsilon", 1e-5)
    dims = tuple(range(axis, data.dim()))
    inv = torch.rsqrt((data * data).mean(dim=dims, keepdim=True) + eps)
    return [data * inv * scale, inv][: len(node.outputs)]


@_op("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
def _skip_norm(node, x):
    data, skip, scale = x[0], x[1], x[2]
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    beta = None if simplified or len(x) < 4 else x[3]
    bias = x[4] if not simplified and len(x) > 4 else (x[3] if simplified and len(x) > 3 else None)
    total = data + skip + (bias if bias is not None else 0)
    eps = _attr(node, "epsilon", 1e-5)
    if simplified:
        inv = torch.rsqrt((total * total).mean(-1, keepdim=True) + eps)
        out = total * inv * scale
    else:
        mean = total.mean(-1, keepdim=True)
        var = ((total - mean) ** 2).mean(-1, keepdim=True)
        out = (total - mean) * torch.rsqrt(var + eps) * scale + (beta if beta is not None else 0)
    outs = [out, None, None, total]
    return outs[: len(node.outputs)]


@_op("ArgMax")
def _argmax(node, x):
    return [x[0].argmax(dim=_attr(node, "axis", 0), keepdim=bool(_attr(node, "keepdims", 1)))]


# ------------------------------------------------------------------------------- module


def supported_ops() -> frozenset[str]:
    return frozenset(_OPS)


def check_supported(graph: ir.Graph) -> None:
    """Raise a one-line ``UnsupportedModelError`` naming the first op the executor lacks."""
    for node in graph:
        if node.op_type not in _OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
            raise UnsupportedModelError(
                f"the torch executor has no rule for op {node.domain + '::' if node.domain else ''}{node.op_type} "
                f"(node {node.name!r}); healing cannot train this graph"
            )


def _needed_nodes(graph: ir.Graph, outputs: Iterable[str]) -> list[ir.Node]:
    """The nodes that the values named ``outputs`` depend on, in graph (topological) order."""
    needed = set(outputs)
    nodes = []
    for node in reversed(list(graph)):  # onnx_ir keeps graphs in topological order
        if any(v is not None and v.name in needed for v in node.outputs):
            nodes.append(node)
            needed.update(v.name for v in node.inputs if v is not None and v.name)
    return nodes[::-1]


class TorchGraph(torch.nn.Module):
    """``module(feeds)`` runs ``model``'s main graph on ``feeds`` (name → tensor) and returns
    the values named in ``outputs`` (default: the graph outputs), in that order; an
    intermediate value may be named too (the trainer stops before the LM head).

    ``trainable`` initializers are parameters (``self.params[i]`` for ``self.param_names[i]``);
    the rest are kept as frozen tensors. The model itself is only read.
    """

    def __init__(self, model: ir.Model, trainable: Iterable[str] = (), outputs: Sequence[str] | None = None) -> None:
        super().__init__()
        graph = model.graph
        check_supported(graph)
        trainable = list(dict.fromkeys(trainable))
        self.param_names = trainable
        self.params = torch.nn.ParameterList()
        self._param_dtype: dict[str, torch.dtype] = {}
        self._frozen: dict[str, torch.Tensor] = {}
        for name, value in graph.initializers.items():
            if value.const_value is None:
                continue
            if name in trainable:
                continue
            self._frozen[name] = tensor_to_torch(value.const_value, share=True)
        for name in trainable:
            value = graph.initializers.get(name)
            if value is None or value.const_value is None:
                raise UnsupportedModelError(f"trainable initializer {name!r} is not in the graph")
            t = tensor_to_torch(value.const_value)
            if not t.is_floating_point():
                raise UnsupportedModelError(f"trainable initializer {name!r} is not a float tensor")
            self._param_dtype[name] = t.dtype
            self.params.append(torch.nn.Parameter(t.to(torch.float32)))
        self._index = {name: i for i, name in enumerate(trainable)}
        self._inputs = [v.name for v in graph.inputs]
        self._outputs = [v.name for v in graph.outputs] if outputs is None else list(outputs)
        known = set(self._inputs) | {v.name for node in graph for v in node.outputs}
        known |= {name for name, v in graph.initializers.items() if v.const_value is not None}
        missing = [n for n in self._outputs if n not in known]
        if missing:
            raise UnsupportedModelError(f"the graph has no value {missing[0]!r}")
        self._nodes = _needed_nodes(graph, self._outputs)
        # each value's last reader, so that intermediate tensors are released as soon as possible
        last: dict[str, int] = {}
        for i, node in enumerate(self._nodes):
            for v in node.inputs:
                if v is not None:
                    last[v.name] = i
        keep = set(self._outputs)
        self._release: list[list[str]] = [[] for _ in self._nodes]
        for name, i in last.items():
            if name not in keep:
                self._release[i].append(name)

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: self.params[i] for name, i in self._index.items()}

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        for name in self._inputs:
            if name not in feeds:
                raise UnsupportedModelError(f"no feed for graph input {name!r}")
            env[name] = feeds[name]
        env.update(self._frozen)
        for name, i in self._index.items():
            p = self.params[i]
            env[name] = p if self._param_dtype[name] == torch.float32 else p.to(self._param_dtype[name])
        for node, release in zip(self._nodes, self._release, strict=True):
            args = [None if v is None or not v.name else env[v.name] for v in node.inputs]
            try:
                outs = _OPS[node.op_type](node, args)
            except UnsupportedModelError:
                raise
            except Exception as exc:
                raise UnsupportedModelError(
                    f"the torch executor failed at node {node.name!r} ({node.op_type}): {str(exc).splitlines()[0][:200]}"
                ) from None
            for value, out in zip(node.outputs, outs, strict=False):
                if value is not None and value.name and out is not None:
                    env[value.name] = out
            for name in release:
                if name not in self._frozen and name not in self._index:
                    env.pop(name, None)
        return [env[name] for name in self._outputs]
