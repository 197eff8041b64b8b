"""Give the rotary embeddings onnxscript matched ONNX Runtime's form: ``com.microsoft``
RotaryEmbedding on position ids and cos/sin caches.

onnxscript's ``fuse_rotary_embedding`` rewrites ``x·cos + rotate_half(x)·sin`` into an
``ai.onnxruntime._fusion`` RotaryEmbedding(x, cos, sin) that ONNX Runtime cannot run; its
``fuse_cos_sin_cache`` then turns that into ORT's op, but only for the angle computation older
transformers wrote (``MatMul(inv_freq[1,E,1], positions[B,1,S])`` then a Transpose). Current
transformers, through both the dynamo and the TorchScript exporter, write it as a broadcast
product, and the intermediate op was inlined back: no RotaryEmbedding in the output.
:class:`RotaryCachePass` handles that form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from graphresize.passes.static_dims import dims_read

from graphresize.analysis.channels import constant_ints

#: Domain of onnxscript's intermediate rotary op (a function ORT cannot run).
FUSION_DOMAIN = "ai.onnxruntime._fusion"
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass(frozen=True)
class _Angles:
    """``angles[b, s, i] = float(positions[b, s]) · inv_freq[i]``, as the graph computes them.

    ``positions`` is a graph input ``[B, S]`` (``start`` None), or ``start + s`` for a
    ``Range(start, limit, 1)`` broadcast over the batch (``positions`` that Range, 1-D)."""

    positions: ir.Value
    start: ir.Value | None
    inv_freq: np.ndarray  # float32, 1-D


@dataclass(frozen=True)
class _Site:
    """One rotary node and how its cos/sin were computed from the angles."""

    node: ir.Node
    angles: _Angles
    scale: np.ndarray | None  # the constant cos and sin were multiplied by, float32 scalar
    dtype: ir.DataType  # of the cos/sin fed to the rotary (a Cast from float32 when not FLOAT)


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _same_dim(a, b) -> bool:
    """Two shape entries that are provably equal: the same int, or the same named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _scalar(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None:
        return None
    array = np.asarray(tensor.numpy())
    return array.reshape(()) if array.size == 1 and array.ndim <= 1 else None


def _unwrap_table(value: ir.Value, trig: str) -> tuple[ir.Value, np.ndarray | None, ir.DataType] | None:
    """``Unsqueeze(Cast?(Mul?(Trig(e), scale)), [1])`` -> (e, scale, dtype of the result)."""
    unsqueeze = _producer(value, "Unsqueeze")
    if unsqueeze is None or constant_ints(unsqueeze.inputs[1] if len(unsqueeze.inputs) > 1 else None) != [1]:
        return None
    table = unsqueeze.inputs[0]
    dtype = table.dtype
    cast = _producer(table, "Cast")
    if cast is not None:
        table = cast.inputs[0]
        if table.dtype != ir.DataType.FLOAT or dtype not in _FLOAT_TYPES:
            return None
    scale = None
    mul = _producer(table, "Mul")
    if mul is not None:
        for i in (0, 1):
            if _producer(mul.inputs[i], trig) is not None and (s := _scalar(mul.inputs[1 - i])) is not None:
                table, scale = mul.inputs[i], s.astype(np.float32)
                break
        else:
            return None
    node = _producer(table, trig)
    if node is None or node.outputs[0].dtype != ir.DataType.FLOAT:
        return None
    return node.inputs[0], scale, dtype


def _angles(emb: ir.Value) -> _Angles | None:
    """``Concat(f, f, axis=-1)`` with ``f = Cast(Unsqueeze(positions), float) · inv_freq``."""
    concat = _producer(emb, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None
    rank = len(emb.shape) if emb.shape is not None else 3
    if concat.attributes.get_int("axis", 0) % rank != rank - 1:
        return None
    mul = _producer(concat.inputs[0], "Mul")
    if mul is None:
        return None
    for i in (0, 1):
        cast, freq = _producer(mul.inputs[i], "Cast"), ir.convenience.get_const_tensor(mul.inputs[1 - i])
        if cast is not None and freq is not None:
            break
    else:
        return None
    inv_freq = np.asarray(freq.numpy())
    if cast.attributes.get_int("to", 0) != ir.DataType.FLOAT or inv_freq.dtype != np.float32:
        return None
    if inv_freq.ndim != 1 and inv_freq.shape[:-1] != (1,) * (inv_freq.ndim - 1):
        return None
    positions = cast.inputs[0]
    axes: list[int] = []
    while (unsqueeze := _producer(positions, "Unsqueeze")) is not None:
        found = constant_ints(unsqueeze.inputs[1] if len(unsqueeze.inputs) > 1 else None)
        if found is None or min(found, default=0) < 0:
            return None
        axes = sorted(found) + axes if not axes else _compose(sorted(found), axes)
        positions = unsqueeze.inputs[0]
    if positions.dtype not in (ir.DataType.INT64, ir.DataType.INT32) or positions.shape is None:
        return None
    inv_freq = inv_freq.reshape(-1)
    if positions.is_graph_input() and len(positions.shape) == 2 and axes == [2]:
        return _Angles(positions, None, inv_freq)
    rng = _producer(positions, "Range")
    if rng is not None and len(positions.shape) == 1 and axes == [0, 2] and _scalar(rng.inputs[2]) == 1:
        return _Angles(positions, rng.inputs[0], inv_freq)
    return None


def _range_length(positions: ir.Value):
    """The length of ``Range(0, limit, 1)`` when ``limit`` is ``Cast?(Gather(Shape(t), k))``
    (the TorchScript exporter's ``arange(seq_len)``, whose output ONNX shape inference leaves
    unnamed): ``t``'s dimension ``k``; else None."""
    rng = _producer(positions, "Range")
    if rng is None or _scalar(rng.inputs[0]) != 0:
        return None
    limit = rng.inputs[1]
    cast = _producer(limit, "Cast")
    gather = _producer(cast.inputs[0] if cast is not None else limit, "Gather")
    found = dims_read(gather) if gather is not None else None
    if found is None or found[1].ndim > 1 or len(found[0]) != 1:
        return None
    return found[0][0]


def _compose(inner: list[int], outer: list[int]) -> list[int]:
    """Axes of one Unsqueeze equal to ``Unsqueeze(Unsqueeze(x, inner), outer)`` (non-negative
    axes): the outer axes are positions in the final rank; the inner ones shift past them."""
    final = list(outer)
    for axis in inner:
        for taken in sorted(final):
            if taken <= axis:
                axis += 1
        final.append(axis)
    return sorted(final)


def match(node: ir.Node) -> _Site | None:
    """The rotary site behind one of onnxscript's intermediate RotaryEmbedding nodes, when its
    cos and sin come from the same broadcast angles and fit ``x``, else None."""
    if node.domain != FUSION_DOMAIN or node.op_type != "RotaryEmbedding" or len(node.inputs) != 3:
        return None
    if node.attributes.get_int("interleaved", 0) != 0:
        return None
    x = node.inputs[0]
    cos, sin = _unwrap_table(node.inputs[1], "Cos"), _unwrap_table(node.inputs[2], "Sin")
    if cos is None or sin is None or cos[0] is not sin[0] or cos[2] != sin[2] or cos[2] != x.dtype:
        return None
    if (cos[1] is None) != (sin[1] is None) or (cos[1] is not None and cos[1] != sin[1]):
        return None
    angles = _angles(cos[0])
    if angles is None or x.shape is None or len(x.shape) != 4 or x.shape[3] != 2 * angles.inv_freq.size:
        return None
    if not isinstance(x.shape[1], int):
        return None
    shape = angles.positions.shape
    if angles.start is None:  # one position per batch row and token: x's batch and sequence
        if not (_same_dim(shape[0], x.shape[0]) and _same_dim(shape[1], x.shape[2])):
            return None
    elif not (_same_dim(shape[0], x.shape[2]) or _same_dim(_range_length(angles.positions), x.shape[2])):
        return None  # start + s for every row: the Range spans the sequence
    return _Site(node, angles, cos[1], cos[2])


class RotaryCachePass(ir.passes.InPlacePass):
    """Rule: onnxscript's intermediate ``RotaryEmbedding(x, cos4, sin4)`` (domain
    ``ai.onnxruntime._fusion``, not interleaved, ``x`` 4-D ``[B, N, S, 2h]``) with

    * ``cos4 = Unsqueeze(c, [1])``, ``c = Cast?(Mul?(Cos(e), a))`` and ``sin4`` the same with
      ``Sin(e)``, the same constant scalar ``a`` and the same cast;
    * ``e = Concat(f, f, axis=-1)``, ``f = Cast(p, float32) · inv_freq`` (constant, ``h`` values);
    * ``p = Unsqueeze(position_ids, [2])`` for a graph input ``position_ids[B, S]`` whose
      dimensions are ``x``'s batch and sequence, or ``p = Unsqueeze(Range(start, limit, 1), [0, 2])``
      spanning ``x``'s sequence (``start + s`` for every batch row);

    is ``com.microsoft`` ``RotaryEmbedding(x, ids, cos_cache, sin_cache)`` with
    ``cos_cache[t, i] = cast(a·cos(t · inv_freq[i]))`` (``sin_cache`` likewise), ``ids`` the
    position ids (or ``[start]``, which ORT reads as ``start + s``). ORT's kernel computes
    ``x[i]·cos[i mod h] ∓ x[(i + h) mod 2h]·sin[i mod h]``, the same products the graph did.

    The cache rows: with ``max_positions`` the caches are initializers of that many rows
    (positions ``0 .. max_positions-1``, the model's range: ORT does not check a position
    against the cache), computed in float64 from the float32 angles and rounded; without it
    they are computed in the graph on each call for positions ``0 .. max(position_ids)`` by
    the ops the graph ran before (``Range``, ``Cast``, ``Mul``, ``Cos``/``Sin``), which is exact
    for every position. Sites sharing positions and frequencies share one pair of caches.
    ``count`` is the number of sites rewritten.
    """

    def __init__(self, max_positions: int | None = None) -> None:
        super().__init__()
        if max_positions is not None and max_positions < 1:
            raise ValueError(f"max_positions must be positive, got {max_positions}")
        self.max_positions = max_positions
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        shared: dict[tuple, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.count = 0
        for node in list(graph):
            site = match(node)
            if site is None:
                continue
            a = site.angles
            scale = None if site.scale is None else float(site.scale)
            key = (id(a.positions), a.inv_freq.tobytes(), scale, site.dtype)
            if key not in shared:
                shared[key] = (self._ids(graph, node, a), *self._caches(graph, node, site))
            ids, cos_cache, sin_cache = shared[key]
            fused = ir.node("RotaryEmbedding", [node.inputs[0], ids, cos_cache, sin_cache], domain="com.microsoft",
                            attributes={"interleaved": 0, "num_heads": int(node.inputs[0].shape[1])},
                            name=f"{node.name}_ort" if node.name else None)
            graph.insert_before(node, fused)
            out = node.outputs[0]
            fused.outputs[0].shape, fused.outputs[0].type = out.shape, out.type
            ir.convenience.replace_all_uses_with(out, fused.outputs[0])
            name, out.name = out.name, None
            fused.outputs[0].name = name
            graph.remove(node, safe=True)
            self.count += 1
        if self.count:
            if "com.microsoft" not in graph.opset_imports:
                graph.opset_imports["com.microsoft"] = 1
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, self.count > 0)

    @staticmethod
    def _ids(graph: ir.Graph, before: ir.Node, a: _Angles) -> ir.Value:
        """int64 position ids: the graph input, or ``[start]``."""
        nodes = []
        if a.start is None:
            ids = a.positions
        else:
            shape = _initializer(graph, "rotary_start_shape", np.array([1], dtype=np.int64))
            nodes.append(ir.node("Reshape", [a.start, shape], name="rotary_start_ids"))
            ids = nodes[-1].outputs[0]
        if ids.dtype != ir.DataType.INT64:
            nodes.append(ir.node("Cast", [ids], attributes={"to": ir.DataType.INT64}, name="rotary_ids_int64"))
            ids = nodes[-1].outputs[0]
        if nodes:
            graph.insert_before(before, nodes)
            ids.type = ir.TensorType(ir.DataType.INT64)
            ids.shape = ir.Shape([1]) if a.start is not None else a.positions.shape
        return ids

    def _caches(self, graph: ir.Graph, before: ir.Node, site: _Site) -> tuple[ir.Value, ir.Value]:
        a = site.angles
        if self.max_positions is not None:
            angles = np.arange(self.max_positions, dtype=np.float32)[:, None] * a.inv_freq[None, :]
            tables = []
            for trig in (np.cos, np.sin):
                table = trig(angles.astype(np.float64)).astype(np.float32)
                if site.scale is not None:
                    table = table * site.scale
                tables.append(_initializer(graph, f"rotary_{trig.__name__}_cache", table.astype(site.dtype.numpy())))
            return tables[0], tables[1]
        # positions 0 .. max(position ids): one past the largest id (or the Range's limit)
        one = _initializer(graph, "rotary_one", np.array(1, dtype=np.int64))
        zero = _initializer(graph, "rotary_zero", np.array(0, dtype=np.int64))
        freq = _initializer(graph, "rotary_inv_freq", a.inv_freq.reshape(1, -1))
        nodes: list[ir.Node] = []

        def add(op: str, inputs: list, **attributes) -> ir.Value:
            name = f"rotary_cache_{op.lower()}_{len(nodes)}"
            nodes.append(ir.node(op, inputs, attributes=attributes, name=name))
            nodes[-1].outputs[0].name = name
            return nodes[-1].outputs[0]

        positions = a.positions if a.positions.dtype == ir.DataType.INT64 else add("Cast", [a.positions], to=ir.DataType.INT64)
        top = add("Add", [add("ReduceMax", [positions], keepdims=0), one])
        rows = add("Unsqueeze", [add("Cast", [add("Range", [zero, top, one])], to=ir.DataType.FLOAT),
                                 _initializer(graph, "rotary_axis", np.array([1], dtype=np.int64))])
        angles = add("Mul", [rows, freq])
        tables = []
        for trig in ("Cos", "Sin"):
            table = add(trig, [angles])
            if site.scale is not None:
                table = add("Mul", [table, _initializer(graph, "rotary_scale", np.asarray(site.scale, dtype=np.float32))])
            if site.dtype != ir.DataType.FLOAT:
                table = add("Cast", [table], to=site.dtype)
            tables.append(table)
        graph.insert_before(before, nodes)
        return tables[0], tables[1]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, n = name, 0
    while name in graph.initializers:
        n += 1
        name = f"{base}_{n}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.array(array, order="C"), name=name))
    graph.register_initializer(value)
    return value
