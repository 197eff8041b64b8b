"""Per-junction routing of a residual stream: which basis every stream value lives in
(pure analysis, no graph change).

With one transform per norm junction (SliceGPT, the DOTResize paper's ``T_j = Q_j R_j``) the
stream between junctions lives in junction-specific bases. Each norm junction ``k`` (in graph
order) is a *slot*; the rule that assigns every value of the residual group to a slot:

* a junction's stream input, its norm-internal values and its output (and pass-through views
  of the output up to the linear readers) are in that junction's slot;
* any other stream value has exactly one use that writes the stream (a residual ``Add``, a
  bias ``Add``, a ``Cast``...) and takes that use's output slot: a block output lives in the
  basis of the junction its sum reaches next.

A residual ``Add`` input whose slot differs from the output's is a *skip*: the rewrite maps it
with ``S = Q_fromᵀ·Q_to`` (SliceGPT's shortcut matrix). A writer weight (embedding table,
out-projection, down-projection, their biases) writes in the slot of the value it produces.
Anything else (a stream value that is a graph output, a per-channel scale on the stream, a
fused Skip norm, a basis change through an op other than ``Add``) is reported in ``frozen``.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from graphresize.analysis.channels import (
    CONSUMER,
    NORM_WEIGHT,
    PRODUCER,
    SHAPE_READERS,
    VECTOR,
    resolve_param,
)
from graphresize.analysis.residual import PASS_THROUGH, ResidualLayout

SUM_OPS = frozenset({"Add", "Sum"})


@dataclasses.dataclass(frozen=True)
class Writer:
    """Initializer ``name`` writes stream features on axis ``axis`` into slot ``slot``."""

    name: str
    axis: int
    slot: int


@dataclasses.dataclass(frozen=True)
class Skip:
    """Input ``index`` of sum node ``node`` carries the stream from slot ``source`` into a sum
    in slot ``target``."""

    node: str
    index: int
    source: int
    target: int


@dataclasses.dataclass(frozen=True)
class JunctionRoute:
    """The slots of one residual group: ``slots[name]`` for every stream value, the writers,
    the skips and the Reshape nodes (with the slot of the width they name); ``frozen`` says
    why per-junction routing cannot apply (None when it can)."""

    group_id: str
    width: int
    layout: ResidualLayout
    slots: dict[str, int]
    writers: tuple[Writer, ...]
    skips: tuple[Skip, ...]
    reshapes: tuple[tuple[str, int], ...]
    frozen: str | None

    @property
    def count(self) -> int:
        """The number of slots (norm junctions)."""
        return len(self.layout.junctions)

    def skip_parameters(self, widths: list[int] | tuple[int, ...]) -> int:
        """Elements of the skip matrices for per-slot widths ``widths``."""
        return sum(widths[s.source] * widths[s.target] for s in self.skips)


def junction_route(graph: ir.Graph, group, layout: ResidualLayout) -> JunctionRoute:
    """The per-junction route of residual ``group`` (a ``WidthGroup``) with ``layout``."""
    problems: list[str] = [layout.frozen] if layout.frozen else []
    names = set(group.values)
    values = _values(graph)
    nodes = {node.name: node for node in graph}
    slots: dict[str, int] = {}
    for k, junction in enumerate(layout.junctions):
        if len(junction.stream) != 1:
            problems.append(f"{junction.form} {junction.node}: fused Skip norms are not routed per junction")
            continue
        slots[junction.stream[0]] = k
        for node_name in junction.nodes:
            for out in nodes[node_name].outputs:
                if out.name in names:
                    slots[out.name] = k
        pending = [values[junction.output]] if junction.output in values else []
        while pending:  # views of the norm output on the way to the readers
            value = pending.pop()
            slots[value.name] = k
            pending.extend(u.node.outputs[0] for u in value.uses()
                           if u.node.op_type in PASS_THROUGH and u.node.outputs[0].name in names)
    for name in sorted(names):
        if name not in values:
            continue
        problem = _resolve(values[name], names, slots)
        if problem:
            problems.append(problem)
            break
    writers = _writers(graph, group, slots, names, problems)
    skips = _skips(graph, names, slots, problems)
    reshapes = []
    for node_name in group.reshapes:
        node = nodes[node_name]
        candidates = [v.name for v in (*node.outputs, node.inputs[0]) if v is not None and v.name in slots]
        if candidates:
            reshapes.append((node_name, slots[candidates[0]]))
        else:
            problems.append(f"Reshape {node_name}: no stream value")
    frozen = "; ".join(dict.fromkeys(problems[:2])) or None
    return JunctionRoute(group.id, group.width, layout, slots, tuple(writers), tuple(skips), tuple(reshapes), frozen)


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        values.update((out.name, out) for out in node.outputs)
    return values


def _resolve(value: ir.Value, names: set[str], slots: dict[str, int]) -> str | None:
    """Assign ``value`` (and the values on its way) the slot of its one stream-writing use."""
    chain = []
    while value.name not in slots:
        if value.is_graph_output():
            return f"stream value {value.name} is a graph output"
        uses = [u for u in value.uses() if u.node.op_type not in SHAPE_READERS
                and any(o.name in names for o in u.node.outputs)]
        if len(uses) != 1:
            return f"stream value {value.name} feeds {len(uses)} stream ops and no norm"
        chain.append(value)
        value = next(o for o in uses[0].node.outputs if o.name in names)
        if len(chain) > 10_000:
            return f"stream value {value.name}: a cycle"
    for item in chain:
        slots[item.name] = slots[value.name]
    return None


def _writers(graph: ir.Graph, group, slots: dict[str, int], names: set[str], problems: list[str]) -> list[Writer]:
    """Producer and vector parameters with the slot of the stream value their node writes."""
    roles: dict[str, set[str]] = {}
    for ref in group.params:
        roles.setdefault(ref.name, set()).add(ref.role)
    axis_of = {ref.name: ref.axis for ref in group.params if ref.role in (PRODUCER, VECTOR)}
    for name, found in roles.items():
        if {PRODUCER, CONSUMER} <= found or (found & {PRODUCER, VECTOR} and NORM_WEIGHT in found):
            problems.append(f"{name} both writes and reads the stream (tied)")
    written: dict[str, set[int]] = {}
    for node in graph:
        outs = [o.name for o in node.outputs if o.name in slots]
        if not outs:
            continue
        for inp in node.inputs:
            view = resolve_param(inp)
            if view is None or view.name not in axis_of:
                continue
            if VECTOR in roles[view.name] and PRODUCER not in roles[view.name] and node.op_type not in SUM_OPS | {"Gemm"}:
                problems.append(f"{node.op_type} {node.name}: a per-channel {node.op_type} on the stream does not commute with a rotation")
            written.setdefault(view.name, set()).add(slots[outs[0]])
    result = []
    for name, axis in sorted(axis_of.items()):
        found = written.get(name, set())
        if len(found) != 1:
            problems.append(f"{name} writes into {len(found)} junction bases")
            continue
        result.append(Writer(name, axis, found.pop()))
    return result


def _skips(graph: ir.Graph, names: set[str], slots: dict[str, int], problems: list[str]) -> list[Skip]:
    """Inputs of sums whose slot differs from the sum's; any other op changing slot is refused."""
    found = []
    for node in graph:
        out = next((o for o in node.outputs if o.name in slots), None)
        if out is None:
            continue
        for index, inp in enumerate(node.inputs):
            if inp is None or inp.name not in slots or slots[inp.name] == slots[out.name]:
                continue
            if node.op_type not in SUM_OPS:
                problems.append(f"{node.op_type} {node.name} changes junction basis")
                continue
            found.append(Skip(node.name, index, slots[inp.name], slots[out.name]))
    return found
