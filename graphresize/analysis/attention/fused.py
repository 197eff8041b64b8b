"""Head groups of fused attention ops: which weights, attributes and cache tensors carry the
head count of ``com.microsoft`` MultiHeadAttention, GroupQueryAttention and Attention, and of
ONNX (opset 23) Attention.

Rules, per op (``hd`` fixed; q/k/v inputs ``[B, S, H·hd]`` unless said):

* q, k and v are traced back to their projections like decomposed attention (a head split
  then merge, RoPE and repeat-KV on the way, a packed QKV MatMul then Split); a
  MultiHeadAttention ``bias`` input is the packed q|k|v bias of those projections.
* MultiHeadAttention: ``num_heads`` counts query heads; k and v have as many heads (after a
  repeat-KV, if the graph repeats them before the op). Past/present ``[B, H, T, hd]``.
* GroupQueryAttention: ``num_heads`` / ``kv_num_heads``; with key and value absent, query is
  the packed ``[q | k | v]`` output of one projection. Past/present ``[B, Hkv, T, hd]``.
* com.microsoft Attention: input 1 is the packed ``[in, q | k | v]`` weight, input 2 its bias,
  ``qkv_hidden_sizes`` (when given) the three widths. Past/present ``[2, B, H, T, hd]``.
* ONNX Attention: ``q_num_heads`` / ``kv_num_heads`` with 3-D inputs, or 4-D inputs
  ``[B, H, S, hd]`` whose head axis is traced. Past/present ``[B, Hkv, T, hd]``. With equal
  query and KV counts it is read as MultiHeadAttention: the graph may repeat KV heads before
  it (the opset-23 dynamo export of an SDPA Llama does).
* A RotaryEmbedding on the q/k path is passed through (``rotary.py``).

Per-head inputs that this does not rewrite (a head sink, a per-head attention bias or mask,
packed 5-D q/k/v, an exported QK output) leave the layer unchanged with the reason.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from graphresize.analysis.attention.heads import (
    KV,
    AttentionBlock,
    AttrEdit,
    CacheTensor,
    NotRecognised,
    Projection,
    Q,
    ShapeEdit,
    Tracer,
    check_edits,
    node_scope,
    static_dim,
    value_rank,
)
from graphresize.analysis.channels import resolve_param

MS = "com.microsoft"


def fused_block(node: ir.Node) -> AttentionBlock:
    """The head groups of one fused attention op (raises ``NotRecognised``)."""
    return _FusedTracer(node).block()


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _output(node: ir.Node, index: int) -> ir.Value | None:
    return node.outputs[index] if len(node.outputs) > index else None


def _int(node: ir.Node, name: str) -> int:
    return node.attributes.get_int(name, 0)


class _FusedTracer(Tracer):
    def __init__(self, node: ir.Node) -> None:
        super().__init__(None)
        self.node = node

    # -- q/k/v inputs ------------------------------------------------------------------------
    def features_back(self, value: ir.Value, unit: str) -> Projection:
        """The projection behind ``[.., H·hd]``: through a Reshape that merges ``[.., H, hd]``
        (then the head layout, as for decomposed attention), or directly."""
        self.values.add(value.name)
        node = value.producer()
        rank = value_rank(value)
        if node is not None and node.op_type == "Reshape" and value_rank(node.inputs[0]) == rank + 1:
            x = node.inputs[0]
            if static_dim(x, -1) != self.head_dim:
                raise NotRecognised(f"Reshape {node.name}: merges {static_dim(x, -1)}-wide heads, not {self.head_dim}")
            self._edit(node, 1, -1, ((unit, self.head_dim),))
            sources = self.heads_back(x, -2, -1, unit)
            if len(sources) != 1:
                raise NotRecognised(f"{self.role}: {len(sources)} projections found")
            return next(iter(sources))
        width = static_dim(value, -1)
        if width is None or width % self.head_dim:
            raise NotRecognised(f"{self.role} input {value.name}: width {width} is not whole heads of {self.head_dim}")
        self.widths[self.role] = width
        return self._projection(value, unit)

    def trace(self, role: str, value: ir.Value, unit: str) -> Projection:
        self.role = role
        if value_rank(value) == 4:  # [B, H, S, hd]
            sources = self.heads_back(value, 1, 3, unit)
            if len(sources) != 1:
                raise NotRecognised(f"{role}: {len(sources)} projections found")
            return next(iter(sources))
        if value_rank(value) != 3:
            raise NotRecognised(f"{self.node.op_type} {self.node.name}: {role} of rank {value_rank(value)} (packed form)")
        return self.features_back(value, unit)

    def packed(self, value: ir.Value, heads: int, kv_heads: int) -> list[Projection]:
        """GroupQueryAttention with key/value absent: one projection writes ``[q | k | v]``."""
        self.role = "qkv"
        before = len(self.edits)
        proj = self.features_back(value, Q)
        if len(self.edits) != before or proj.offset:
            raise NotRecognised(f"{self.node.name}: packed QKV input with shape edits on its path")
        hd = self.head_dim
        if self.widths.pop("qkv") != (heads + 2 * kv_heads) * hd:
            raise NotRecognised(f"{self.node.name}: packed QKV width is not ({heads} + 2·{kv_heads})·{hd}")
        self.widths.update(q=heads * hd, k=kv_heads * hd, v=kv_heads * hd)
        offsets = {"q": 0, "k": heads * hd, "v": (heads + kv_heads) * hd}
        return [
            dataclasses.replace(proj, role=r, unit=Q if r == "q" else KV, offset=o,
                                bias_offset=proj.bias_offset + o if proj.bias else 0)
            for r, o in offsets.items()
        ]

    # -- per-head inputs that stay ------------------------------------------------------------
    def no_per_head(self, index: int, what: str, head_axis: int = 1) -> None:
        value = _input(self.node, index)
        if value is None:
            return
        shape = value.shape
        if shape is None or (len(shape) == 4 and shape[head_axis] != 1):
            raise NotRecognised(f"{self.node.op_type} {self.node.name}: {what} may differ per head")

    def no_output(self, index: int, what: str) -> None:
        value = _output(self.node, index)
        if value is not None and (value.uses() or value.is_graph_output()):
            raise NotRecognised(f"{self.node.op_type} {self.node.name}: {what} is read")

    # -- cache ---------------------------------------------------------------------------------
    def past(self, index: int, axis: int, unit: str) -> None:
        value = _input(self.node, index)
        while value is not None and not value.is_graph_input():
            self.values.add(value.name)
            producer = value.producer()
            if producer is None or producer.op_type not in ("Cast", "Identity"):
                raise NotRecognised(f"{self.node.name}: past {value.name} is not a graph input")
            value = producer.inputs[0]
        if value is not None:
            self.cache[value.name] = CacheTensor(value.name, axis, unit, is_input=True)

    def present(self, index: int, axis: int, unit: str) -> None:
        value = _output(self.node, index)
        while value is not None:
            self.values.add(value.name)
            if value.is_graph_output():
                self.cache[value.name] = CacheTensor(value.name, axis, unit, is_input=False)
            users = list(value.uses())
            if not users:
                return
            if len(users) != 1 or users[0].node.op_type not in ("Cast", "Identity"):
                raise NotRecognised(f"{self.node.name}: present {value.name} is read inside the graph")
            value = users[0].node.outputs[0]

    # -- per op ----------------------------------------------------------------------------------
    def head_dim_from(self, width: int | None, heads: int) -> int:
        if not heads or width is None or width % heads:
            raise NotRecognised(f"{self.node.op_type} {self.node.name}: width {width} is not {heads} heads")
        return width // heads

    def block(self) -> AttentionBlock:
        node = self.node
        op = (node.domain if node.domain not in ("", "ai.onnx") else "ai.onnx") + "::" + node.op_type
        heads = kv_heads = 0
        explicit_kv = True  # the op itself pairs query heads with KV heads (no repeat in the graph)
        if op == f"{MS}::MultiHeadAttention":
            found, heads = self._mha()
            explicit_kv = False
        elif op == f"{MS}::GroupQueryAttention":
            found, heads, kv_heads = self._gqa()
        elif op == f"{MS}::Attention":
            found, heads = self._ms_attention()
            kv_heads = heads
        elif op == "ai.onnx::Attention":
            found, heads, kv_heads = self._onnx_attention()
            explicit_kv = heads != kv_heads  # equal counts: the graph may repeat KV heads before it
        else:
            raise NotRecognised(f"fused {op} is not handled")
        self.values.update(o.name for o in node.outputs if o is not None)
        self.role = "o"
        out = node.outputs[0]
        weight, axis, anchor = self.output(out, *((1, 3) if value_rank(out) == 4 else (-1, -1)))
        hd = self.head_dim
        if not explicit_kv:  # MultiHeadAttention: KV heads are what the graph repeats, if it does
            kv_heads = self.widths["k"] // hd if self.repeats else heads
            if self.repeats != {"k", "v"} and self.repeats:
                raise NotRecognised("only one of k/v is repeated")
        elif self.repeats:
            raise NotRecognised(f"{op} {node.name}: KV heads repeated before an op that repeats them")
        if self.widths["q"] != heads * hd or self.widths["k"] != kv_heads * hd or self.widths["v"] != kv_heads * hd:
            raise NotRecognised(f"{op} {node.name}: q/k/v widths {self.widths} are not {heads}/{kv_heads} heads of {hd}")
        if heads % kv_heads:
            raise NotRecognised(f"{heads} query heads not a multiple of {kv_heads} KV heads")
        single = heads == kv_heads and not self.repeats  # one count: every unit is a query head

        def fix(terms: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
            return tuple((Q, f) for _, f in terms) if single else terms

        if single:
            found = {r: dataclasses.replace(p, unit=Q) for r, p in found.items()}
        edits = [
            ShapeEdit(n, i, pos, fix(tuple(t for role in sorted(by_role) for t in by_role[role])))
            for (n, i, pos), by_role in sorted(self.edits.items())
        ]
        attrs = tuple(dataclasses.replace(e, entries=tuple(fix(t) for t in e.entries)) for e in self.attr_edits)
        cache = tuple(dataclasses.replace(c, unit=Q if single else c.unit) for _, c in sorted(self.cache.items()))
        if explicit_kv:
            group_fixed = None if heads != kv_heads else "no grouped-query attention"
        else:
            group_fixed = "; ".join(self.group_fixed) if self.group_fixed else (None if self.repeats else "no repeat of KV heads")
        block = AttentionBlock(
            layer=0, scope=node_scope(node), num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
            projections=tuple(found[r] for r in ("q", "k", "v")), output_weight=weight, output_axis=axis,
            anchor=anchor, shape_edits=tuple(edits), cache=cache, values=tuple(sorted(self.values)),
            group_edits=tuple(e for _, e in sorted(self.group_edits.items())), group_fixed=group_fixed,
            attr_edits=attrs, op=op,
        )
        check_edits(node.graph, block)
        return block

    def _attr(self, name: str, *terms: tuple[str, int]) -> None:
        self.attr_edits.append(AttrEdit(self.node.name, name, (terms,)))

    def _mha(self) -> tuple[dict[str, Projection], int]:
        node = self.node
        heads = _int(node, "num_heads")
        q, k, v = (_input(node, i) for i in range(3))
        if k is None or v is None:
            raise NotRecognised(f"MultiHeadAttention {node.name}: packed QKV input")
        self.head_dim = self.head_dim_from(static_dim(q, -1), heads) if value_rank(q) == 3 else static_dim(q, -1)
        found = {"q": self.trace("q", q, Q), "k": self.trace("k", k, Q), "v": self.trace("v", v, Q)}
        bias = _input(node, 3)
        if bias is not None:
            view = resolve_param(bias)
            if view is None or view.rank != 1:
                raise NotRecognised(f"MultiHeadAttention {node.name}: bias is not a constant vector")
            offset = 0
            for role in ("q", "k", "v"):
                if found[role].bias is not None:
                    raise NotRecognised(f"MultiHeadAttention {node.name}: {role} has two biases")
                found[role] = dataclasses.replace(found[role], bias=view.name, bias_offset=offset)
                offset += self.widths[role]
        self.no_per_head(5, "attention_bias")
        if _input(node, 9) is not None:
            raise NotRecognised(f"MultiHeadAttention {node.name}: beam-search cache indirection")
        self.no_output(3, "the QK output")
        for index in (6, 7):
            self.past(index, 1, Q)
        for index in (1, 2):
            self.present(index, 1, Q)
        self._attr("num_heads", (Q, 1))
        return found, heads

    def _gqa(self) -> tuple[dict[str, Projection], int, int]:
        node = self.node
        heads, kv_heads = _int(node, "num_heads"), _int(node, "kv_num_heads")
        q, k, v = (_input(node, i) for i in range(3))
        if _input(node, 11) is not None:
            raise NotRecognised(f"GroupQueryAttention {node.name}: per-head sink input")
        if value_rank(q) != 3:
            raise NotRecognised(f"GroupQueryAttention {node.name}: query of rank {value_rank(q)}")
        if k is None and v is None:
            self.head_dim = self.head_dim_from(static_dim(q, -1), heads + 2 * kv_heads)
            found = dict(zip("qkv", self.packed(q, heads, kv_heads), strict=True))
        else:
            self.head_dim = self.head_dim_from(static_dim(q, -1), heads)
            found = {"q": self.trace("q", q, Q), "k": self.trace("k", k, KV), "v": self.trace("v", v, KV)}
        self.no_per_head(10, "attention_bias")
        self.no_output(3, "the QK output")
        for index in (3, 4):
            self.past(index, 1, KV)
        for index in (1, 2):
            self.present(index, 1, KV)
        self._attr("num_heads", (Q, 1))
        self._attr("kv_num_heads", (KV, 1))
        return found, heads, kv_heads

    def _ms_attention(self) -> tuple[dict[str, Projection], int]:
        node = self.node
        heads = _int(node, "num_heads")
        weight, bias = resolve_param(node.inputs[1]), resolve_param(_input(node, 2)) if _input(node, 2) is not None else None
        if weight is None or weight.rank != 2:
            raise NotRecognised(f"Attention {node.name}: weights are not a constant matrix")
        if _input(node, 2) is not None and (bias is None or bias.rank != 1):
            raise NotRecognised(f"Attention {node.name}: bias is not a constant vector")
        sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
        total = weight.shape[1]
        sizes = list(sizes) if sizes else [total // 3] * 3
        if sum(sizes) != total or len(set(sizes)) != 1:
            raise NotRecognised(f"Attention {node.name}: q/k/v widths {sizes} differ (or do not fill {total})")
        self.head_dim = self.head_dim_from(sizes[0], heads)
        found = {}
        for i, role in enumerate("qkv"):
            found[role] = Projection(role, Q, weight.name, weight.perm[1], sum(sizes[:i]),
                                     bias.name if bias is not None else None, sum(sizes[:i]))
            self.widths[role] = sizes[i]
        if _int(node, "past_present_share_buffer"):
            raise NotRecognised(f"Attention {node.name}: past and present share one buffer")
        self.no_per_head(5, "attention_bias")
        self.past(4, 2, Q)
        self.present(1, 2, Q)
        self._attr("num_heads", (Q, 1))
        if node.attributes.get_ints("qkv_hidden_sizes", None):
            self.attr_edits.append(AttrEdit(node.name, "qkv_hidden_sizes", (((Q, self.head_dim),),) * 3, is_list=True))
        return found, heads

    def _onnx_attention(self) -> tuple[dict[str, Projection], int, int]:
        node = self.node
        q, k, v = (_input(node, i) for i in range(3))
        if value_rank(q) == 3:
            heads, kv_heads = _int(node, "q_num_heads"), _int(node, "kv_num_heads")
            self.head_dim = self.head_dim_from(static_dim(q, -1), heads)
        else:
            heads, kv_heads, self.head_dim = static_dim(q, 1), static_dim(k, 1), static_dim(q, -1)
            if None in (heads, kv_heads, self.head_dim):
                raise NotRecognised(f"Attention {node.name}: unknown head counts of 4-D inputs")
        kv_unit = KV if heads != kv_heads else Q  # equal counts: as MultiHeadAttention (repeat-KV in the graph)
        found = {"q": self.trace("q", q, Q), "k": self.trace("k", k, kv_unit), "v": self.trace("v", v, kv_unit)}
        self.no_per_head(3, "attn_mask")
        self.no_output(3, "qk_matmul_output")
        for index in (4, 5):
            self.past(index, 1, kv_unit)
        for index in (1, 2):
            self.present(index, 1, kv_unit)
        if value_rank(q) == 3:
            self._attr("q_num_heads", (Q, 1))
            self._attr("kv_num_heads", (kv_unit, 1))
        return found, heads, kv_heads
