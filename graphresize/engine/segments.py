"""Cut a prepared model into segments at its residual-stream junctions (analysis; reads only).

Rules:

* The *cuts* are the values the norm junctions normalise (``NormJunction.stream``, see
  ``analysis/norms.py``), in graph order: the embedding output, then the output of every
  residual ``Add`` that a norm reads. Segment ``k`` computes cut ``k+1`` from cut ``k``
  (attention or MLP sub-block); the last segment (the head) computes the first graph output
  from the last cut.
* Every node is one of three kinds, from what it reads: *const* (initializers and constants
  only: copied into every sub-model that reads it), *side* (graph inputs, not the stream:
  attention mask, position ids, rotary cos/sin, the embedding ``Gather`` itself; run once per
  window batch by the side model, whose outputs are fed to the segments), *stream* (the first
  cut or anything computed from it). A stream node belongs to the first segment whose cut it
  feeds; nodes that feed neither a cut nor the first output (present key/value outputs) are
  left out.
* A segment's inputs are the values its nodes read that it does not compute: its cut, side
  values, graph inputs, and values of earlier segments (a ``Shape`` of the stream, say). The
  engine carries each of those until the last segment that reads it.

Graphs with subgraph attributes (If/Loop) or two-value (Skip) junctions are not cut
(``SegmentError``); the engine then runs the model whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir

from graphresize.analysis.norms import find_norms

CONST, SIDE, STREAM = 0, 1, 2


class SegmentError(ValueError):
    """The model cannot be cut into segments (the reason is the message)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """One ORT-runnable piece: ``nodes`` in graph order (const nodes it reads included),
    ``inputs`` (values fed), ``initializers`` (names), the cut it starts from and ends at
    (``stream_out`` None for the head)."""

    index: int
    nodes: tuple[ir.Node, ...]
    inputs: tuple[str, ...]
    initializers: tuple[str, ...]
    stream_in: str
    stream_out: str | None

    def produces(self) -> set[str]:
        return {v.name for node in self.nodes for v in node.outputs if v is not None}


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentCut:
    """The side model (``side``: nodes, inputs = graph inputs, outputs = the side values the
    segments read) and the segments in stream order; ``output``: the graph output the head
    computes."""

    side: Segment
    side_outputs: tuple[str, ...]
    segments: tuple[Segment, ...]
    output: str

    def readers_after(self, k: int) -> set[str]:
        """Values read by segments after ``k`` (what must be carried past segment ``k``)."""
        return {name for seg in self.segments[k + 1 :] for name in seg.inputs}


def stream_cuts(model: ir.Model) -> list[str]:
    """The junction stream values in graph order (each once); without norms, the residual
    values that an embedding ``Gather`` or a residual ``Add`` writes (the residual width
    groups of ``analysis/groups.py``), in graph order."""
    cuts: list[str] = []
    for junction in find_norms(model.graph):
        if len(junction.stream) != 1:
            raise SegmentError(f"norm {junction.node} adds two streams (a Skip norm): not cut into segments")
        if junction.stream[0] not in cuts:
            cuts.append(junction.stream[0])
    if cuts:
        return cuts
    from graphresize.analysis.groups import find_groups

    stream = {v for g in find_groups(model).of_kind("residual") for v in g.values}
    cuts = [v.name for node in model.graph if node.op_type in ("Add", "Gather") for v in node.outputs if v.name in stream]
    if len(cuts) < 2:
        raise SegmentError("no norm junction or residual stream: nothing to cut at")
    return cuts


