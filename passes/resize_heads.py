"""Keep a chosen subset of attention heads in each attention block."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import set_dim, values_by_name

from graphresize.analysis.attention.heads import KV, REP, AttentionBlock, Q, shape_vector
from graphresize.solve.heads import HeadSelection


def _without_ints(value: ir.Value) -> ir.Shape | None:
    """``value``'s shape with its int entries unknown and its named ones (batch, sequence) kept,
    since a head count never changes those: ONNX shape inference (with :class:`ReshapeDimsPass`
    for the ``-1`` of a head split) puts the ints back and the named ones still match the mask's.
    None (the whole shape dropped) behind a non-ONNX op, which ONNX shape inference skips and
    ONNX Runtime's symbolic inference (``ContribShapeInferencePass``) re-infers only when unknown."""
    node = value.producer()
    if value.shape is None or (node is not None and node.domain not in ("", "ai.onnx")):
        return None
    return ir.Shape([None if isinstance(d, int) else d for d in value.shape])


def kept_features(heads: tuple[int, ...], head_dim: int, offset: int = 0) -> list[int]:
    """Feature indices of ``heads`` (head ``h`` owns ``h·hd .. (h+1)·hd``) from ``offset``."""
    return [offset + h * head_dim + i for h in heads for i in range(head_dim)]


