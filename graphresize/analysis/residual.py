"""Residual-stream layout: the norm junctions of a residual group and the linear maps that
read each junction's output (pure analysis).

A residual group can be routed (``QR``, rotation, selection) when every place the stream is
read goes through a recognised norm junction whose output feeds only linear maps with
constant weights (possibly through shape-only ops). A norm whose output is itself the stream
(post-norm, BERT) or feeds anything else freezes the group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir

from graphresize.analysis.channels import CONSUMER, SHAPE_READERS, resolve_param
from graphresize.analysis.norms import NormJunction

# Ops between a norm output and its linear readers that keep the last axis as it is.
PASS_THROUGH = frozenset({"Reshape", "Identity", "Squeeze", "Unsqueeze"})
LINEAR = frozenset({"MatMul", "Gemm"})


@dataclasses.dataclass(frozen=True)
class Reader:
    """A linear map reading a norm output: ``node`` multiplies by initializer ``weight``,
    whose axis ``axis`` reads the stream features; ``bias`` is the initializer added to its
    output (Gemm ``C`` or a following ``Add``), None when there is none."""

    node: str
    weight: str
    axis: int
    bias: str | None


@dataclasses.dataclass(frozen=True)
class ResidualLayout:
    """The junctions of one residual group, their readers (one tuple per junction), and why
    the group cannot be routed (None when it can)."""

    group_id: str
    junctions: tuple[NormJunction, ...]
    readers: tuple[tuple[Reader, ...], ...]
    frozen: str | None

    @property
    def kind(self) -> str | None:
        kinds = {j.kind for j in self.junctions}
        return kinds.pop() if len(kinds) == 1 else None

    def gains(self) -> set[str]:
        return {name for j in self.junctions for name in (j.gain, j.bias) if name}


def residual_layout(graph: ir.Graph, group, norms: Iterable[NormJunction]) -> ResidualLayout:
    """The layout of a residual ``WidthGroup`` (its ``id``, ``values`` and ``params``)."""
    names = set(group.values)
    junctions = tuple(j for j in norms if set(j.stream) & names)
    nodes = {node.name: node for node in graph}
    readers, problems = [], []
    for junction in junctions:
        found, problem = _readers(nodes[junction.nodes[-1]], junction)
        readers.append(found)
        if problem:
            problems.append(problem)
    if any(j.gain is None for j in junctions if j.kind == "rms"):
        problems.append("an RMS norm without a gain (nothing to rescale)")
    if not junctions:
        problems.append("no norm junction reads the stream")
    elif len({j.kind for j in junctions}) > 1:
        problems.append("both LayerNorm and RMSNorm read the stream")
    problems.extend(_unrecognised_reductions(graph, names, junctions))
    read = {(r.weight, r.axis) for found in readers for r in found}
    for ref in group.params:
        if ref.role == CONSUMER and (ref.name, ref.axis) not in read:
            problems.append(f"{ref.name} reads the stream without a norm")
            break
    return ResidualLayout(group.id, junctions, tuple(readers), "; ".join(problems[:2]) or None)


def _readers(last: ir.Node, junction: NormJunction) -> tuple[tuple[Reader, ...], str | None]:
    output = next(v for v in last.outputs if v.name == junction.output)
    if output.is_graph_output():
        return (), f"norm output {output.name} is a graph output"
    found: list[Reader] = []
    pending = [output]
    while pending:
        value = pending.pop()
        for use in sorted(value.uses(), key=lambda u: (u.node.name or "", u.idx)):
            node = use.node
            if node.op_type in SHAPE_READERS:
                continue  # reads the shape only
            if node.op_type in PASS_THROUGH and use.idx == 0:
                pending.append(node.outputs[0])
            elif node.op_type in LINEAR and use.idx == 0:
                reader = _reader(node)
                if reader is None:
                    return (), f"{node.op_type} {node.name} reads a norm output with a non-constant weight"
                found.append(reader)
            else:
                what = "the stream itself (post-norm)" if node.op_type in ("Add", "Sum") else "not a linear map"
                return (), f"{node.op_type} {node.name} reads norm output {junction.output}: {what}"
    return tuple(found), None


def _reader(node: ir.Node) -> Reader | None:
    view = resolve_param(node.inputs[1])
    if view is None or view.rank != 2 or node.attributes.get_int("transA", 0):
        return None
    in_axis = 1 if node.attributes.get_int("transB", 0) else 0
    bias = None
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias_view = resolve_param(node.inputs[2])
        if bias_view is None:
            return None
        bias = bias_view.name
    else:
        uses = list(node.outputs[0].uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add":
            add = uses[0].node
            other = add.inputs[1 - uses[0].idx]
            other_view = resolve_param(other)
            if other_view is not None and other_view.rank == 1:
                bias = other_view.name
    return Reader(node.name, view.name, view.perm[in_axis], bias)


def _unrecognised_reductions(graph: ir.Graph, names: set[str], junctions) -> list[str]:
    """Reductions over a stream value that no junction explains (a norm in a form we do not
    recognise, e.g. a decomposed LayerNorm)."""
    known = {n for j in junctions for n in j.nodes}
    problems = []
    for node in graph:
        reads_stream = node.inputs and node.inputs[0] is not None and node.inputs[0].name in names
        if node.op_type.startswith("Reduce") and node.name not in known and reads_stream:
            problems.append(f"unrecognised normalisation at {node.name}")
    return problems[:1]