def cut_model(model: ir.Model) -> SegmentCut:
    """The segments of ``model`` (see the module docstring for the rules)."""
    graph = model.graph
    nodes = list(graph)
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for node in nodes for attr in node.attributes.values()):
        raise SegmentError("the graph has subgraphs (If/Loop): not cut into segments")
    if not graph.outputs:
        raise SegmentError("the graph has no outputs")
    cuts = stream_cuts(model)
    output = graph.outputs[0].name
    kind = _kinds(nodes, cuts[0])
    producer = {v.name: node for node in nodes for v in node.outputs if v is not None}
    for name in (*cuts, output):
        if name not in producer:
            raise SegmentError(f"{name} is not computed by a node")
    if kind[id(producer[cuts[-1]])] != STREAM and len(cuts) > 1:
        raise SegmentError("the last junction does not read the stream")
    owner: dict[int, int] = {}  # id(node) -> segment index
    targets = [*cuts[1:], output]
    for k, target in enumerate(targets):
        pending = [producer[target]]
        while pending:
            node = pending.pop()
            if id(node) in owner or kind[id(node)] != STREAM:
                continue
            owner[id(node)] = k
            pending.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    if not any(v == len(targets) - 1 for v in owner.values()):
        raise SegmentError(f"the first output {output} does not depend on the stream")
    segments = []
    for k in range(len(targets)):
        members = [n for n in nodes if owner.get(id(n)) == k]
        segments.append(_segment(k, members, nodes, kind, cuts[k], targets[k] if k + 1 < len(targets) else None))
    computed = {name for seg in segments for name in seg.produces()}
    side_needed = {name for seg in segments for name in seg.inputs} - {v.name for v in graph.inputs} - computed
    side_outputs = tuple(sorted(side_needed))
    side_nodes = _ancestors([producer[n] for n in side_outputs if n in producer], stop=lambda n: kind[id(n)] == STREAM)
    side = _segment(-1, [n for n in nodes if id(n) in side_nodes], nodes, kind, "", None)
    missing = set(side_outputs) - side.produces()
    if missing:
        raise SegmentError(f"segment inputs not computed by the side model: {sorted(missing)[:3]}")
    return SegmentCut(side, side_outputs, tuple(segments), output)


def _kinds(nodes: list[ir.Node], root: str) -> dict[int, int]:
    """CONST / SIDE / STREAM per node: the highest kind of what it reads; the value ``root``
    (the first cut) counts as stream."""
    value_kind: dict[str, int] = {}
    kind: dict[int, int] = {}
    for node in nodes:
        k = CONST
        for value in node.inputs:
            if value is None or value.name == "":
                continue
            if value.name in value_kind:
                k = max(k, value_kind[value.name])
            elif value.is_graph_input():
                k = max(k, SIDE)
        kind[id(node)] = k
        for value in node.outputs:
            if value is not None:
                value_kind[value.name] = STREAM if value.name == root else k
    return kind


def _ancestors(starts: Iterable[ir.Node], stop) -> set[int]:
    """ids of ``starts`` and every node they read from, not crossing nodes where ``stop``."""
    seen: set[int] = set()
    pending = list(starts)
    while pending:
        node = pending.pop()
        if id(node) in seen or stop(node):
            continue
        seen.add(id(node))
        pending.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return seen


def _segment(index: int, members: list[ir.Node], nodes: list[ir.Node], kind: dict[int, int], stream_in: str,
             stream_out: str | None) -> Segment:
    """``members`` plus the const nodes they read, their fed inputs and initializers."""
    chosen = {id(n) for n in members}
    chosen |= _ancestors(
        [v.producer() for n in members for v in n.inputs if v is not None and v.producer() is not None and kind[id(v.producer())] == CONST],
        stop=lambda n: kind[id(n)] != CONST,
    )
    ordered = tuple(n for n in nodes if id(n) in chosen)
    produced = {v.name for n in ordered for v in n.outputs if v is not None}
    inputs, inits = [], []
    for node in ordered:
        for value in node.inputs:
            if value is None or value.name == "" or value.name in produced:
                continue
            if value.is_initializer() or (value.producer() is None and value.const_value is not None and not value.is_graph_input()):
                if value.name not in inits:
                    inits.append(value.name)
            elif value.name not in inputs:
                inputs.append(value.name)
    return Segment(index, ordered, tuple(inputs), tuple(inits), stream_in, stream_out)