class ResizeHeadsPass(ir.passes.InPlacePass):
    """Rule: for each block with a selection, q/k/v keep the columns (and bias entries) of the
    kept heads of their unit (query heads for q, KV heads for k/v; under GQA every kept KV
    head keeps the same number of its own query heads), the output projection
    keeps the rows of the kept query heads (or takes the selection's refitted rows), every
    recorded shape constant (and the repeat count, when it changes) is recomputed from the new counts (a private copy: other readers
    keep theirs), so are the head-count attributes of fused attention ops, KV-cache inputs/outputs keep their names with the new head count, and the
    static entries of the block's activation shapes are dropped (:func:`_without_ints`).
    Head dimension and RoPE are untouched.
    """

    def __init__(self, blocks: tuple[AttentionBlock, ...], selections: Mapping[int, HeadSelection]) -> None:
        super().__init__()
        self.blocks = {b.layer: b for b in blocks}
        self.selections = {k: s for k, s in selections.items() if s.changes(self.blocks[k])}

    def requires(self, model: ir.Model) -> None:
        inits = model.graph.initializers
        for layer, sel in self.selections.items():
            block = self.blocks[layer]
            if not block.recognised:
                raise ir.passes.PreconditionError(f"attention {layer} was not recognised: {block.reason}")
            if not sel.keep_q or not sel.keep_kv:
                raise ir.passes.PreconditionError(f"attention {layer}: no head kept")
            rep, extra = divmod(len(sel.keep_q), len(sel.keep_kv))
            groups = [tuple(h for h in sel.keep_q if h // max(block.group_size, 1) == kv) for kv in sel.keep_kv]
            if extra or any(len(g) != rep for g in groups) or sum(groups, ()) != sel.keep_q:
                raise ir.passes.PreconditionError(f"attention {layer}: query heads do not follow their KV heads")
            if block.group_size > 1 and rep != block.group_size and block.group_fixed:
                raise ir.passes.PreconditionError(f"attention {layer}: query heads per KV head are fixed ({block.group_fixed})")
            if block.group_size <= 1 and sel.keep_q != sel.keep_kv:
                raise ir.passes.PreconditionError(f"attention {layer}: multi-head attention keeps q and kv heads together")
            for name in {p.weight for p in block.projections} | {block.output_weight}:
                if name not in inits or inits[name].const_value is None:
                    raise ir.passes.PreconditionError(f"attention {layer}: no initializer {name}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        values = values_by_name(graph)
        for layer, sel in self.selections.items():
            block = self.blocks[layer]
            keep = {Q: sel.keep_q, KV: sel.keep_kv}
            counts = {Q: len(sel.keep_q), KV: len(sel.keep_kv), REP: len(sel.keep_q) // len(sel.keep_kv)}
            self._slice_projections(graph, block, keep, sel.value_map)
            self._slice_output(graph, block, sel)
            edits: dict[tuple[str, int], dict[int, int]] = {}
            regroup = block.group_edits if counts[REP] != block.group_size else ()
            for edit in (*block.shape_edits, *regroup):
                edits.setdefault((edit.node, edit.input), {})[edit.position] = edit.value(counts)
            for (node_name, index), entries in edits.items():
                _set_shape_entries(graph, nodes[node_name], index, entries)
            for attr in block.attr_edits:
                _set_attribute(nodes[attr.node], attr.attribute, attr.value(counts))
            for cache in block.cache:
                set_dim(values[cache.name], cache.axis, counts[cache.unit])
            for name in block.values:
                value = values.get(name)
                if value is not None and not (value.is_graph_input() or value.is_graph_output()):
                    value.shape = _without_ints(value)
        return ir.passes.PassResult(model, modified=bool(self.selections))

    def ensures(self, model: ir.Model) -> None:
        inits = model.graph.initializers
        for layer, sel in self.selections.items():
            block = self.blocks[layer]
            out = inits[block.output_weight].const_value.shape[block.output_axis]
            if out != len(sel.keep_q) * block.head_dim:
                raise ir.passes.PostconditionError(f"attention {layer}: output projection reads {out} features")

    @staticmethod
    def _slice_projections(graph: ir.Graph, block: AttentionBlock, keep: dict[str, tuple[int, ...]],
                           value_map: np.ndarray | None = None) -> None:
        """Each weight (and bias) keeps the features of the kept heads of every projection it
        holds, or (v, merged heads) takes ``features · value_map``; a packed weight must be
        fully covered by its projections."""
        hd = block.head_dim
        by_weight: dict[tuple[str, int], list] = {}
        strides: dict[tuple[str, int], set[int]] = {}
        for p in block.projections:
            heads = block.num_heads if p.unit == Q else block.num_kv_heads
            mapped = value_map if p.role == "v" else None
            by_weight.setdefault((p.weight, p.axis), []).append((p.offset, heads, keep[p.unit], mapped))
            strides.setdefault((p.weight, p.axis), set()).add(p.stride)
            if p.bias is not None:
                by_weight.setdefault((p.bias, -1), []).append((p.bias_offset, heads, keep[p.unit], mapped))
                strides.setdefault((p.bias, -1), set()).add(p.stride)
        for (name, axis), segments in by_weight.items():
            value = graph.initializers[name]
            size = value.const_value.shape[axis]
            if sum(s[1] * hd for s in segments) != size:
                raise ValueError(f"{name}: projections cover {sum(s[1] * hd for s in segments)} of {size} features")
            segments.sort(key=lambda s: s[0])
            stride = strides[(name, axis)]
            if stride != {0}:  # per-head interleaved: each kept head keeps its whole block, in order
                kept = {s[2] for s in segments}
                if len(stride) != 1 or len(kept) != 1 or any(s[3] is not None for s in segments):
                    raise ValueError(f"{name}: interleaved heads need one stride, one kept set and no merged values")
                (step,), (heads_kept,) = stride, kept
                _take(value, axis, [h * step + o + i for h in heads_kept for o, *_ in segments for i in range(hd)])
                continue
            if all(s[3] is None for s in segments):
                _take(value, axis, [i for offset, _, kept, _ in segments for i in kept_features(kept, hd, offset)])
                continue
            blocks = []  # merged values: one map over the whole axis, block-diagonal by segment
            for _, heads, kept, mapped in segments:
                if mapped is None:
                    mapped = np.zeros((heads * hd, len(kept) * hd))
                    mapped[kept_features(kept, hd), np.arange(len(kept) * hd)] = 1.0
                blocks.append(mapped)
            full = np.zeros((size, sum(b.shape[1] for b in blocks)))
            row = col = 0
            for b in blocks:
                full[row : row + b.shape[0], col : col + b.shape[1]] = b
                row, col = row + b.shape[0], col + b.shape[1]
            old = value.const_value
            array = np.moveaxis(np.moveaxis(old.numpy().astype(np.float64), axis, -1) @ full, -1, axis)
            value.const_value = ir.tensor(array.astype(old.dtype.numpy()), dtype=old.dtype, name=value.name)
            value.shape = ir.Shape(array.shape)

    @staticmethod
    def _slice_output(graph: ir.Graph, block: AttentionBlock, sel: HeadSelection) -> None:
        value = graph.initializers[block.output_weight]
        if sel.output_rows is None:
            _take(value, block.output_axis, kept_features(sel.keep_q, block.head_dim))
            return
        array = value.const_value.numpy()
        rows = np.moveaxis(sel.output_rows, 0, block.output_axis).astype(array.dtype)
        value.const_value = ir.tensor(rows, dtype=value.const_value.dtype, name=value.name)
        value.shape = ir.Shape(rows.shape)


def _set_attribute(node: ir.Node, name: str, value: int | list[int]) -> None:
    attr = ir.AttrInt64s(name, value) if isinstance(value, list) else ir.AttrInt64(name, value)
    node.attributes[name] = attr



def _take(value: ir.Value, axis: int, index: list[int]) -> None:
    old = value.const_value
    array = np.take(old.numpy(), np.asarray(index, dtype=np.int64), axis=axis)
    value.const_value = ir.tensor(array, dtype=old.dtype, name=value.name)
    value.shape = ir.Shape(array.shape)



def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, n = name, 0
    while name in graph.initializers:
        n += 1
        name = f"{base}_{n}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.INT64
    graph.register_initializer(value)
    return value


def _set_shape_entries(graph: ir.Graph, node: ir.Node, index: int, entries: dict[int, int]) -> None:
    """Give ``node`` a private shape tensor at input ``index`` with ``entries`` replaced: a new
    constant, or a copy of the Concat that builds the shape with new constant pieces."""
    shape = node.inputs[index]
    vector = shape_vector(shape)
    assert vector is not None, node.name
    if ir.convenience.get_const_tensor(shape) is not None:
        array = np.array(vector, dtype=np.int64)
        for position, size in entries.items():
            array[position] = size
        node.replace_input_with(index, _constant(graph, f"{node.name}_heads_shape", array))
        return
    concat = shape.producer()
    pieces = list(concat.inputs)
    start = 0
    for i, piece in enumerate(concat.inputs):
        consts = shape_vector(piece) if ir.convenience.get_const_tensor(piece) is not None else None
        length = len(consts) if consts is not None else int(piece.shape[0])
        inside = {p - start: s for p, s in entries.items() if start <= p < start + length}
        if inside:
            array = np.array(consts, dtype=np.int64)
            for position, size in inside.items():
                array[position] = size
            pieces[i] = _constant(graph, f"{node.name}_heads_piece{i}", array)
        start += length
    copy = ir.node("Concat", pieces, attributes={"axis": 0}, name=f"{concat.name}_{node.name}_heads")
    copy.outputs[0].shape, copy.outputs[0].dtype = shape.shape, shape.dtype
    copy.outputs[0].name = f"{shape.name}_{node.name}_heads"
    graph.insert_before(node, copy)
    node.replace_input_with(index, copy.outputs[0])
