"""The channel graph: which tensor axes must keep one width together.

A *channel space* is the last axis of a floating-point activation, or one axis of a weight
(an initializer, seen through Transpose/Cast/Identity). Op rules couple spaces that index the
same features; the connected components of the resulting ``networkx.Graph`` are the width
groups. An op that no rule knows *stops* every space it touches: those groups are frozen,
never guessed at.

Node keys:  ``("act", value_name)`` and ``("param", initializer_name, axis)``.
Node data:  ``width``; ``roles`` (params: how the axis is used); ``marks`` (facts the
classifier reads: ``norm``, ``reduce``, ``embedding``, ``heads``); ``stops`` (reasons the
space cannot change); ``reshapes`` (Reshape nodes whose shape constant names the width);
``order`` (position of the producing node, for layer numbering).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import networkx as nx
import numpy as np
import onnx_ir as ir

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})

# Roles of a weight axis.
PRODUCER = "producer"  # output axis of a linear map (or embedding row width): written features
CONSUMER = "consumer"  # input axis of a linear map: read features
VECTOR = "vector"  # per-channel constant in an element-wise op (bias, scale)
NORM_WEIGHT = "norm_weight"  # gain/bias of a normalisation op
VOCAB = "vocab"  # row axis of an embedding table

UNARY_OPS = frozenset(
    {
        "Abs", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor",
        "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Mish", "Neg",
        "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Softplus",
        "Softsign", "Sqrt", "Swish", "Tanh", "ThresholdedRelu",
        # com.microsoft element-wise activations (bias input, when present, is per-channel)
        "BiasGelu", "FastGelu", "QuickGelu",
    }
)  # fmt: skip
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "PRelu", "Sum", "Mean", "Where"})
NORM_OPS = frozenset(
    {
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "RMSNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    }
)
REDUCE_OPS = frozenset(
    {"ReduceMean", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceLogSumExp"}
)
SHAPE_READERS = frozenset({"Shape", "Size"})
ATTENTION_OPS = frozenset(
    {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "RotaryEmbedding", "SparseAttention"}
)
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


def act_key(value: ir.Value) -> tuple:
    return ("act", value.name)


def param_key(name: str, axis: int) -> tuple:
    return ("param", name, axis)


@dataclasses.dataclass(frozen=True)
class ParamView:
    """A weight as a node sees it: axis ``i`` of the used value is axis ``perm[i]`` of the
    initializer ``name``; ``shape`` is the shape as used."""

    name: str
    perm: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


def resolve_param(value: ir.Value | None) -> ParamView | None:
    """The initializer behind ``value`` through Identity/Cast/Transpose, else None."""
    if value is None:
        return None
    if value.const_value is not None and (value.is_initializer() or value.producer() is None):
        shape = tuple(int(d) for d in value.const_value.shape)
        return ParamView(value.name, tuple(range(len(shape))), shape)
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("Identity", "Cast"):
        return resolve_param(node.inputs[0])
    if node.op_type == "Transpose":
        src = resolve_param(node.inputs[0])
        if src is None:
            return None
        perm = node.attributes.get_ints("perm", None) or tuple(reversed(range(src.rank)))
        return ParamView(src.name, tuple(src.perm[p] for p in perm), tuple(src.shape[p] for p in perm))
    return None


def last_dim(value: ir.Value) -> int | None:
    """Static size of the last axis, or None when unknown or rank 0."""
    if value.shape is None or len(value.shape) == 0:
        return None
    dim = value.shape[-1]
    return dim if isinstance(dim, int) else None


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def constant_ints(value: ir.Value | None) -> list[int] | None:
    """Values of a constant integer tensor, else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None:
        return None
    return [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


class _Builder:
    """Walks the main graph once, applying one rule per node."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.g = nx.Graph()
        self.order = {id(node): i for i, node in enumerate(graph)}

    # -- channel nodes -------------------------------------------------------------------
    def act(self, value: ir.Value | None) -> tuple | None:
        """Key of the value's channel space; None for non-float values and width-1 axes."""
        if not is_float(value) or value.shape is None or len(value.shape) == 0:
            return None
        if resolve_param(value) is not None:
            return None  # a weight (or a view of one), described by param keys
        width = last_dim(value)
        if width == 1:
            return None
        key = act_key(value)
        if key not in self.g:
            producer = value.producer()
            self.g.add_node(
                key,
                width=width,
                roles=set(),
                marks=set(),
                stops=[],
                reshapes=set(),
                order=self.order.get(id(producer), -1) if producer is not None else -1,
            )
            if width is None:
                self.g.nodes[key]["stops"].append(f"unknown width of {value.name}")
            if value.is_graph_input():
                self.g.nodes[key]["stops"].append(f"graph input {value.name}")
                self.g.nodes[key]["marks"].add("input")
            if value.is_graph_output():
                self.g.nodes[key]["stops"].append(f"graph output {value.name}")
                self.g.nodes[key]["marks"].add("output")
            for use in value.uses():
                if use.node.graph is not self.graph:
                    self.g.nodes[key]["stops"].append(f"used inside a subgraph ({use.node.op_type})")
        return key

    def param(self, view: ParamView, axis: int, role: str) -> tuple:
        """Key of axis ``axis`` (as used) of a weight, recording how it is used."""
        root_axis = view.perm[axis]
        key = param_key(view.name, root_axis)
        if key not in self.g:
            self.g.add_node(
                key, width=view.shape[axis], roles=set(), marks=set(), stops=[], reshapes=set(), order=-1
            )
        self.g.nodes[key]["roles"].add(role)
        return key

    def couple(self, *keys: tuple | None) -> None:
        present = [k for k in keys if k is not None]
        self.g.add_nodes_from(present)
        for a, b in zip(present, present[1:], strict=False):
            self.g.add_edge(a, b)

    def mark(self, key: tuple | None, mark: str) -> None:
        if key is not None:
            self.g.nodes[key]["marks"].add(mark)

    def stop(self, node: ir.Node, reason: str, mark: str | None = None) -> None:
        """Freeze every channel space ``node`` touches."""
        for value in (*node.inputs, *node.outputs):
            view = resolve_param(value)
            if view is not None:
                for axis in range(view.rank):
                    if view.shape[axis] > 1:
                        key = self.param(view, axis, "other")
                        self.g.nodes[key]["stops"].append(reason)
                continue
            key = self.act(value)
            if key is not None:
                self.g.nodes[key]["stops"].append(reason)
                if mark:
                    self.mark(key, mark)

    # -- rules -----------------------------------------------------------------------------
    def visit(self, node: ir.Node) -> None:
        op = node.op_type
        if node.outputs and all(resolve_param(out) is not None for out in node.outputs):
            return  # a view of a weight (Identity/Cast/Transpose): resolved where it is used
        if node.domain not in KNOWN_DOMAINS:
            self.stop(node, f"unsupported op {node.domain}::{op} ({node.name})")
        elif op in SHAPE_READERS:
            return
        elif op in ("MatMul", "FusedMatMul", "Gemm"):
            self.linear(node)
        elif op in UNARY_OPS or op in BINARY_OPS or op == "Dropout":
            self.elementwise(node)
        elif op in NORM_OPS:
            self.norm(node)
        elif op in REDUCE_OPS:
            self.reduce(node)
        elif op == "Gather":
            self.gather(node)
        elif op == "Reshape":
            self.reshape(node)
        elif op == "Transpose":
            self.transpose(node)
        elif op in ("Squeeze", "Unsqueeze", "Expand"):
            self.keeps_last_axis(node)
        elif op in ("Concat", "Split", "Softmax", "LogSoftmax"):
            self.along_axis(node)
        elif op == "Slice":
            self.slice(node)
        elif op in ATTENTION_OPS:
            self.attention(node)
        elif op in CONTROL_FLOW_OPS:
            self.stop(node, f"control flow {op} ({node.name})")
        else:
            # Only complain where a channel space is touched; shape arithmetic is ignored.
            self.stop(node, f"unsupported op {op} ({node.name})")

    def attention(self, node: ir.Node) -> None:
        """A fused attention op freezes what it touches. Its spaces are heads, except the
        stream that Attention/PackedAttention read through their packed QKV weight (input 0
        and the weight's input axis): that one belongs to the residual stream."""
        self.stop(node, f"attention op {node.op_type}")
        reads_stream = node.op_type in ("Attention", "PackedAttention")
        weight = resolve_param(node.inputs[1]) if reads_stream and len(node.inputs) > 1 else None
        if weight is not None and weight.rank == 2:
            self.couple(self.act(node.inputs[0]), self.param(weight, 0, CONSUMER))
        for i, value in enumerate((*node.inputs, *node.outputs)):
            if value is None or (reads_stream and i == 0):
                continue
            view = resolve_param(value)
            if view is None:
                self.mark(self.act(value), "heads")
                continue
            for axis in range(view.rank):
                if view.shape[axis] > 1 and not (reads_stream and i == 1 and axis == 0):
                    self.mark(self.param(view, axis, "other"), "heads")

    def linear(self, node: ir.Node) -> None:
        """y = a·B (+C): a's last axis reads B's input axis, y's last axis is B's output axis."""
        a, b = node.inputs[0], node.inputs[1]
        trans_a = node.attributes.get_int("transA", 0)
        trans_b = node.attributes.get_int("transB", 0)
        view = resolve_param(b)
        if resolve_param(a) is not None or view is None or view.rank != 2 or trans_a:
            reason = "MatMul of two activations" if view is None else f"{node.op_type} form not supported"
            self.stop(node, f"{reason} ({node.name})", mark="heads" if view is None else None)
            return
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        y = node.outputs[0]
        self.couple(self.act(a), self.param(view, in_axis, CONSUMER))
        self.couple(self.act(y), self.param(view, out_axis, PRODUCER))
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            self.vector_input(node, node.inputs[2], self.act(y), last_dim(y))

    def vector_input(self, node: ir.Node, value: ir.Value, out_key: tuple | None, width: int | None) -> None:
        """A per-channel constant broadcast against the output's last axis."""
        view = resolve_param(value)
        if view is None or view.rank == 0 or view.shape[-1] == 1:
            return
        if out_key is not None and view.shape[-1] == width:
            self.couple(out_key, self.param(view, view.rank - 1, VECTOR))
        else:
            self.stop(node, f"constant of unexpected shape {view.shape} ({node.name})")

    def elementwise(self, node: ir.Node) -> None:
        """Equal last axes of inputs and output are one space; size-1 axes broadcast."""
        out = node.outputs[0]
        out_key = self.act(out)
        width = last_dim(out)
        if not is_float(out):
            self.stop(node, f"{node.op_type} to non-float ({node.name})")
            return
        keys = [out_key]
        for value in node.inputs:
            if value is None:
                continue
            if resolve_param(value) is not None:
                self.vector_input(node, value, out_key, width)
                continue
            if not is_float(value):
                continue
            key = self.act(value)
            if key is None:
                continue  # broadcast of a width-1 axis
            if out_key is None or self.g.nodes[key]["width"] != width:
                self.stop(node, f"broadcast across channels ({node.name})")
                return
            keys.append(key)
        self.couple(*keys)

    def norm(self, node: ir.Node) -> None:
        """Normalisations couple input, skip and outputs on the last axis (a norm junction)."""
        if node.attributes.get_int("axis", -1) not in (-1, len(node.inputs[0].shape or ()) - 1):
            self.stop(node, f"normalisation over a non-last axis ({node.name})")
            return
        skip = node.op_type.startswith("Skip")
        acts = [node.inputs[0], *(node.inputs[1:2] if skip else ()), node.outputs[0]]
        if skip and len(node.outputs) > 3 and node.outputs[3] is not None:
            acts.append(node.outputs[3])
        keys = [self.act(v) for v in acts]
        for key in keys:
            self.mark(key, "norm")
        self.couple(*keys)
        for value in node.inputs[(2 if skip else 1) :]:
            view = resolve_param(value)
            if view is not None and view.rank >= 1 and view.shape[-1] > 1:
                self.couple(keys[-1], self.param(view, view.rank - 1, NORM_WEIGHT))

    def reduce(self, node: ir.Node) -> None:
        """A reduction over the last axis reads the whole space (a norm statistic)."""
        x = node.inputs[0]
        key = self.act(x)
        if key is None:
            return
        rank = len(x.shape)
        axes = node.attributes.get_ints("axes", None)
        if axes is None and len(node.inputs) > 1:
            axes = constant_ints(node.inputs[1])
            if axes is None and node.inputs[1] is not None:
                self.stop(node, f"{node.op_type} with computed axes ({node.name})")
                return
        axes = [a % rank for a in axes] if axes else list(range(rank))
        if rank - 1 in axes:
            self.mark(key, "reduce")
            return
        self.couple(key, self.act(node.outputs[0]))

    def gather(self, node: ir.Node) -> None:
        """Embedding lookups write the table's column axis; other gathers keep the last axis."""
        data, out = node.inputs[0], node.outputs[0]
        axis = node.attributes.get_int("axis", 0)
        view = resolve_param(data)
        if view is not None:
            if view.rank == 2 and axis == 0:
                key = self.param(view, 1, PRODUCER)
                self.mark(key, "embedding")
                self.couple(self.act(out), key)
                self.param(view, 0, VOCAB)
            else:
                self.stop(node, f"Gather from a constant ({node.name})")
            return
        key = self.act(data)
        if key is None:
            return
        if axis % len(data.shape) == len(data.shape) - 1:
            self.stop(node, f"index-select on the channel axis ({node.name})")
        else:
            self.couple(key, self.act(out))

    def reshape(self, node: ir.Node) -> None:
        """A Reshape keeps a space when the last axis is unchanged and its size in the target
        shape is a constant (rewritten with the group) or -1."""
        x, out = node.inputs[0], node.outputs[0]
        key = self.act(x)
        if key is None:
            return
        width = last_dim(x)
        if last_dim(out) != width or width is None:
            self.stop(node, f"Reshape splits or merges the channel axis ({node.name})", mark="heads")
            return
        out_key = self.act(out)
        source = width_source(node)
        if source is x:
            self.couple(key, out_key)  # the target takes the width from x at run time
            return
        if source is not None and last_dim(source) == width and self.act(source) is not None:
            self.couple(key, out_key, self.act(source))  # ... or from a value of the same width
            return
        target = reshape_width_constant(node)
        if target is None:
            self.stop(node, f"Reshape with a computed target shape ({node.name})")
            return
        self.couple(key, out_key)
        if target[1] == width:
            self.g.nodes[out_key]["reshapes"].add(node.name)

    def transpose(self, node: ir.Node) -> None:
        x = node.inputs[0]
        key = self.act(x)
        if key is None:
            return
        perm = node.attributes.get_ints("perm", None)
        rank = len(x.shape)
        if perm is not None and perm[-1] == rank - 1:
            self.couple(key, self.act(node.outputs[0]))
        else:
            self.stop(node, f"Transpose moves the channel axis ({node.name})", mark="heads")

    def keeps_last_axis(self, node: ir.Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        key = self.act(x)
        if key is None:
            return
        if last_dim(out) == last_dim(x) and self.act(out) is not None:
            self.couple(key, self.act(out))
        else:
            self.stop(node, f"{node.op_type} changes the channel axis ({node.name})")

    def along_axis(self, node: ir.Node) -> None:
        """Concat/Split/Softmax along the channel axis stop; along another axis they keep it."""
        x = node.inputs[0]
        if self.act(x) is None and all(self.act(v) is None for v in node.outputs):
            return
        rank = len(x.shape) if x.shape is not None else 0
        axis = node.attributes.get_int("axis", -1 if node.op_type.endswith("Softmax") else 0)
        if rank == 0 or axis % rank == rank - 1:
            self.stop(node, f"{node.op_type} along the channel axis ({node.name})", mark="heads")
            return
        self.couple(*(self.act(v) for v in node.inputs if is_float(v)), *(self.act(v) for v in node.outputs))

    def slice(self, node: ir.Node) -> None:
        x = node.inputs[0]
        key = self.act(x)
        if key is None:
            return
        rank = len(x.shape)
        starts = constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = constant_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if axes is None and starts is not None:
            axes = list(range(len(starts)))
        if axes is None or rank - 1 in [a % rank for a in axes]:
            self.stop(node, f"Slice of the channel axis ({node.name})", mark="heads")
        else:
            self.couple(key, self.act(node.outputs[0]))


def reshape_width_constant(node: ir.Node) -> tuple[ir.Value, int] | None:
    """Where a Reshape's target names its last size: ``(constant value, size)``, or None when
    the last size is computed. The constant is the shape input itself, or the last input of a
    Concat that builds the shape."""
    shape = node.inputs[1]
    values = constant_ints(shape)
    if values:
        return shape, values[-1]
    producer = shape.producer() if shape is not None else None
    if producer is not None and producer.op_type == "Concat" and producer.inputs:
        tail = constant_ints(producer.inputs[-1])
        if tail:
            return producer.inputs[-1], tail[-1]
    return None


def reads_own_width(node: ir.Node) -> bool:
    """Whether a Reshape's last target size is read at run time from the last axis of its own
    input: ``Shape(x)`` sliced or gathered at the last index, through Squeeze/Unsqueeze/Cast
    and the last input of a Concat (legacy exports of ``x.view(-1, x.size(-1))``)."""
    return width_source(node) is node.inputs[0]


def width_source(node: ir.Node) -> ir.Value | None:
    """The value whose last axis gives a Reshape's last target size at run time, or None.

    Rule: the target (or the last input of the Concat that builds it, through
    Squeeze/Unsqueeze/Cast/Identity) is ``Shape(y)`` sliced from, or gathered at, the last
    index of ``y``. The TorchScript and Optimum exporters write ``x.view(y.size())`` and
    ``x.view(-1, y.size(-1))`` this way, ``y`` often another value of the same stream
    (GPT-2's ``output_shape``, OPT's ``hidden_states_shape``); nothing then needs rewriting
    when the stream narrows, since the size follows ``y``."""
    value = node.inputs[1]
    for _ in range(8):
        producer = value.producer() if value is not None else None
        if producer is None:
            return None
        op = producer.op_type
        if op == "Concat":
            value = producer.inputs[-1]
        elif op in ("Squeeze", "Unsqueeze", "Cast", "Identity"):
            value = producer.inputs[0]
        elif op == "Shape":
            source = producer.inputs[0]
            end = producer.attributes.get_int("end", None)
            return source if end is None and source is not None else None
        elif op in ("Slice", "Gather") and producer.inputs[0] is not None:
            shape_node = producer.inputs[0].producer()
            if shape_node is None or shape_node.op_type != "Shape" or len(shape_node.attributes):
                return None
            source = shape_node.inputs[0]
            rank = len(source.shape) if source.shape is not None else None
            index = constant_ints(producer.inputs[1])
            if not index or rank is None:
                return None
            end = constant_ints(producer.inputs[2]) if op == "Slice" and len(producer.inputs) > 2 else None
            last = index[-1] % rank == rank - 1
            return source if last and (op == "Gather" or end is None or end[-1] >= rank) else None
        else:
            return None
    return None


def build_channel_graph(graph: ir.Graph) -> nx.Graph:
    """The channel graph of ``graph``'s main body (subgraph uses freeze what they touch)."""
    builder = _Builder(graph)
    for node in graph:
        builder.visit(node)
    for value in graph.outputs:
        builder.act(value)
    return builder.g


def stops_of(g: nx.Graph, nodes: Iterable[tuple]) -> list[str]:
    """Distinct stop reasons of ``nodes`` in first-seen order."""
    seen: dict[str, None] = {}
    for key in nodes:
        for reason in g.nodes[key]["stops"]:
            seen.setdefault(reason, None)
    return list(seen)


def widths_of(g: nx.Graph, nodes: Sequence[tuple]) -> set[int]:
    return {g.nodes[k]["width"] for k in nodes if g.nodes[k]["width"] is not None}
