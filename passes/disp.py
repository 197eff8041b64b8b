"""DISP rewrite: blocks read and write their own subsets of a full-width residual stream."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import (
    new_initializer,
    private_weight,
    retarget_reshape,
    set_initializer,
)
from graphresize.passes.resize_groups import transform_axis

from graphresize.analysis.residual import Reader, ResidualLayout
from graphresize.solve.disp import DispSelection, Subset, Writer

#: ``Pad`` takes its pads as an input from opset 11 (an attribute before).
PAD_INPUT_OPSET = 11
#: ``GatherElements`` exists from opset 11; below it the spread is a ``Gather`` (one index, no Expand).
GATHER_ELEMENTS_OPSET = 11
#: ``Shape`` takes ``start``/``end`` from opset 15.
SHAPE_END_OPSET = 15


def _contiguous(keep: tuple[int, ...]) -> bool:
    return keep[-1] - keep[0] + 1 == len(keep)


def _narrow_shape(shape: ir.Shape | None, width: int) -> ir.Shape | None:
    if shape is None or len(shape) == 0:
        return None
    return ir.Shape([*list(shape)[:-1], width])


def _take(graph: ir.Graph, node: ir.Node, index: int, axis: int, keep: tuple[int, ...], zero: int = 0) -> None:
    """Keep the slices ``keep`` of ``node``'s input ``index`` along ``axis``, then ``zero``
    zero slices (the zero column, or zero block, a scattered write gathers for the channels
    it does not write)."""
    weight = private_weight(graph, node, index)
    array = np.take(np.asarray(weight.const_value.numpy()), list(keep), axis=axis)
    if zero:
        shape = list(array.shape)
        shape[axis] = zero
        array = np.concatenate([array, np.zeros(shape, dtype=array.dtype)], axis=axis)
    set_initializer(graph, weight.name, array)


def _aligned(keep: tuple[int, ...], block: int) -> bool:
    """``keep`` is a union of whole aligned blocks ``[k·block, (k+1)·block)``."""
    if block <= 1 or len(keep) % block:
        return False
    starts = keep[::block]
    return all(a % block == 0 and tuple(keep[i * block:(i + 1) * block]) == tuple(range(a, a + block)) for i, a in enumerate(starts))


def _block_gather(graph: ir.Graph, value: ir.Value, rank: int, blocks: np.ndarray, block: int, width: int, name: str) -> list[ir.Node]:
    """``Reshape(Gather(Reshape(value, [..., n, block]), blocks, axis=-2), [..., width])``: whole
    blocks of ``block`` features of ``value``'s last axis, in the order ``blocks``; ``Reshape``
    copies the leading dimensions (``0``). The last node's output is the result."""
    view = new_initializer(graph, f"{name}.view", np.array([0] * (rank - 1) + [-1, block], dtype=np.int64))
    flat = new_initializer(graph, f"{name}.flat", np.array([0] * (rank - 1) + [width], dtype=np.int64))
    index = new_initializer(graph, f"{name}.blocks", np.asarray(blocks, dtype=np.int64))
    split = ir.node("Reshape", [value, view], name=f"{name}.view")
    split.outputs[0].name = f"{name}.view.out"
    gather = ir.node("Gather", [split.outputs[0], index], attributes={"axis": rank - 1}, name=f"{name}.gather")
    gather.outputs[0].name = f"{name}.gather.out"
    merge = ir.node("Reshape", [gather.outputs[0], flat], name=name)
    for node in (split, gather, merge):
        node.outputs[0].dtype = value.dtype
    return [split, gather, merge]


