"""Attention blocks: which weights, shape constants and cache tensors carry the head count.

Recognition is structural. An attention *core* is ``MatMul(P, V)`` whose ``P`` comes from a
``Softmax`` over ``MatMul(Q, Kᵀ)`` (through Cast/Add/Mul/Div/Where). From the core, Q, K and V
are traced back through the ops that keep a head axis (Transpose, element-wise ops, the RoPE
Slice/Neg/Concat, the KV-cache Concat, the repeat-KV Unsqueeze→Expand→Reshape) to the Reshape
that splits ``[.., H·hd]`` into ``[.., H, hd]``, and on to the projection (MatMul/Gemm with a
constant weight, optional bias ``Add``, optional Split of a packed QKV output). The output is
traced forward (Transpose → Reshape ``[.., H·hd]``) to the output projection.

Every shape constant met on the way that names a head count (or a width ``H·hd``) is recorded
as a ``ShapeEdit``; every graph input/output met (KV cache) as a ``CacheTensor``. A pattern
that does not fit these rules leaves its layer unchanged with a reason: nothing is guessed.
Head ``h`` owns features ``h·hd .. (h+1)·hd`` of every projection; under grouped-query
attention (``repeat_interleave`` of KV heads) query head ``h`` reads KV head ``h // n_rep``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir

from graphresize.analysis.attention.rotary import RotaryError, is_rotary, rotary_through
from graphresize.analysis.channels import (
    constant_ints,
    reads_own_width,
    resolve_param,
)

Q, KV, REP = "q", "kv", "rep"  # counts: query heads, key/value heads, query heads per KV head

_UNARY = frozenset({"Cast", "Identity", "Neg", "Dropout", "CastLike"})
_BINARY = frozenset({"Mul", "Add", "Sub", "Div"})


@dataclasses.dataclass(frozen=True)
class Projection:
    """One of q/k/v: features ``offset .. offset + heads·hd`` of axis ``axis`` of ``weight``
    (the axis the projection writes), with its bias (same offset on the bias's last axis)."""

    role: str  # "q" | "k" | "v"
    unit: str  # Q | KV: whose head count this projection has
    weight: str
    axis: int
    offset: int
    bias: str | None = None
    bias_offset: int = 0
    stride: int = 0  # per-head interleaved packing: head h owns offset + h·stride .. + hd (0: h·hd)


@dataclasses.dataclass(frozen=True)
class ShapeEdit:
    """Entry ``position`` of the shape tensor read by input ``input`` of node ``node`` is a
    constant equal to ``Σ factor·count(unit)`` over ``terms``; the rewrite recomputes it."""

    node: str
    input: int
    position: int
    terms: tuple[tuple[str, int], ...]

    def value(self, counts: dict[str, int]) -> int:
        return sum(factor * counts[unit] for unit, factor in self.terms)


@dataclasses.dataclass(frozen=True)
class AttrEdit:
    """Attribute ``attribute`` of node ``node`` (a fused attention op) names head counts: an
    int equal to ``Σ factor·count(unit)`` over ``entries[0]``, or (``is_list``) a list of ints,
    one sum per entry (``qkv_hidden_sizes``)."""

    node: str
    attribute: str
    entries: tuple[tuple[tuple[str, int], ...], ...]
    is_list: bool = False

    def value(self, counts: dict[str, int]) -> int | list[int]:
        sums = [sum(f * counts[unit] for unit, f in terms) for terms in self.entries]
        return sums if self.is_list else sums[0]


@dataclasses.dataclass(frozen=True)
class CacheTensor:
    """A graph input or output (KV cache) whose axis ``axis`` counts heads of ``unit``."""

    name: str
    axis: int
    unit: str
    is_input: bool


@dataclasses.dataclass(frozen=True)
class AttentionBlock:
    """One attention layer. ``reason`` is set (and the rest may be empty) when the layer's
    pattern was not recognised; such a layer is left unchanged."""

    layer: int
    scope: str
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    projections: tuple[Projection, ...] = ()
    output_weight: str = ""
    output_axis: int = 0  # the axis of output_weight that reads the H·hd features
    anchor: str = ""  # input of the output projection: [.., H·hd], scored by calibration
    shape_edits: tuple[ShapeEdit, ...] = ()
    cache: tuple[CacheTensor, ...] = ()
    values: tuple[str, ...] = ()  # activations whose static shapes name a head count
    reason: str | None = None
    group_edits: tuple[ShapeEdit, ...] = ()  # repeat-count constants, rewritten when it changes
    group_fixed: str | None = None  # why the query heads per KV head cannot change
    attr_edits: tuple[AttrEdit, ...] = ()  # num_heads / kv_num_heads / qkv_hidden_sizes of a fused op
    op: str = ""  # the fused attention op (domain::type), empty for decomposed attention

    @property
    def recognised(self) -> bool:
        return self.reason is None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    def counts(self) -> dict[str, int]:
        return {Q: self.num_heads, KV: self.num_kv_heads, REP: self.group_size}


class NotRecognised(Exception):
    """The layer does not fit the attention rules (the message says where)."""


# ---------------------------------------------------------------------------- core finding


def _activation(value: ir.Value | None) -> bool:
    return value is not None and resolve_param(value) is None and value.const_value is None


def _walk_back(value: ir.Value, ops: frozenset[str], target, depth: int = 8) -> ir.Node | None:
    """The first node satisfying ``target`` behind ``value`` through ``ops`` (activation
    inputs only), or None."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            node = v.producer() if v is not None else None
            if node is None:
                continue
            if target(node):
                return node
            if node.op_type in ops:
                nxt.extend(i for i in node.inputs if _activation(i))
        frontier = nxt
    return None


_PROB_OPS = frozenset({"Cast", "Identity", "Dropout"})
_SCORE_OPS = frozenset({"Cast", "Identity", "Add", "Mul", "Div", "Sub", "Where"})


def _softmax_of(pv: ir.Node) -> ir.Node | None:
    return _walk_back(pv.inputs[0], _PROB_OPS, lambda n: n.op_type == "Softmax")


def _qk_of(softmax: ir.Node) -> ir.Node | None:
    return _walk_back(
        softmax.inputs[0], _SCORE_OPS,
        lambda n: n.op_type == "MatMul" and all(_activation(i) for i in n.inputs),
    )


def is_core(node: ir.Node) -> bool:
    """``MatMul(P, V)`` with P from a Softmax over ``MatMul(Q, Kᵀ)``."""
    if len(node.inputs) != 2 or not all(_activation(i) for i in node.inputs):
        return False
    softmax = _softmax_of(node)
    return softmax is not None and _qk_of(softmax) is not None


def node_scope(node: ir.Node) -> str:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    parts = [p.strip(" '\"") for p in (scopes or "").strip("[]").split(",")]
    return parts[-2] if len(parts) > 1 else (node.name or "")


def value_rank(value: ir.Value) -> int:
    if value.shape is None:
        raise NotRecognised(f"unknown rank of {value.name}")
    return len(value.shape)


def static_dim(value: ir.Value, axis: int) -> int | None:
    dim = value.shape[axis] if value.shape is not None and -len(value.shape) <= axis < len(value.shape) else None
    return dim if isinstance(dim, int) else None


# ---------------------------------------------------------------------------- shape vectors


def shape_vector(value: ir.Value | None) -> list[int | None] | None:
    """Per entry of a 1-D shape tensor: its constant value, or None where computed at run
    time. None when the length cannot be known. Follows a constant, or a ``Concat`` of
    pieces read directly by the consumer (the only forms the rewrite edits)."""
    if value is None:
        return None
    values = constant_ints(value)
    if values is not None:
        return list(values)
    node = value.producer()
    if node is None or node.op_type != "Concat":
        return None
    entries: list[int | None] = []
    for piece in node.inputs:
        consts = constant_ints(piece)
        if consts is not None:
            entries.extend(consts)
            continue
        size = static_dim(piece, 0) if piece is not None and piece.shape is not None and len(piece.shape) == 1 else None
        if size is None:
            return None
        entries.extend([None] * size)
    return entries


def _dynamic_vector(value: ir.Value) -> list[int | None] | None:
    """Like ``shape_vector`` but also through the legacy exporter's ``-1``-resolving chain
    (``Reshape(x, [-1])``, ``Where(Equal(x, ·), ·, x)``, Cast), for reading only."""
    for _ in range(6):
        found = shape_vector(value)
        if found is not None:
            return found
        node = value.producer()
        if node is None:
            return None
        if node.op_type in ("Cast", "Identity") or (node.op_type == "Reshape" and constant_ints(node.inputs[1]) == [-1]):
            value = node.inputs[0]
        elif node.op_type == "Where" and len(node.inputs) == 3:
            value = node.inputs[2]
        else:
            return None
    return None


# ---------------------------------------------------------------------------- tracing


class Tracer:
    """Traces one attention core; collects projections, edits, cache tensors, values."""

    def __init__(self, pv: ir.Node | None) -> None:
        self.pv = pv  # None for a fused attention op (heads_fused)
        self.softmax = _softmax_of(pv) if pv is not None else None
        self.qk = _qk_of(self.softmax) if pv is not None else None
        self.edits: dict[tuple[str, int, int], dict[str, tuple[tuple[str, int], ...]]] = {}
        self.cache: dict[str, CacheTensor] = {}
        self.values: set[str] = set()
        self.repeats: set[str] = set()  # roles whose path went through a repeat-KV
        self.group_edits: dict[tuple[str, int, int], ShapeEdit] = {}
        self.group_fixed: list[str] = []
        self.attr_edits: list[AttrEdit] = []  # num_heads of fused ops (attention, RotaryEmbedding)
        self.head_dim: int | None = None
        self.widths: dict[str, int] = {}  # role -> H·hd of that projection
        self.role = ""
        self._seen: dict[tuple, frozenset] = {}
        # role -> (start, size, width) of the Split of the head-dimension axis on the role's
        # path: GPT-NeoX's per-head [q | k | v] of width 3·hd, cut into its parts
        self.segments: dict[str, tuple[int, int, int]] = {}

    # -- edits -------------------------------------------------------------------------
    def _edit(self, node: ir.Node, index: int, position: int, terms: tuple[tuple[str, int], ...], vector=None) -> None:
        """Record that entry ``position`` of ``node.inputs[index]`` names ``terms`` when it is
        a constant; computed entries need nothing; -1 (inferred) needs nothing."""
        vector = shape_vector(node.inputs[index]) if vector is None else vector
        if vector is None:
            raise NotRecognised(f"{node.op_type} {node.name}: shape tensor is neither constant nor a Concat")
        if position < 0:
            position += len(vector)
        entry = vector[position] if 0 <= position < len(vector) else None
        if entry is None or entry == -1 or (entry == 0 and node.op_type == "Reshape" and not node.attributes.get_int("allowzero", 0)):
            return
        self.edits.setdefault((node.name, index, position), {})[self.role] = terms

    # -- head layout, backwards ------------------------------------------------------------
    def heads_back(self, value: ir.Value, ax: int, hd: int, unit: str) -> frozenset:
        """Projections behind ``value`` whose axis ``ax`` counts heads of ``unit`` and axis
        ``hd`` is the head dimension."""
        key = (value.name, ax, hd, unit, self.segments.get(self.role))
        if key not in self._seen:
            self._seen[key] = frozenset(self._heads_back(value, ax, hd, unit))
        return self._seen[key]

    def _heads_back(self, value: ir.Value, ax: int, hd: int, unit: str) -> Iterable[Projection]:
        rank = value_rank(value)
        ax, hd = ax % rank, hd % rank
        self.values.add(value.name)
        if value.is_graph_output():
            self.cache[value.name] = CacheTensor(value.name, ax, unit, is_input=False)
        if value.is_graph_input():
            self.cache[value.name] = CacheTensor(value.name, ax, unit, is_input=True)
            return ()
        node = value.producer()
        if node is None:
            raise NotRecognised(f"{value.name}: a constant in the head layout")
        if is_rotary(node):
            return self.heads_back(self._rotary(node, rank, (ax, hd), unit), ax, hd, unit)
        if node.domain not in ("", "ai.onnx"):
            raise NotRecognised(f"{node.domain}::{node.op_type} {node.name} on a head path")
        op = node.op_type
        if op in _UNARY:
            return self.heads_back(node.inputs[0], ax, hd, unit)
        if op == "Transpose":
            perm = node.attributes.get_ints("perm", None) or tuple(reversed(range(rank)))
            return self.heads_back(node.inputs[0], perm[ax], perm[hd], unit)
        if op in _BINARY:
            return self._binary(node, rank, ax, hd, unit)
        if op == "Slice":
            axes = self._slice_axes(node, rank)
            if ax in axes:
                raise NotRecognised(f"Slice {node.name} cuts the head axis")
            return self.heads_back(node.inputs[0], ax, hd, unit)
        if op == "Split":
            return self._segment_split(node, value, rank, ax, hd, unit)
        if op == "Concat":
            if node.attributes.get_int("axis", 0) % rank == ax:
                raise NotRecognised(f"Concat {node.name} along the head axis")
            found: set = set()
            for inp in node.inputs:
                found |= self.heads_back(inp, ax, hd, unit)
            return found
        if op == "Reshape":
            return self._reshape(node, value, rank, ax, hd, unit)
        raise NotRecognised(f"{op} {node.name} on a head path")

    def _binary(self, node: ir.Node, rank: int, ax: int, hd: int, unit: str) -> set:
        found: set = set()
        carried = False
        for inp in node.inputs:
            if inp is None:
                continue
            shape = inp.shape
            if shape is None:
                raise NotRecognised(f"{node.op_type} {node.name}: unknown rank of {inp.name}")
            size = shape[ax - rank] if len(shape) >= rank - ax else 1  # a missing axis broadcasts
            if not _activation(inp):
                if size != 1:
                    raise NotRecognised(f"{node.op_type} {node.name}: a per-head constant")
                continue
            if size == 1:
                continue  # broadcast along heads (RoPE cos/sin, masks)
            found |= self.heads_back(inp, ax - rank + len(shape), hd - rank + len(shape), unit)
            carried = True
        if not carried:
            raise NotRecognised(f"{node.op_type} {node.name}: no input carries the heads")
        return found

    @staticmethod
    def _slice_axes(node: ir.Node, rank: int) -> set[int]:
        starts = constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = constant_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if axes is None:
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                raise NotRecognised(f"Slice {node.name} with computed axes")
            n = len(starts) if starts is not None else static_dim(node.inputs[1], 0)
            if n is None:
                raise NotRecognised(f"Slice {node.name} with computed starts")
            axes = list(range(n))
        return {a % rank for a in axes}

    def _reshape(self, node: ir.Node, value: ir.Value, rank: int, ax: int, hd: int, unit: str) -> set:
        x = node.inputs[0]
        in_rank = value_rank(x)
        if in_rank == rank - 1 and ax == rank - 2 and hd == rank - 1:
            return {self._split(node, value, unit)}
        if in_rank == rank + 1 and hd == rank - 1:
            return self._repeat(node, x, ax, hd, unit)
        raise NotRecognised(f"Reshape {node.name}: neither a head split nor a repeat of KV heads")

    def _segment_split(self, node: ir.Node, value: ir.Value, rank: int, ax: int, hd: int, unit: str) -> set:
        """A Split of the head-dimension axis (static output sizes): part ``i`` of a per-head
        block of ``width`` features; the head split behind it then yields heads of ``width``
        of which this role owns ``start .. start + size`` (recorded in ``segments``)."""
        if node.attributes.get_int("axis", 0) % rank != hd:
            raise NotRecognised(f"Split {node.name} on a head path (not a cut of the head dimension)")
        sizes = [static_dim(out, hd) for out in node.outputs]
        width = static_dim(node.inputs[0], hd)
        if None in sizes or width is None or sum(sizes) != width:
            raise NotRecognised(f"Split {node.name}: unknown part sizes of the head dimension")
        index = list(node.outputs).index(value)
        segment = (sum(sizes[:index]), sizes[index], width)
        if self.segments.setdefault(self.role, segment) != segment:
            raise NotRecognised(f"Split {node.name}: {self.role} cut twice from the head dimension")
        return self.heads_back(node.inputs[0], ax, hd, unit)

    def _split(self, node: ir.Node, value: ir.Value, unit: str) -> Projection:
        """``[.., H·hd] → [.., H, hd]``: the head count is entry -2 of the target. Behind a
        cut of the head dimension (``segments``) the split yields ``[.., H, w]`` blocks, of
        which the role owns ``hd`` features at a fixed start: a per-head interleaved packing."""
        segment = self.segments.get(self.role)
        if segment is not None:
            return self._strided_split(node, value, unit, *segment)
        head_dim = static_dim(value, -1)
        vector = shape_vector(node.inputs[1])
        if head_dim is None and vector is not None and vector[-1] not in (None, -1, 0):
            head_dim = vector[-1]
        if head_dim is None:
            raise NotRecognised(f"Reshape {node.name}: unknown head dimension")
        if self.head_dim not in (None, head_dim):
            raise NotRecognised(f"head dimensions {self.head_dim} and {head_dim} in one layer")
        self.head_dim = head_dim
        self._edit(node, 1, -2, ((unit, 1),))
        width = static_dim(node.inputs[0], -1)
        if width is None or width % head_dim:
            raise NotRecognised(f"Reshape {node.name}: width {width} is not a multiple of the head dimension {head_dim}")
        if self.role in self.widths and self.widths[self.role] != width:
            raise NotRecognised(f"{self.role}: two widths {self.widths[self.role]} and {width}")
        self.widths[self.role] = width
        return self._projection(node.inputs[0], unit)

    def _strided_split(self, node: ir.Node, value: ir.Value, unit: str, start: int, size: int, width: int) -> Projection:
        """The head split of ``[.., H·width]`` into ``[.., H, width]`` blocks of which the role
        owns ``start .. start + size``: a projection with stride ``width``."""
        if static_dim(value, -1) != width:
            raise NotRecognised(f"Reshape {node.name}: heads of {static_dim(value, -1)}, not the {width} cut behind it")
        if self.head_dim not in (None, size):
            raise NotRecognised(f"head dimensions {self.head_dim} and {size} in one layer")
        self.head_dim = size
        self._edit(node, 1, -2, ((unit, 1),))
        packed = static_dim(node.inputs[0], -1)
        if packed is None or packed % width:
            raise NotRecognised(f"Reshape {node.name}: width {packed} is not a multiple of {width}")
        self.widths[self.role] = packed // width * size
        proj = self._projection(node.inputs[0], unit)
        if proj.offset or proj.bias_offset:
            raise NotRecognised(f"Reshape {node.name}: an interleaved packing behind a packed Split")
        return dataclasses.replace(proj, offset=start, bias_offset=start if proj.bias else 0, stride=width)

    def _repeat(self, node: ir.Node, x: ir.Value, ax: int, hd: int, unit: str) -> set:
        """``[B, Hkv, n, S, hd] → [B, Hkv·n, S, hd]`` after ``Expand(Unsqueeze(kv, ax+1))``:
        query head ``h`` reads KV head ``h // n``."""
        if unit != Q or self.role not in ("k", "v"):
            raise NotRecognised(f"Reshape {node.name}: a repeat outside the K/V paths")
        self.values.add(x.name)
        expand = x.producer()
        if expand is None or expand.op_type != "Expand":
            raise NotRecognised(f"Reshape {node.name}: merges heads that do not come from an Expand")
        unsqueeze = expand.inputs[0].producer()
        axes = constant_ints(unsqueeze.inputs[1]) if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" and len(unsqueeze.inputs) > 1 else None
        if axes is None or [a % (value_rank(x)) for a in axes] != [ax + 1]:
            raise NotRecognised(f"Expand {expand.name}: not a repeat_interleave of KV heads")
        self._edit(node, 1, ax, ((Q, 1),))
        self._edit(expand, 1, ax, ((KV, 1),), vector=_dynamic_vector(expand.inputs[1]) if shape_vector(expand.inputs[1]) is None else None)
        self._repeat_count(node, expand, ax)
        self.values.add(expand.inputs[0].name)
        self.repeats.add(self.role)
        return set(self.heads_back(unsqueeze.inputs[0], ax, hd, KV))

    def _repeat_count(self, merge: ir.Node, expand: ir.Node, ax: int) -> None:
        """Where the repeat count lives, for removing query heads inside every KV group: the
        Expand target's entry ``ax+1`` and the merged head count must both be constants."""
        target = shape_vector(expand.inputs[1])
        merged = shape_vector(merge.inputs[1])
        if target is None or target[ax + 1] is None:
            self.group_fixed.append(f"Expand {expand.name}: repeat count computed at run time")
        elif merged is None or merged[ax] is None:
            self.group_fixed.append(f"Reshape {merge.name}: query head count computed from the KV head count")
        else:
            edit = ShapeEdit(expand.name, 1, ax + 1, ((REP, 1),))
            self.group_edits[(expand.name, 1, ax + 1)] = edit

    # -- feature layout, backwards to the projection ----------------------------------------
    def _projection(self, value: ir.Value, unit: str) -> Projection:
        """Walk back from ``[.., H·hd]`` to the linear map that writes it."""
        offset = 0
        bias: tuple[str, int] | None = None
        for _ in range(16):
            self.values.add(value.name)
            node = value.producer()
            if node is None or value.is_graph_input():
                raise NotRecognised(f"{value.name}: no projection behind a head split")
            op = node.op_type
            if op in ("Cast", "Identity"):
                value = node.inputs[0]
            elif op == "Reshape":
                if reads_own_width(node):
                    value = node.inputs[0]
                    continue
                if static_dim(node.inputs[0], -1) != static_dim(value, -1) or static_dim(value, -1) is None:
                    raise NotRecognised(f"Reshape {node.name} changes the feature axis before a head split")
                self._edit(node, 1, -1, ((unit, self.head_dim),))
                value = node.inputs[0]
            elif is_rotary(node):
                value = self._rotary(node, value_rank(value), None, unit)
            elif op in ("Mul", "Div") and _scalar_other(node, value) is not None:
                value = _scalar_other(node, value)
            elif op == "Add" and bias is None and _vector_bias(node) is not None:
                bias_value, data = _vector_bias(node)
                bias = (resolve_param(bias_value).name, offset)
                value = data
            elif op == "Split":
                offset += self._split_offset(node, value, unit)
                value = node.inputs[0]
            elif op in ("MatMul", "Gemm"):
                return self._linear(node, offset, bias, unit)
            else:
                raise NotRecognised(f"{op} {node.name} between a projection and its head split")
        raise NotRecognised(f"{value.name}: projection too far from its head split")

    def _rotary(self, node: ir.Node, rank: int, axes: tuple[int, int] | None, unit: str) -> ir.Value:
        """Through a RotaryEmbedding (``rotary.rotary_through``): its data input; its
        ``num_heads`` (when set) counts heads of ``unit``."""
        try:
            found = rotary_through(node, rank, self.head_dim, axes)
        except RotaryError as exc:
            raise NotRecognised(str(exc)) from None
        if found.num_heads:
            self.attr_edits.append(AttrEdit(node.name, "num_heads", (((unit, 1),),)))
        return found.data

    def _split_offset(self, node: ir.Node, value: ir.Value, unit: str) -> int:
        rank = value_rank(value)
        if node.attributes.get_int("axis", 0) % rank != rank - 1:
            raise NotRecognised(f"Split {node.name} not along the feature axis")
        index = list(node.outputs).index(value)
        sizes = [static_dim(out, -1) for out in node.outputs]
        if None in sizes:
            raise NotRecognised(f"Split {node.name}: unknown output widths")
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            self._edit(node, 1, index, ((unit, self.head_dim),))
        elif len(set(sizes)) != 1:
            raise NotRecognised(f"Split {node.name}: uneven split without sizes")
        return sum(sizes[:index])

    def _linear(self, node: ir.Node, offset: int, bias: tuple[str, int] | None, unit: str) -> Projection:
        view = resolve_param(node.inputs[1])
        if view is None or view.rank != 2 or resolve_param(node.inputs[0]) is not None:
            raise NotRecognised(f"{node.op_type} {node.name}: not a projection by a constant weight")
        if node.graph is not None and view.name in {v.name for v in node.graph.inputs}:
            raise NotRecognised(f"weight {view.name} is also a graph input (a caller may feed it; its shape is public)")
        if node.attributes.get_int("transA", 0):
            raise NotRecognised(f"Gemm {node.name} with transA")
        out_axis = view.perm[0 if node.attributes.get_int("transB", 0) else 1]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            if bias is not None:
                raise NotRecognised(f"Gemm {node.name}: two biases")
            c = resolve_param(node.inputs[2])
            if c is None or c.rank != 1:
                raise NotRecognised(f"Gemm {node.name}: bias of unexpected form")
            bias = (c.name, offset)
        return Projection(
            role=self.role, unit=unit, weight=view.name, axis=out_axis, offset=offset,
            bias=bias[0] if bias else None, bias_offset=bias[1] if bias else 0,
        )

    # -- output, forwards --------------------------------------------------------------------
    def output(self, value: ir.Value | None = None, ax: int = -3, hd: int = -1) -> tuple[str, int, str]:
        """From ``P·V`` ([B, H, S, hd]), or a fused op's output ``value`` (head axis ``ax``,
        or ``-1`` for ``[.., H·hd]``), to the output projection: ``(weight, axis, anchor)``."""
        value = self.pv.outputs[0] if value is None else value
        rank = value_rank(value)
        if ax != -1:
            ax, hd = ax % rank, hd % rank
        for _ in range(16):
            self.values.add(value.name)
            node = _single_consumer(value)
            op = node.op_type
            if op in ("Cast", "Identity"):
                value = node.outputs[0]
            elif op == "Transpose" and ax >= 0:
                perm = list(node.attributes.get_ints("perm", None) or reversed(range(rank)))
                ax, hd = perm.index(ax), perm.index(hd)
                value = node.outputs[0]
            elif op == "Reshape" and ax >= 0 and self._keeps_heads(node, rank, ax, hd):
                value = node.outputs[0]  # a view that restates [.., H, .., hd] (head count as -1)
            elif op == "Reshape" and ax >= 0:
                out = node.outputs[0]
                if not (ax == rank - 2 and hd == rank - 1 and self._merges(node, out)):
                    raise NotRecognised(f"Reshape {node.name}: does not merge [.., H, hd] into [.., H·hd]")
                if not reads_own_width(node):
                    self._edit(node, 1, -1, ((Q, self.head_dim),))
                value, ax, rank = out, -1, value_rank(out)
            elif op == "Reshape" and value_rank(node.outputs[0]) == rank + 1 and self._splits(node):
                self._edit(node, 1, -2, ((Q, 1),))  # [.., H·hd] -> [.., H, hd], merged again below
                value, ax, hd, rank = node.outputs[0], rank - 1, rank, rank + 1
            elif op == "Reshape":  # feature layout: the last axis must stay
                if not reads_own_width(node):
                    if static_dim(node.outputs[0], -1) != static_dim(value, -1) or static_dim(value, -1) is None:
                        raise NotRecognised(f"Reshape {node.name} changes the feature axis before the output projection")
                    self._edit(node, 1, -1, ((Q, self.head_dim),))
                value, rank = node.outputs[0], value_rank(node.outputs[0])
            elif op in ("MatMul", "Gemm") and ax < 0 and node.inputs[0] is value:
                view = resolve_param(node.inputs[1])
                if view is None or view.rank != 2 or node.attributes.get_int("transA", 0):
                    raise NotRecognised(f"{op} {node.name}: output projection without a constant weight")
                in_axis = view.perm[1 if node.attributes.get_int("transB", 0) else 0]
                if view.shape[1 if node.attributes.get_int("transB", 0) else 0] != self.widths["q"]:
                    raise NotRecognised(f"{op} {node.name}: output projection reads {view.shape} features")
                return view.name, in_axis, value.name
            else:
                raise NotRecognised(f"{op} {node.name} between attention and the output projection")
        raise NotRecognised("output projection too far from the attention core")

    def _keeps_heads(self, node: ir.Node, rank: int, ax: int, hd: int) -> bool:
        """Whether a Reshape restates its input's layout: same rank, the head entry ``-1``, the
        head-dimension entry ``hd``, the others computed at run time or kept (0)."""
        vector = shape_vector(node.inputs[1])
        if vector is None or len(vector) != rank or value_rank(node.outputs[0]) != rank:
            return False
        others = [e for i, e in enumerate(vector) if i not in (ax, hd)]
        return vector[ax] == -1 and vector[hd] == self.head_dim and all(e is None or e == 0 for e in others)

    def _splits(self, node: ir.Node) -> bool:
        """Whether a Reshape of ``[.., H·hd]`` yields ``[.., H, hd]`` (last size ``hd``)."""
        vector = shape_vector(node.inputs[1])
        return self.head_dim in (static_dim(node.outputs[0], -1), vector[-1] if vector else None)

    def _merges(self, node: ir.Node, out: ir.Value) -> bool:
        """Whether a Reshape of ``[.., H, hd]`` yields ``[.., H·hd]``: its output's last size is
        ``H·hd`` (static, or a constant target entry), or the last entry is -1 with every
        other entry given (computed or positive)."""
        width = self.widths["q"]
        if static_dim(out, -1) == width:
            return True
        vector = shape_vector(node.inputs[1])
        if vector is None:
            return reads_own_width(node)
        return vector[-1] == width or (vector[-1] == -1 and all(e is None or e > 0 for e in vector[:-1]))

    # -- the block --------------------------------------------------------------------------
    def block(self) -> AttentionBlock:
        self.values |= _values_between(self.pv.inputs[0], self.softmax, _PROB_OPS)
        self.values |= _values_between(self.softmax.inputs[0], self.qk, _SCORE_OPS)
        q, k = self.qk.inputs
        v = self.pv.inputs[1]
        found = {}
        for role, value, (ax, hd) in (("q", q, (-3, -1)), ("k", k, (-3, -2)), ("v", v, (-3, -1))):
            self.role = role
            sources = self.heads_back(value, ax, hd, Q)
            if len(sources) != 1:
                raise NotRecognised(f"{role}: {len(sources)} projections found")
            found[role] = next(iter(sources))
        self.role = "o"
        weight, axis, anchor = self.output()
        hd = self.head_dim
        heads = self.widths["q"] // hd
        kv_heads = self.widths["k"] // hd
        if self.widths["v"] != self.widths["k"]:
            raise NotRecognised(f"k and v widths differ ({self.widths['k']} vs {self.widths['v']})")
        if self.repeats and self.repeats != {"k", "v"}:
            raise NotRecognised("only one of k/v is repeated")
        if not self.repeats and kv_heads != heads:
            raise NotRecognised(f"{heads} query heads and {kv_heads} KV heads without a repeat")
        if heads % kv_heads:
            raise NotRecognised(f"{heads} query heads not a multiple of {kv_heads} KV heads")
        if not self.repeats:  # plain multi-head attention: one count
            found = {r: dataclasses.replace(p, unit=Q) for r, p in found.items()}
        counts = {Q: heads, KV: kv_heads if self.repeats else heads}
        edits = []
        for (node, index, position), by_role in sorted(self.edits.items()):
            terms = tuple(t for role in sorted(by_role) for t in by_role[role])
            if not self.repeats:
                terms = tuple((Q, f) for _, f in terms)
            edits.append(ShapeEdit(node, index, position, terms))
        cache = tuple(
            dataclasses.replace(c, unit=Q if not self.repeats else c.unit) for _, c in sorted(self.cache.items())
        )
        attrs = tuple(
            e if self.repeats else dataclasses.replace(e, entries=tuple(tuple((Q, f) for _, f in t) for t in e.entries))
            for e in self.attr_edits
        )
        block = AttentionBlock(
            layer=0, scope=node_scope(self.pv), num_heads=heads, num_kv_heads=counts[KV], head_dim=hd,
            projections=tuple(found[r] for r in ("q", "k", "v")), output_weight=weight, output_axis=axis,
            anchor=anchor, shape_edits=tuple(edits), cache=cache, values=tuple(sorted(self.values)),
            group_edits=tuple(e for _, e in sorted(self.group_edits.items())),
            group_fixed="; ".join(self.group_fixed) if self.group_fixed else (None if self.repeats else "no repeat of KV heads"),
            attr_edits=attrs,
        )
        check_edits(self.pv.graph, block)
        return block


def _values_between(value: ir.Value, stop: ir.Node, ops: frozenset[str]) -> set[str]:
    """Names of the activations from ``stop``'s outputs to ``value`` through ``ops`` (their
    static shapes name the head count)."""
    found, frontier = set(), [value]
    for _ in range(8):
        nxt = []
        for v in frontier:
            found.add(v.name)
            node = v.producer()
            if node is not None and node is not stop and node.op_type in ops:
                nxt.extend(i for i in node.inputs if _activation(i))
        frontier = nxt
    return found


def _single_consumer(value: ir.Value) -> ir.Node:
    users = [u.node for u in value.uses() if u.node.op_type not in ("Shape", "Size")]
    if len(users) != 1 or value.is_graph_output():
        raise NotRecognised(f"{value.name}: attention output has {len(users)} readers")
    return users[0]


def _scalar_other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The data input of ``Mul/Div(x, c)`` with a scalar constant ``c`` (``x·c`` or ``x/c``)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    for data, const in ((a, b), (b, a)):
        if node.op_type == "Div" and data is not a:
            continue
        tensor = ir.convenience.get_const_tensor(const) if const is not None else None
        if _activation(data) and tensor is not None and tensor.size == 1:
            return data
    return None


def _vector_bias(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """``(bias, data)`` of ``Add(data, bias)`` with a constant 1-D bias."""
    a, b = node.inputs
    for data, bias in ((a, b), (b, a)):
        view = resolve_param(bias)
        if _activation(data) and view is not None and view.rank == 1 and view.perm == (0,):
            return bias, data
    return None


def check_edits(graph: ir.Graph, block: AttentionBlock) -> None:
    """Every recorded constant must name the count it is said to name."""
    nodes = {n.name: n for n in graph}
    counts = block.counts()
    for edit in (*block.shape_edits, *block.group_edits):
        node = nodes[edit.node]
        vector = shape_vector(node.inputs[edit.input])
        if vector is None:
            vector = _dynamic_vector(node.inputs[edit.input])
            if vector is not None and vector[edit.position] is not None:
                raise NotRecognised(f"{node.op_type} {node.name}: head count in a computed shape chain")
        if vector is not None and vector[edit.position] != edit.value(counts):
            raise NotRecognised(
                f"{node.op_type} {node.name}: shape entry {vector[edit.position]} is not {edit.value(counts)}"
            )
    for edit in block.attr_edits:
        node = nodes[edit.node]
        attr = node.attributes.get(edit.attribute)
        found = None if attr is None else (list(attr.value) if edit.is_list else attr.value)
        if found != edit.value(counts):
            raise NotRecognised(f"{node.op_type} {node.name}: {edit.attribute}={found} is not {edit.value(counts)}")
