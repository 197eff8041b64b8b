"""Grouped-query attention with a concatenated KV cache -> ONNX Runtime's ``GroupQueryAttention``.

Rule. A ``com.microsoft`` ``MultiHeadAttention`` node (``num_heads`` N, attention bias, no
bias/key-padding-mask/past inputs, no ``unidirectional``) whose key and value are the
exporters' ``repeat_kv`` of a concatenated cache,

    present = Concat(past, new, axis=2)                     # [B, kvN, P+S, h], BNSH
    key     = Reshape(Expand(Unsqueeze(present, 2), [B, kvN, N/kvN, P+S, h]), [B, N, P+S, h])
              (BNSH, or as BSH through Reshape(Transpose(key, [0, 2, 1, 3]), [0, 0, -1]))

(shapes read from the graph's shape information, kvN and h static, h a multiple of 8; the
repeat's own shape may be unknown, the merged ``[B, N, P+S, h]`` is then what is checked, and
the probes the result must pass), becomes

    out, present_k, present_v = GroupQueryAttention(query, BSH(new_k), BSH(new_v), past_k, past_v,
        seqlens_k = [T-1]*B, total_sequence_length = T, attention_bias = bias,
        num_heads=N, kv_num_heads=kvN, causal=0, scale=the MHA's)

with T the bias's last dimension. Query head n reads KV head ``n // (N/kvN)`` in both forms.
``causal=0`` makes the kernel take the exporter's own additive mask (causal and padding) as
the whole mask, and ``seqlens_k = T-1`` for every row makes its past length ``T-S = P`` for
every row, so the present cache is ``Concat(past, new)`` exactly: left or right padding, a
fully masked row and a non-empty past all give the unfused graph's outputs and caches (ONNX
Runtime 1.32's CPU kernel; ``--fuse`` checks it on its probes like every fusion step). One input the unfused
graph takes is refused: ONNX Runtime 1.32 runs several new tokens on a non-empty past only
at batch 1 (``batch_size must be 1 when sequence_length > 1 and past context``); prompts
(empty past) and one-token decode steps run at any batch. Every inconsistent shape the
rewrite relies on (batch, T = P+S, bias dimensions) is an error in the kernel, never a
silent difference. The cache graph inputs/outputs keep their names.

Around each site three exact layout shortcuts remove width-independent nodes: a new key/value
that is ``Transpose(Reshape(y, [B, S, kvN, h]), [0, 2, 1, 3])`` is fed as ``y`` itself, one that
is a ``RotaryEmbedding`` of that form as the rotation of ``y`` (3-D), and the
``Reshape -> Transpose -> Transpose -> Reshape`` (cancelling transposes) after the attention is
dropped when its output shape is the attention output's. A bias ``Expand`` whose output shape
equals its input shape is skipped. ``seqlens_k``/``total_sequence_length`` are computed once per
mask.

Written by hand on ``onnx_ir``; ONNX Runtime's operator schema gives the contract.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from graphresize.passes.edit import unnamed_dim

MS_DOMAIN = "com.microsoft"
#: MultiHeadAttention attributes whose values this rewrite understands.
_MHA_ATTRIBUTES = frozenset({"num_heads", "scale", "unidirectional", "mask_filter_value"})
_BNSH_TO_BSNH = (0, 2, 1, 3)


@dataclasses.dataclass(frozen=True)
class _Cache:
    """One side (key or value) of a site: ``present = Concat(past, new)`` and the repeat chain."""

    present: ir.Value
    past: ir.Value
    new: ir.Value  # BNSH, the step's own tokens


@dataclasses.dataclass(frozen=True)
class _Site:
    node: ir.Node  # the MultiHeadAttention
    query: ir.Value
    key: _Cache
    value: _Cache
    bias: ir.Value
    mask_root: ir.Value  # the bias before Expands that keep its last dimension
    num_heads: int
    kv_heads: int
    head_size: int


def _int_const(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _dims(value: ir.Value) -> list | None:
    return None if value.shape is None else list(value.shape)


def _shape(value: ir.Value) -> ir.Shape | None:
    """``value``'s shape; through ``com.microsoft`` ``RotaryEmbedding`` (output shape = input
    shape), whose output ONNX shape inference leaves unknown."""
    node = value.producer()
    if value.shape is None and node is not None and node.op_type == "RotaryEmbedding" and node.domain == MS_DOMAIN:
        return _shape(node.inputs[0])
    return value.shape


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    da, db = _dims(a), _dims(b)
    return da is not None and db is not None and len(da) == len(db) and all(_same_dim(x, y) for x, y in zip(da, db, strict=True))


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    attr = node.attributes.get("perm")
    return tuple(attr.as_ints()) if attr is not None else None


def _repeated_cache(key: ir.Value, num_heads: int) -> tuple[_Cache, int, int] | None:
    """``key`` = Reshape(Expand(Unsqueeze(Concat(past, new), 2))) repeating each of kvN cache
    heads N/kvN times, given to the attention as BNSH ``[B, N, T, h]`` or as BSH through
    ``Reshape(Transpose(., [0, 2, 1, 3]), [0, 0, -1])``; returns the cache, kvN and the head size."""
    merged = key
    flat = _producer(key, "Reshape")
    transpose = _producer(flat.inputs[0], "Transpose") if flat is not None else None
    if transpose is not None:  # the BSH form
        if _int_const(flat.inputs[1]) != [0, 0, -1] or flat.attributes.get_int("allowzero", 0) != 0:
            return None
        if _perm(transpose) != _BNSH_TO_BSNH:
            return None
        merged = transpose.inputs[0]
    merge = _producer(merged, "Reshape")
    expand = _producer(merge.inputs[0], "Expand") if merge is not None else None
    unsqueeze = _producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsqueeze is None or _int_const(unsqueeze.inputs[1]) not in ([2], [-3]):
        return None
    present = unsqueeze.inputs[0]
    concat = _producer(present, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis", 0) not in (2, -2):
        return None
    cache, repeated, heads = _dims(present), _dims(expand.outputs[0]), _dims(merged)
    # the TorchScript exporter's expand target (Where(shape == -1, 1, shape)) leaves the repeat's
    # shape unknown: the merged [B, N, T, h] after it is then what is checked
    repeated = [None] * 5 if repeated is None else repeated
    if cache is None or heads is None or (len(cache), len(repeated), len(heads)) != (4, 5, 4):
        return None
    kv_heads, head_size = cache[1], cache[3]
    if not (isinstance(kv_heads, int) and isinstance(head_size, int) and kv_heads > 0 and num_heads % kv_heads == 0):
        return None
    want_repeated = [cache[0], kv_heads, num_heads // kv_heads, cache[2], head_size]
    want_heads = [cache[0], num_heads, cache[2], head_size]
    if not all(unnamed_dim(a) or _same_dim(a, b) for a, b in zip(repeated, want_repeated, strict=True)):
        return None
    if not all(_same_dim(a, b) for a, b in zip(heads, want_heads, strict=True)):
        return None
    past, new = concat.inputs
    if past is None or new is None or past.shape is None or new.shape is None or len(past.shape) != 4 or len(new.shape) != 4:
        return None
    return _Cache(present, past, new), kv_heads, head_size


def _mask_root(bias: ir.Value) -> ir.Value:
    """``bias`` through the Expand nodes whose target shape ends in the constant 1 (they keep
    the last dimension, the total sequence length)."""
    while (expand := _producer(bias, "Expand")) is not None:
        target = expand.inputs[1]
        last = _int_const(target)
        if last is None:
            concat = _producer(target, "Concat")
            last = _int_const(concat.inputs[-1]) if concat is not None and concat.inputs else None
        if not last or last[-1] != 1:
            break
        bias = expand.inputs[0]
    return bias


def match_site(node: ir.Node) -> _Site | str:
    """The site of ``node`` or why it is not one (a short reason)."""
    if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN:
        return "not MultiHeadAttention"
    if set(node.attributes) - _MHA_ATTRIBUTES or node.attributes.get_int("unidirectional", 0) != 0:
        return "attributes"
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if inputs[3] is not None or inputs[4] is not None or any(v is not None for v in inputs[6:]) or inputs[5] is None:
        return "needs exactly query, key, value and attention_bias"
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return "present outputs of MultiHeadAttention in use"
    num_heads = node.attributes.get_int("num_heads", 0)
    query = inputs[0]
    key, value = _repeated_cache(inputs[1], num_heads), _repeated_cache(inputs[2], num_heads)
    if key is None or value is None:
        return "key/value are not a repeated concatenated cache"
    (k, kv_heads, head_size), (v, v_heads, v_size) = key, value
    if (v_heads, v_size) != (kv_heads, head_size) or k.present is v.present:
        return "key and value caches differ in shape"
    query_shape = _shape(query)
    if head_size % 8 or query_shape is None or len(query_shape) != 3 or query_shape[2] != num_heads * head_size:
        return "query width or head size"
    bias = inputs[5]
    if bias.shape is not None and len(bias.shape) != 4:
        return "bias rank"
    return _Site(node, query, k, v, bias, _mask_root(bias), num_heads, kv_heads, head_size)


def _merged_heads(bnsh: ir.Value) -> ir.Value | None:
    """``y`` when ``bnsh`` is ``Transpose(Reshape(y, [B, S, kvN, h]), [0, 2, 1, 3])`` and the
    shapes show ``y`` is ``[B, S, kvN*h]`` (static kvN and h)."""
    transpose = _producer(bnsh, "Transpose")
    if transpose is None or _perm(transpose) != _BNSH_TO_BSNH:
        return None
    bsnh = transpose.inputs[0]
    split = _producer(bsnh, "Reshape")
    if split is None:
        return None
    flat, heads, dims = split.inputs[0], _dims(bsnh), _dims(split.inputs[0])
    if heads is None or dims is None or len(dims) != 3 or len(heads) != 4:
        return None
    width = heads[2] * heads[3] if isinstance(heads[2], int) and isinstance(heads[3], int) else None
    if _same_dim(dims[0], heads[0]) and _same_dim(dims[1], heads[1]) and width is not None and dims[2] == width:
        return flat
    return None


def _as_bsh(graph: ir.Graph, before: ir.Node, new: ir.Value, name: str) -> ir.Value:
    """``new`` (BNSH) as ``[B, S, kvN*h]``, new nodes inserted before ``before``:

    * ``Transpose(Reshape(y, [B, S, kvN, h]))`` -> ``y`` (the layout change taken back);
    * ``RotaryEmbedding(Transpose(Reshape(y, ...)), ...)`` -> ``RotaryEmbedding(y, ...)``, the
      same rotation on the 3-D ``[B, S, kvN*h]`` form (ONNX Runtime rotates each ``h``-wide
      head of a 3-D input alike; the query's rotary is already fused that way), so the key
      skips a Transpose and a Reshape on each side of its rotation;
    * anything else -> ``Reshape(Transpose(new, [0, 2, 1, 3]), [0, 0, -1])`` (the Transpose's
      input itself when ``new`` is such a Transpose).
    """
    flat = _merged_heads(new)
    if flat is not None:
        return flat
    rotary = new.producer()
    if rotary is not None and rotary.op_type == "RotaryEmbedding" and rotary.domain == MS_DOMAIN:
        flat = _merged_heads(rotary.inputs[0])
        if flat is not None:
            attributes = {key: attr.value for key, attr in rotary.attributes.items()}
            node = ir.node("RotaryEmbedding", [flat, *rotary.inputs[1:]], attributes, domain=MS_DOMAIN, name=f"{name}_rotary_bsh")
            node.outputs[0].name = f"{name}_rotary_bsh"
            if flat.dtype is not None:
                node.outputs[0].dtype, node.outputs[0].shape = flat.dtype, flat.shape
            graph.insert_before(before, node)
            return node.outputs[0]
    transpose = _producer(new, "Transpose")
    if transpose is not None and _perm(transpose) == _BNSH_TO_BSNH:
        bsnh, prelude = transpose.inputs[0], []
    else:
        prelude = [ir.node("Transpose", [new], {"perm": list(_BNSH_TO_BSNH)}, name=f"{name}_bsnh")]
        bsnh = prelude[0].outputs[0]
    constant = _constant([0, 0, -1], f"{name}_bsh_shape")
    reshape = ir.node("Reshape", [bsnh, constant.outputs[0]], name=f"{name}_bsh")
    graph.insert_before(before, [*prelude, constant, reshape])
    return reshape.outputs[0]


def _constant(values: list[int], name: str) -> ir.Node:
    """A Constant node holding the int64 vector ``values``, its output named ``name``."""
    tensor = ir.tensor(np.array(values, dtype=np.int64), name=name)
    node = ir.node("Constant", [], {"value": tensor}, name=name)
    node.outputs[0].name, node.outputs[0].const_value = name, tensor
    node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.INT64, ir.Shape([len(values)])
    return node


def _sequence_lengths(graph: ir.Graph, before: ir.Node, root: ir.Value, query: ir.Value, tag: str) -> tuple[ir.Value, ir.Value]:
    """``seqlens_k = [T-1] * B`` (int32, B from ``query``) and ``total_sequence_length = [T]``
    (int32) for T the last dimension of ``root``."""
    nodes = [_constant([1], f"{tag}_one")]
    one = nodes[0].outputs[0]
    nodes.append(ir.node("Shape", [root], {"start": -1}, name=f"{tag}_total64"))
    total64 = nodes[-1].outputs[0]
    nodes.append(ir.node("Sub", [total64, one], name=f"{tag}_last64"))
    last64 = nodes[-1].outputs[0]
    nodes.append(ir.node("Shape", [query], {"start": 0, "end": 1}, name=f"{tag}_batch"))
    nodes.append(ir.node("Expand", [last64, nodes[-1].outputs[0]], name=f"{tag}_seqlens64"))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.INT32}, name=f"{tag}_seqlens_k"))
    seqlens = nodes[-1].outputs[0]
    nodes.append(ir.node("Cast", [total64], {"to": ir.DataType.INT32}, name=f"{tag}_total_sequence_length"))
    total = nodes[-1].outputs[0]
    graph.insert_before(before, nodes)
    seqlens.name, total.name = f"{tag}_seqlens_k", f"{tag}_total_sequence_length"
    seqlens.dtype = total.dtype = ir.DataType.INT32
    seqlens.shape, total.shape = ir.Shape([_shape(query)[0]]), ir.Shape([1])
    return seqlens, total


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` (graph outputs too) reads ``new``, which takes ``old``'s name."""
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name


def _identity_tail(out: ir.Value, like: ir.Value) -> ir.Value | None:
    """The end of ``Reshape -> Transpose(p) -> Transpose(q) -> Reshape`` after ``out`` when q∘p
    is the identity and the end's shape is ``like``'s (``out``'s own): then it equals ``out``."""
    chain, value = [], out
    for op_type in ("Reshape", "Transpose", "Transpose", "Reshape"):
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return None
        node = uses[0].node
        if node.op_type != op_type or node.domain not in ("", "ai.onnx") or uses[0].idx != 0:
            return None
        chain.append(node)
        value = node.outputs[0]
    p, q = _perm(chain[1]), _perm(chain[2])
    if p is None or q is None or len(p) != len(q) or any(p[q[i]] != i for i in range(len(q))):
        return None
    return value if _same_shape(value, like) else None


class FuseGroupQueryAttentionPass(ir.passes.InPlacePass):
    """Apply the module's rule at every matching site; ``count`` is how many were rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sites = [s for node in list(graph) if isinstance(s := match_site(node), _Site)]
        self.count = 0
        lengths: dict[int, tuple[ir.Value, ir.Value]] = {}
        claimed: set[int] = set()
        for i, site in enumerate(sites):
            node, tag = site.node, f"gqa_{i}"
            if {id(site.key.present), id(site.value.present)} & claimed:
                continue  # two attentions over one cache: the first takes it
            claimed |= {id(site.key.present), id(site.value.present)}
            root = site.mask_root
            if id(root) not in lengths:
                lengths[id(root)] = _sequence_lengths(graph, node, root, site.query, f"gqa_mask_{len(lengths)}")
            seqlens, total = lengths[id(root)]
            bias = root if root is not site.bias and _same_shape(root, site.bias) else site.bias
            key = _as_bsh(graph, node, site.key.new, f"{tag}_key")
            value = _as_bsh(graph, node, site.value.new, f"{tag}_value")
            attributes = {"num_heads": site.num_heads, "kv_num_heads": site.kv_heads, "causal": 0}
            scale = node.attributes.get_float("scale", 0.0)
            if scale:
                attributes["scale"] = scale
            inputs = [site.query, key, value, site.key.past, site.value.past, seqlens, total, None, None, None, bias]
            gqa = ir.node("GroupQueryAttention", inputs, attributes, domain=MS_DOMAIN, num_outputs=3, name=f"{tag}_GroupQueryAttention")
            graph.insert_before(node, gqa)
            out, present_key, present_value = gqa.outputs
            dtype = site.key.present.dtype or site.query.dtype
            if dtype is not None:  # a value with a shape needs its type to be serialized
                out.dtype = present_key.dtype = present_value.dtype = dtype
                out.shape = ir.Shape(list(_shape(site.query)))
                present_key.shape, present_value.shape = site.key.present.shape, site.value.present.shape
            tail = _identity_tail(node.outputs[0], out)
            _take_over(node.outputs[0], out)
            if tail is not None:
                _take_over(tail, out)
            _take_over(site.key.present, present_key)
            _take_over(site.value.present, present_value)
            self.count += 1
        if self.count:
            common_passes.RemoveUnusedNodesPass()(model)
            graph.sort()
            if not any(d == MS_DOMAIN for d in model.opset_imports):
                model.opset_imports[MS_DOMAIN] = 1
        return ir.passes.PassResult(model, bool(self.count))


def fuse_gqa(model: ir.Model) -> int:
    """:class:`FuseGroupQueryAttentionPass` as a step of ``FuseForOrtPass`` (which keeps it only
    if the fused graph passes its probes, ``graphresize.fusion.probe_outputs``: a left-padded
    batch, a decode step and a multi-token step on a cache). Returns the sites rewritten."""
    if not any(node.op_type == "MultiHeadAttention" for node in model.graph):
        return 0
    common_passes.ShapeInferencePass()(model)  # the sites are read from value shapes
    fuse = FuseGroupQueryAttentionPass()
    fuse(model)
    return fuse.count