class DispPass(ir.passes.InPlacePass):
    """Rule (after the norm gains are folded into the readers, so every junction output is
    the plain normalised stream ``n``):

    * a block input with subset ``S_in``: each reader ``n·W`` becomes ``n[..., S_in]·(R·W)``,
      ``R`` the site's readout (|S_in|×D) from ``readouts``, by default the rows ``S_in`` of
      the identity (``W[S_in, :]``); the selection is ``Slice`` when ``S_in`` is contiguous,
      else ``GatherElements(axis=-1)`` with the index expanded to the output shape (``Gather``
      below opset 11); the expand's target shape ``[*lead, |S|]`` is built once per width from
      one ``Shape(end=-1)`` of the first selected stream (every junction output has the same
      leading dimensions), so each site adds only ``Expand`` + ``GatherElements``. The norm
      still normalises over the full width (as the released DISP code does);
    * a block writer with subset ``S_out``: ``x + (h·W + b)`` becomes
      ``x + spread(u)``, ``u = h·W[:, S_out] + b[S_out]``: ``x + Pad(u)`` when ``S_out`` is
      contiguous; else the writer also computes one zero column after the kept ones (a zero
      column of ``W`` and of ``b``: |S_out| + 1 outputs) and the write is
      ``x + GatherElements(u, Expand(inv))``, ``inv[c]`` the position of channel ``c`` in
      ``S_out`` or the zero column (``Gather`` with ``inv`` itself below opset 11): plain data
      movement before the ``Add``, bit-equal, any dtype, no opset raise. (The zero column was
      a ``Pad`` of ``u`` before: 2.0% of ORT's node time on SmolLM2 disp 0.3, for one more
      output column per writer, ~0.05% of the weights.) The ``Add`` stays, so ``optimize --fuse`` still fuses it with the
      next norm into ``SkipSimplifiedLayerNormalization``. (An in-place
      ``ScatterElements(reduction="add")``, which touches only the written columns, was the
      fp32 form before: on SmolLM2 at 0.3 it ran 5% slower per prompt than this one, since
      ORT's add-scatter is slow and it leaves no ``Add`` to fuse; benchmarks/speed.md.) Index
      constants are int32 (half the bytes the ``Expand`` writes) and the expand shapes are
      shared as for the reads (one cache per side);
    * a full-width subset emits nothing.

    Which form: a subset that is one range ``[a, b)`` of the stream's current order is read
    by ``Slice`` and written by ``Pad`` + ``Add`` (``optimize --fuse`` fuses that ``Add`` with
    the next norm into ``SkipSimplifiedLayerNormalization``, so the write costs one ``Pad``);
    any other subset by the index forms above. The pass itself never reorders the stream: the caller
    (``methods.disp.apply_disp``) first permutes it once, exactly (embedding columns, every
    reader's rows, every writer's columns, the final norm and the LM head; RMSNorm is
    invariant under a permutation of its features), whenever one order makes every subset a
    range (``solve.disp.range_order``: always for nested subsets, prefixes of one order), and
    passes the selection re-indexed into that order.

    Exact when every dropped input feature has zero reader rows and every dropped output
    feature is zero; otherwise the DISP approximation.
    """

    def __init__(
        self,
        layout: ResidualLayout,
        writers: Sequence[Writer],
        selection: DispSelection,
        readouts: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.writers = tuple(writers)
        self.selection = selection
        self.readouts = dict(readouts or {})

    def requires(self, model: ir.Model) -> None:
        n = len(self.selection.inputs)
        if n > len(self.layout.junctions) or len(self.selection.outputs) != len(self.writers):
            raise ir.passes.PreconditionError("DISP selection does not match the layout")
        for junction in self.layout.junctions[:n]:
            gain = model.graph.initializers.get(junction.gain) if junction.gain else None
            if junction.bias or (gain is not None and not np.all(gain.const_value.numpy() == 1)):
                raise ir.passes.PreconditionError(f"junction {junction.output}: fold the norm gain and bias first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        opset = model.opset_imports.get("", 1)
        # one cache per side: each side visits its sites in graph order, so a shared Shape is
        # always taken from the earliest of its values (a read's Shape used by an earlier write
        # would make a cycle)
        reads, writes = (_ExpandShapes(graph, f"{self.selection.group_id}.disp_{side}", opset) for side in ("in", "out"))
        modified = False
        for subset, readers in zip(self.selection.inputs, self.layout.readers, strict=False):
            if subset.width < self.selection.width:
                self._select_inputs(graph, nodes, subset, readers, opset, reads)
                modified = True
        for subset, writer in zip(self.selection.outputs, self.writers, strict=True):
            if subset.width < self.selection.width:
                self._select_outputs(graph, nodes, subset, writer, opset, writes)
                modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _blocked(self, keep: tuple[int, ...], stream: ir.Value) -> bool:
        """Read or write ``keep`` by whole blocks: the selection is blocked, ``keep`` a union of
        aligned blocks and the stream's rank known."""
        block = self.selection.block
        return block > 1 and self.selection.width % block == 0 and stream.shape is not None and _aligned(keep, block)

    def _select_inputs(
        self, graph: ir.Graph, nodes: dict, subset: Subset, readers: Sequence[Reader], opset: int, shapes: _ExpandShapes,
    ) -> None:
        keep = subset.keep
        selected: dict[int, ir.Value] = {}
        for reader in readers:
            node = nodes[reader.node]
            source = node.inputs[0]
            if id(source) not in selected:
                prelude: list[ir.Node] = []
                name = f"{subset.site}.disp_in.{len(selected)}"
                if _contiguous(keep):
                    starts = new_initializer(graph, f"{name}.starts", np.array([keep[0]], dtype=np.int64))
                    ends = new_initializer(graph, f"{name}.ends", np.array([keep[-1] + 1], dtype=np.int64))
                    axes = new_initializer(graph, f"{name}.axes", np.array([-1], dtype=np.int64))
                    new = ir.node("Slice", [source, starts, ends, axes], name=name)
                elif self._blocked(keep, source):
                    *prelude, new = _block_gather(graph, source, len(source.shape), np.array(keep[:: self.selection.block]) // self.selection.block,
                                                  self.selection.block, len(keep), name)
                else:
                    index = new_initializer(graph, f"{name}.index", np.array(keep, dtype=np.int32))
                    new = ir.node("Gather", [source, index], attributes={"axis": -1}, name=name)
                    if opset >= 11:  # GatherElements with an expanded index: ~3x faster than Gather on ORT CPU
                        target = shapes.get(source, node, len(keep))
                        expand = ir.node("Expand", [index, target], name=f"{name}.expand")
                        expand.outputs[0].name = f"{name}.expand.out"
                        new = ir.node("GatherElements", [source, expand.outputs[0]], attributes={"axis": -1}, name=name)
                        prelude = [expand]
                out = new.outputs[0]
                out.name, out.dtype, out.shape = f"{name}.out", source.dtype, _narrow_shape(source.shape, len(keep))
                graph.insert_before(node, [*prelude, new])
                selected[id(source)] = out
            node.replace_input_with(0, selected[id(source)])
            readout = self.readouts.get(subset.site)
            if readout is None:
                _take(graph, node, 1, reader.axis, keep)
            else:
                weight = private_weight(graph, node, 1)
                array = np.asarray(weight.const_value.numpy())
                set_initializer(graph, weight.name, transform_axis(array, reader.axis, readout, reads=True))

    def _select_outputs(self, graph: ir.Graph, nodes: dict, subset: Subset, writer: Writer, opset: int, shapes: _ExpandShapes) -> None:
        keep = subset.keep
        width = self.selection.width
        node, add = nodes[writer.node], nodes[writer.add]
        stream = add.inputs[writer.stream_index]
        scattered = not _contiguous(keep)
        blocked = scattered and self._blocked(keep, stream)
        zero = self.selection.block if blocked else int(scattered)
        columns = len(keep) + zero  # a scattered write's writer also computes the zero column (block)
        _take(graph, node, 1, writer.axis, keep, zero=zero)
        narrowed = [node.outputs[0]]
        if writer.bias_add is not None:
            bias_add = nodes[writer.bias_add]
            for idx, value in enumerate(bias_add.inputs):
                if value is not node.outputs[0]:
                    _take(graph, bias_add, idx, -1, keep, zero=zero)
            narrowed.append(bias_add.outputs[0])
        elif writer.bias is not None:
            _take(graph, node, 2, -1, keep, zero=zero)
        if writer.reshape is not None:
            retarget_reshape(graph, nodes[writer.reshape], columns)
            narrowed.append(nodes[writer.reshape].outputs[0])
        for value in narrowed:
            value.shape = _narrow_shape(value.shape, columns)
        update = add.inputs[1 - writer.stream_index]
        name = f"{writer.node}.disp_out"
        rank = len(stream.shape) if stream.shape is not None else (len(update.shape) if update.shape is not None else None)
        if rank is None:
            raise ir.passes.PreconditionError(f"writer {writer.node}: the stream's rank is unknown")
        if not scattered:
            pad = _pad(graph, update, rank, keep[0], width - keep[-1] - 1, f"{name}.pad", opset)
            graph.insert_before(add, pad)
            add.replace_input_with(1 - writer.stream_index, pad.outputs[0])
            return
        if blocked:
            block = self.selection.block
            inverse = np.full(width // block, len(keep) // block, dtype=np.int64)  # the zero block
            inverse[np.array(keep[::block]) // block] = np.arange(len(keep) // block)
            *prelude, spread = _block_gather(graph, update, rank, inverse, block, width, name)
        else:
            prelude, spread = self._spread_elements(graph, update, stream, add, keep, name, opset, shapes)
        out = spread.outputs[0]
        out.name = f"{name}.spread"
        if (update.dtype or stream.dtype) is not None:
            out.dtype = update.dtype or stream.dtype
        if out.dtype is not None and update.shape is not None:
            out.shape = _narrow_shape(update.shape, width)
        graph.insert_before(add, [*prelude, spread])
        add.replace_input_with(1 - writer.stream_index, spread.outputs[0])

    def _spread_elements(
        self, graph: ir.Graph, update: ir.Value, stream: ir.Value, add: ir.Node, keep: tuple[int, ...], name: str, opset: int,
        shapes: _ExpandShapes,
    ) -> tuple[list[ir.Node], ir.Node]:
        """``GatherElements(update, Expand(inv))`` (``Gather(update, inv)`` below opset 11):
        channel ``c`` of the stream from its position in ``keep``, or from the zero column."""
        width = self.selection.width
        inverse = np.full(width, len(keep), dtype=np.int32)  # the zero column
        inverse[list(keep)] = np.arange(len(keep))
        index = new_initializer(graph, f"{name}.index", inverse)
        if opset >= GATHER_ELEMENTS_OPSET:
            expand = ir.node("Expand", [index, shapes.get(stream, add, width)], name=f"{name}.expand")
            expand.outputs[0].name = f"{name}.indices"
            spread = ir.node("GatherElements", [update, expand.outputs[0]], attributes={"axis": -1}, name=name)
            prelude = [expand]
        else:
            spread = ir.node("Gather", [update, index], attributes={"axis": -1}, name=name)
            prelude = []
        return prelude, spread


def _pad(graph: ir.Graph, value: ir.Value, rank: int, before: int, after: int, name: str, opset: int) -> ir.Node:
    """Zero ``Pad`` of the last axis by ``before``/``after`` columns (pads as an input from
    opset 11, as an attribute before)."""
    pads = np.zeros(2 * rank, dtype=np.int64)
    pads[rank - 1], pads[2 * rank - 1] = before, after
    if opset >= PAD_INPUT_OPSET:
        node = ir.node("Pad", [value, new_initializer(graph, f"{name}s", pads)], name=name)
    else:
        node = ir.node("Pad", [value], attributes={"pads": [int(p) for p in pads]}, name=name)
    out = node.outputs[0]
    out.name = f"{name}ded"
    if value.dtype is not None:  # an unknown dtype stays unset (a typeless TensorType does not serialize)
        out.dtype = value.dtype
    if value.dtype is not None and value.shape is not None and len(value.shape) == rank:
        last = value.shape[-1]
        out.shape = _narrow_shape(value.shape, last + before + after) if isinstance(last, int) else None
    return node


class _ExpandShapes:
    """The ``[*lead, k]`` shapes GatherElements' index is expanded to. Stream values whose
    leading dimensions are known to be the same (equal static sizes or equal named symbols,
    e.g. ``[batch, sequence]``) share one ``Shape(end=-1)`` of the first of them (``Shape``
    then ``Slice`` below opset 15, where Shape has no ``end``), and one
    ``Concat`` per width ``k``; a value with an unknown or unnamed leading dimension gets its
    own. Each is placed before the reader that first needs it (the graph is sorted
    topologically afterwards, ``cleanup_passes``)."""

    def __init__(self, graph: ir.Graph, name: str, opset: int) -> None:
        self.graph = graph
        self.name = name
        self.opset = opset
        self.leads: dict[object, ir.Value] = {}
        self.shapes: dict[tuple[object, int], ir.Value] = {}

    @staticmethod
    def _key(source: ir.Value) -> object:
        shape = source.shape
        if shape is None or len(shape) < 2:
            return id(source)
        dims = []
        for dim in list(shape)[:-1]:
            if isinstance(dim, int):
                dims.append(dim)
            elif isinstance(dim, ir.SymbolicDim) and dim.value:
                dims.append(f"sym:{dim.value}")
            else:
                return id(source)
        return tuple(dims)

    def get(self, source: ir.Value, before: ir.Node, width: int) -> ir.Value:
        key = self._key(source)
        new: list[ir.Node] = []
        if key not in self.leads:
            name = f"{self.name}.lead{len(self.leads)}"
            if self.opset >= SHAPE_END_OPSET:
                lead = ir.node("Shape", [source], attributes={"end": -1}, name=name)
                new.append(lead)
            else:  # Shape then Slice(0, -1)
                full = ir.node("Shape", [source], name=f"{name}.full")
                full.outputs[0].name = f"{name}.full.out"
                bounds = [new_initializer(self.graph, f"{name}.{k}", np.array([v], dtype=np.int64)) for k, v in (("start", 0), ("end", -1))]
                lead = ir.node("Slice", [full.outputs[0], *bounds], name=name)
                new.extend([full, lead])
            lead.outputs[0].name = f"{name}.out"
            self.leads[key] = lead.outputs[0]
        if (key, width) not in self.shapes:
            name = f"{self.name}.shape{len(self.shapes)}"
            size = new_initializer(self.graph, f"{name}.size", np.array([width], dtype=np.int64))
            shape = ir.node("Concat", [self.leads[key], size], attributes={"axis": 0}, name=name)
            shape.outputs[0].name = f"{name}.out"
            self.shapes[(key, width)] = shape.outputs[0]
            new.append(shape)
        if new:
            self.graph.insert_before(before, new)
        return self.shapes[(key, width)]
