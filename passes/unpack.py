"""Unpack a packed linear map (one MatMul whose output is split in parts) into one per part."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import packed_matmul, replace_by_split

from graphresize.analysis.channels import constant_ints, resolve_param

#: Metadata key on an unpacked MatMul: ``"{packed weight name}:{part}/{parts}"``.
PACKED_KEY = "graphresize.packed"


def split_sizes(node: ir.Node, width: int) -> list[int] | None:
    """Sizes of a Split along the last axis of a ``width``-wide input, or None when the split is
    along another axis or its sizes are not constant."""
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else 0
    axis = node.attributes.get_int("axis", 0)
    if axis != -1 and (rank == 0 or axis % rank != rank - 1):
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = constant_ints(node.inputs[1])
    else:
        sizes = node.attributes.get_ints("split", None)
    if sizes is None:
        parts = node.attributes.get_int("num_outputs", len(node.outputs))
        if parts < 1 or width % parts:
            return None
        sizes = [width // parts] * parts
    sizes = list(sizes)
    return sizes if sum(sizes) == width and len(sizes) == len(node.outputs) else None


class UnpackSplitMatMulPass(ir.passes.InPlacePass):
    """Rule: ``Split(MatMul(x, W), axis=-1)`` with constant sizes, the Split being the MatMul's
    only reader, is the same as one ``MatMul(x, W[:, part])`` per part.

    Packed projections (Phi-3's ``gate_up_proj``, packed ``qkv_proj``) put several widths on
    one weight axis; unpacked, each part is an ordinary linear map whose output axis the
    channel rules can follow (the gate and up halves of an MLP then form one width group).
    Each new MatMul records its packed weight and part under ``PACKED_KEY``.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Split" or node.domain not in ("", "ai.onnx"):
                continue
            matmul = node.inputs[0].producer()
            if matmul is None or matmul.op_type != "MatMul" or len(node.inputs[0].uses()) != 1:
                continue
            weight = matmul.inputs[1]
            view = resolve_param(weight)
            if view is None or view.rank != 2 or weight.producer() is not None or len(weight.uses()) != 1:
                continue
            if any(v.is_graph_output() for v in (*matmul.outputs, *node.outputs)):
                continue
            sizes = split_sizes(node, view.shape[1])
            if sizes is None:
                continue
            self._unpack(graph, matmul, node, sizes)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _unpack(graph: ir.Graph, matmul: ir.Node, split: ir.Node, sizes: list[int]) -> None:
        weight = matmul.inputs[1]
        array = weight.const_value.numpy()
        start, renames = 0, []
        for part, (size, out) in enumerate(zip(sizes, split.outputs, strict=True)):
            name = f"{weight.name}.part{part}"
            piece = np.ascontiguousarray(array[:, start : start + size])
            start += size
            value = ir.Value(name=name, shape=ir.Shape(piece.shape), type=ir.TensorType(weight.dtype),
                             const_value=ir.tensor(piece, dtype=weight.dtype, name=name))
            graph.register_initializer(value)
            new = ir.node("MatMul", [matmul.inputs[0], value], name=f"{matmul.name}.part{part}")
            new.metadata_props.update(matmul.metadata_props)
            new.metadata_props[PACKED_KEY] = f"{weight.name}:{part}/{len(sizes)}"
            new.outputs[0].shape = out.shape
            new.outputs[0].type = out.type
            graph.insert_before(split, new)
            out.replace_all_uses_with(new.outputs[0])
            renames.append((new.outputs[0], out.name))
        graph.remove(split, safe=True)
        graph.remove(matmul, safe=True)
        for value, name in renames:
            value.name = name


class RepackSplitMatMulPass(ir.passes.InPlacePass):
    """Rule: the MatMuls ``UnpackSplitMatMulPass`` made from one packed weight, all still
    reading one input through plain 2-D weights, become one MatMul on the concatenated weight
    and a Split with the parts' current widths (one GEMM again for ONNX Runtime)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        packs: dict[tuple[int, str], dict[int, ir.Node]] = {}
        counts: dict[tuple[int, str], int] = {}
        for node in graph:
            tag = node.metadata_props.get(PACKED_KEY)
            if node.op_type != "MatMul" or not tag:
                continue
            name, _, part = tag.rpartition(":")
            index, _, total = part.partition("/")
            key = (id(node.inputs[0]), name)
            packs.setdefault(key, {})[int(index)] = node
            counts[key] = int(total)
        modified = False
        for key, parts in packs.items():
            nodes = [parts.get(i) for i in range(counts[key])]
            if None in nodes or not all(self._plain(n) for n in nodes):
                continue
            self._repack(graph, key[1], nodes, graph.opset_imports.get("", 18))
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _plain(node: ir.Node) -> bool:
        weight = node.inputs[1]
        return (
            weight.is_initializer() and weight.const_value is not None and len(weight.shape) == 2
            and len(weight.uses()) == 1 and not node.outputs[0].is_graph_output()
        )

    @staticmethod
    def _repack(graph: ir.Graph, name: str, nodes: list[ir.Node], opset: int) -> None:
        weights = [n.inputs[1] for n in nodes]
        array = np.concatenate([w.const_value.numpy() for w in weights], axis=1)
        while name in graph.initializers:
            name += ".packed"
        packed = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(weights[0].dtype),
                          const_value=ir.tensor(array, dtype=weights[0].dtype, name=name))
        graph.register_initializer(packed)
        sizes = [int(w.shape[1]) for w in weights]
        first = nodes[0]
        matmul = packed_matmul(first, packed, first.name.rsplit(".part", 1)[0])
        if opset >= 13:
            split_name = f"{name}.split"
            sizes_value = ir.Value(name=split_name, shape=ir.Shape([len(sizes)]), type=ir.TensorType(ir.DataType.INT64),
                                   const_value=ir.tensor(np.array(sizes, dtype=np.int64), name=split_name))
            graph.register_initializer(sizes_value)
            split = ir.node("Split", [matmul.outputs[0], sizes_value], attributes={"axis": -1},
                            num_outputs=len(nodes), name=f"{matmul.name}.split")
        else:
            split = ir.node("Split", [matmul.outputs[0]], attributes={"axis": -1, "split": sizes},
                            num_outputs=len(nodes), name=f"{matmul.name}.split")
        for new in (matmul, split):
            new.metadata_props.update({k: v for k, v in first.metadata_props.items() if k != PACKED_KEY})
        graph.insert_after(first, [matmul, split])  # the reading order is restored by a sort
        replace_by_split(graph, nodes, split)
