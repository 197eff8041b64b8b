"""Small graph edits shared by the rewrite passes (onnx_ir only; no rules here): one version
of each, public, so that no pass imports another's private helpers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphresize.analysis.channels import reshape_width_constant

# Metadata key on a weight copied by ``private_weight``: the name of the weight it was copied from.
UNTIED_FROM = "graphresize.untied_from"


def set_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> None:
    """Replace initializer ``name``'s data (cast to its dtype), keeping the value object."""
    value = graph.initializers[name]
    dtype = value.const_value.dtype
    value.const_value = ir.tensor(np.array(array, dtype=dtype.numpy(), order="C"), dtype=dtype, name=name)
    value.shape = ir.Shape(array.shape)


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """Register a new initializer under a free name derived from ``name``."""
    base, n = name, 0
    while name in graph.initializers:
        n += 1
        name = f"{base}.{n}"
    tensor = ir.tensor(np.array(array, order="C"), dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def private_weight(graph: ir.Graph, node: ir.Node, index: int) -> ir.Value:
    """The initializer behind ``node.inputs[index]`` (through Identity/Cast/Transpose), copied
    first when anything else uses it, so that editing it changes this node alone."""
    user, idx = node, index
    value = node.inputs[index]
    while value.const_value is None or not value.is_initializer():
        producer = value.producer()
        if producer is None or producer.op_type not in ("Identity", "Cast", "Transpose"):
            raise ValueError(f"{node.name}: input {index} is not a weight")
        if len(value.uses()) > 1:
            raise ValueError(f"{node.name}: weight view {value.name} is shared")
        user, idx, value = producer, 0, producer.inputs[0]
    if len(value.uses()) > 1 or value.is_graph_output():
        copy = new_initializer(graph, f"{value.name}.{node.name}", np.array(value.const_value.numpy(), copy=True),
                               value.const_value.dtype)
        copy.metadata_props[UNTIED_FROM] = value.name
        user.replace_input_with(idx, copy)
        return copy
    return value


def add_after(graph: ir.Graph, node: ir.Node, op_type: str, operands: list[ir.Value], name: str) -> ir.Node:
    """Insert ``op_type(node.outputs[0], *operands)`` after ``node`` and move every use of
    the output (a graph output included, name and all) to the new node's output."""
    out = node.outputs[0]
    uses = list(out.uses())
    new = ir.node(op_type, [out, *operands], name=name)
    result = new.outputs[0]
    result.shape, result.dtype = out.shape, out.dtype
    graph.insert_after(node, new)
    for use in uses:
        use.node.replace_input_with(use.idx, result)
    if out.is_graph_output():
        position = list(graph.outputs).index(out)
        graph.outputs[position] = result
        old_name = out.name
        out.name = f"{old_name}.before_{op_type.lower()}"
        result.name = old_name
    else:
        result.name = f"{out.name}.{op_type.lower()}"
    return new


def packed_matmul(first: ir.Node, packed: ir.Value, name: str) -> ir.Node:
    """``MatMul(x, packed)`` for the input ``x`` of ``first`` (one of the MatMuls being packed):
    its output has ``first``'s type and ``x``'s shape with the last axis the packed width."""
    x = first.inputs[0]
    matmul = ir.node("MatMul", [x, packed], name=name)
    matmul.outputs[0].type = first.outputs[0].type
    if x.shape is not None:
        matmul.outputs[0].shape = ir.Shape([*x.shape[:-1], int(packed.shape[-1])])
    return matmul


def replace_by_split(graph: ir.Graph, nodes: list[ir.Node], split: ir.Node) -> None:
    """Every use of ``nodes[i]``'s output goes to ``split.outputs[i]``, which takes its name,
    shape and type; then ``nodes`` and their weight initializers (input 1) leave the graph."""
    weights = [node.inputs[1].name for node in nodes]
    renames = []
    for node, out in zip(nodes, split.outputs, strict=True):
        old = node.outputs[0]
        out.shape, out.type = old.shape, old.type
        old.replace_all_uses_with(out)
        renames.append((out, old.name))
    for node in nodes:
        graph.remove(node, safe=True)
    for value, old_name in renames:
        value.name = old_name
    for name in weights:
        graph.initializers.pop(name, None)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every graph input and node output of ``graph`` by name."""
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        values.update((out.name, out) for out in node.outputs)
    return values


def unnamed_dim(dim) -> bool:
    """A shape entry with neither a size nor a name of its own: None, or a name ONNX shape
    inference invented (``unk__N``), which says nothing about other values' dimensions."""
    if isinstance(dim, int):
        return False
    return dim is None or dim.value is None or str(dim.value).startswith("unk__")


def set_dim(value: ir.Value, axis: int, size: int) -> None:
    """Set one dimension of ``value``'s shape (nothing when the shape is unknown or scalar)."""
    if value.shape is not None and len(value.shape) > 0:
        dims = list(value.shape.dims)
        dims[axis] = size
        value.shape = ir.Shape(dims)


def retarget_reshape(graph: ir.Graph, node: ir.Node, width: int) -> None:
    """Point the Reshape at a new constant whose last size is ``width``."""
    found = reshape_width_constant(node)
    assert found is not None, node.name
    constant, _ = found
    array = np.array(ir.convenience.get_const_tensor(constant).numpy(), copy=True)
    array.reshape(-1)[-1] = width
    # a free name: the Reshape may have been retargeted to this width before (e.g. back to the full width)
    new_value = new_initializer(graph, f"{node.name}_target_{width}", array, ir.DataType.INT64)
    if node.inputs[1] is constant:
        node.replace_input_with(1, new_value)
        return
    concat = node.inputs[1].producer()
    copy = ir.node("Concat", [*concat.inputs[:-1], new_value], attributes={"axis": 0}, name=f"{concat.name}_{node.name}")
    copy.outputs[0].shape, copy.outputs[0].dtype = node.inputs[1].shape, node.inputs[1].dtype
    graph.insert_before(node, copy)
    node.replace_input_with(1, copy.outputs[0])
