"""What the allocation reads from the graph (reads only): parameters per neuron, the consumer
map of each MLP group, the transformer-block parameter count, and the residual stream each
MLP reads (to request its energy as a calibration statistic).

Transformer-block parameters ``B`` = every floating-point initializer's elements except the
vocabulary tables (any weight with an axis in a ``vocab`` group: the embedding, the LM head,
counted once when tied). Skip matrices, when a method adds them, are ordinary initializers
and count.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphresize.analysis.channels import CONSUMER, FLOAT_TYPES, PRODUCER, resolve_param
from graphresize.analysis.groups import WidthGroup, WidthGroups
from graphresize.analysis.norms import find_norms, junctions_by_output
from graphresize.calibrate.statistics import GroupStats, StatRequest
from graphresize.plan.allocation import GroupCurve, error_curve

STREAM_KEY = "alloc.stream."


def _initializer(model: ir.Model, name: str) -> ir.Value:
    return model.graph.initializers[name]


def block_parameters(model: ir.Model, groups: WidthGroups) -> int:
    """``B``: float initializer elements outside the vocabulary tables (module docstring)."""
    vocab = {p.name for g in groups.of_kind("vocab") for p in g.params}
    return sum(
        int(np.prod(v.const_value.shape))
        for name, v in model.graph.initializers.items()
        if v.const_value is not None and v.dtype in FLOAT_TYPES and name not in vocab
    )


def params_per_channel(model: ir.Model, group: WidthGroup) -> int:
    """Elements one channel of ``group`` holds over its weights (each weight axis once)."""
    total = 0
    for name, axis in sorted({(p.name, p.axis) for p in group.params}):
        shape = _initializer(model, name).const_value.shape
        total += int(np.prod(shape)) // int(shape[axis])
    return total


def consumer_matrix(model: ir.Model, group: WidthGroup) -> np.ndarray:
    """The group's consumer weights as one ``width × n`` matrix (rows = channels)."""
    blocks = []
    for name, axis in sorted({(p.name, p.axis) for p in group.params if p.role == CONSUMER}):
        array = _initializer(model, name).const_value.numpy()
        blocks.append(np.moveaxis(array, axis, 0).reshape(group.width, -1))
    return np.concatenate(blocks, axis=1).astype(np.float64)


def mlp_groups(groups: WidthGroups, plan) -> list[WidthGroup]:
    """The MLP groups ``plan`` (a ``ResizePlan``) changes: the groups global allocation places."""
    return [groups.by_id(e.group_id) for e in plan.changed() if e.kind == "mlp"]


def mlp_streams(model: ir.Model, groups: list[WidthGroup]) -> dict[str, tuple[str, ...]]:
    """For each MLP group, the values whose sum is the residual stream at the norm junction its
    producers read (through Cast/Identity); groups whose input is not a norm are absent."""
    junctions = junctions_by_output(find_norms(model.graph))
    inputs: dict[str, ir.Value] = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "FusedMatMul", "Gemm") and len(node.inputs) > 1:
            view = resolve_param(node.inputs[1])
            if view is not None:
                inputs.setdefault(view.name, node.inputs[0])
    found = {}
    for group in groups:
        for name in sorted({p.name for p in group.params if p.role == PRODUCER}):
            value = inputs.get(name)
            while value is not None and value.name not in junctions:
                node = value.producer()
                value = node.inputs[0] if node is not None and node.op_type in ("Cast", "Identity") else None
            if value is not None:
                found[group.id] = junctions[value.name].stream
                break
    return found


def stream_requests(model: ir.Model, groups: list[WidthGroup]) -> list[StatRequest]:
    """One statistic per MLP group: the (un-normalised) stream its norm reads; its Gram's
    trace is the stream energy."""
    streams = mlp_streams(model, groups)
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    requests = []
    for gid, stream in streams.items():
        value = values.get(stream[0])
        if value is not None and value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
            requests.append(StatRequest(STREAM_KEY + gid, int(value.shape[-1]), (stream,)))
    return requests


def curve(model: ir.Model, group: WidthGroup, stats: dict[str, GroupStats]) -> GroupCurve:
    """One group's allocation inputs from its statistics (its Gram under ``group.id``, its
    stream's under ``STREAM_KEY + group.id``, absent: no stream found)."""
    stream = stats.get(STREAM_KEY + group.id)
    return GroupCurve(
        group_id=group.id,
        layer=group.layer,
        width=group.width,
        params_per_channel=params_per_channel(model, group),
        loss=error_curve(stats[group.id].gram, consumer_matrix(model, group)),
        stream_energy=float(np.trace(stream.gram)) if stream is not None else None,
    )


def curves(model: ir.Model, groups: list[WidthGroup], stats: dict[str, GroupStats]) -> list[GroupCurve]:
    """The allocation inputs of ``groups`` from their calibration statistics."""
    return [curve(model, group, stats) for group in groups]
