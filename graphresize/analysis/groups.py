"""Width groups: connected components of the channel graph, classified by structure."""

from __future__ import annotations

import dataclasses
from collections import Counter

import networkx as nx
import onnx_ir as ir

from graphresize.analysis import channels
from graphresize.analysis.channels import CONSUMER, NORM_WEIGHT, PRODUCER, VOCAB
from graphresize.analysis.norms import find_norms
from graphresize.analysis.residual import residual_layout

KINDS = ("residual", "mlp", "heads", "vocab", "other")
# Kinds this version can resize; the others are reported and left unchanged.
RESIZABLE_KINDS = frozenset({"mlp", "residual"})


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """One axis of one initializer in a group, and how the graph uses it."""

    name: str
    axis: int
    role: str  # producer | consumer | vector | norm_weight | vocab


@dataclasses.dataclass(frozen=True)
class WidthGroup:
    """Tensor axes that must change width together.

    ``anchor`` is the activation whose statistics drive the solve (the input of the consumer
    linear maps); ``reshapes`` are Reshape nodes whose target shape names the width.
    """

    id: str
    kind: str
    layer: int | None
    width: int
    params: tuple[ParamRef, ...]
    values: tuple[str, ...]
    anchor: str | None
    reshapes: tuple[str, ...]
    scope: str
    frozen: str | None = None

    @property
    def resizable(self) -> bool:
        return self.frozen is None


@dataclasses.dataclass(frozen=True)
class WidthGroups:
    """All groups of a model, in graph order within each kind."""

    groups: tuple[WidthGroup, ...]

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def of_kind(self, kind: str) -> tuple[WidthGroup, ...]:
        return tuple(g for g in self.groups if g.kind == kind)

    def resizable(self, kinds: frozenset[str] | set[str] = RESIZABLE_KINDS) -> tuple[WidthGroup, ...]:
        return tuple(g for g in self.groups if g.kind in kinds and g.resizable)

    def by_id(self, group_id: str) -> WidthGroup:
        for group in self.groups:
            if group.id == group_id:
                return group
        raise KeyError(group_id)

    def counts(self) -> dict[str, int]:
        return dict(Counter(g.kind for g in self.groups))


def find_groups(model: ir.Model) -> WidthGroups:
    """Width groups of ``model`` (pure: reads the graph, changes nothing).

    Expects value shapes to be known (run shape inference first, as ``prepare`` does).
    """
    graph = model.graph
    cg = channels.build_channel_graph(graph)
    index = _GraphIndex(graph)
    norms = find_norms(graph)
    gains = {name for j in norms for name in (j.gain, j.bias) if name}
    found = []
    for component in nx.connected_components(cg):
        keys = sorted(component, key=str)
        if not any(k[0] == "param" for k in keys):
            continue  # a space no weight touches: nothing to resize
        found.append(_describe(index, cg, keys, gains))
    found.sort(key=lambda item: (KINDS.index(item["kind"]), item["order"]))
    groups, per_kind = [], Counter()
    for item in found:
        kind = item.pop("kind")
        item.pop("order")
        layer = per_kind[kind] if kind == "mlp" else None
        group = WidthGroup(id=f"{kind}.{per_kind[kind]}", kind=kind, layer=layer, **item)
        if kind == "residual" and group.frozen is None:
            layout = residual_layout(graph, group, norms)
            if layout.frozen:
                group = dataclasses.replace(group, frozen=layout.frozen)
        groups.append(group)
        per_kind[kind] += 1
    return WidthGroups(tuple(groups))


class _GraphIndex:
    """What the group descriptions look up, gathered in one walk over the graph: the first
    node writing each value, and the activations each weight is read against as a linear map's
    second operand."""

    def __init__(self, graph: ir.Graph) -> None:
        self.size = len(graph)
        self.writer: dict[str, ir.Node] = {}
        self.linear_inputs: dict[str, set[str]] = {}
        for node in graph:
            for out in node.outputs:
                self.writer.setdefault(out.name, node)
            if node.op_type in ("MatMul", "FusedMatMul", "Gemm") and len(node.inputs) > 1:
                view = channels.resolve_param(node.inputs[1])
                if view is not None:
                    self.linear_inputs.setdefault(view.name, set()).add(node.inputs[0].name)
        self.position = {id(node): i for i, node in enumerate(graph)}
        # initializers that are also graph inputs: defaults a caller may replace, so their
        # shapes are part of the model's public interface
        self.public = {v.name for v in graph.inputs if v.is_initializer()}


def _describe(index: _GraphIndex, cg: nx.Graph, keys: list[tuple], gains: set[str]) -> dict:
    data = cg.nodes
    params, values = [], []
    for key in keys:
        if key[0] == "param":
            roles = data[key]["roles"] - {"other"} or {"other"}
            if key[1] in gains:  # a norm gain or bias, also where the norm is decomposed
                roles = {NORM_WEIGHT}
            params.extend(ParamRef(key[1], key[2], role) for role in sorted(roles))
        else:
            values.append(key[1])
    marks = set().union(*(data[k]["marks"] for k in keys))
    roles = {p.role for p in params}
    stops = channels.stops_of(cg, keys)

    if "heads" in marks:
        kind = "heads"
    elif marks & {"norm", "reduce", "embedding"} or NORM_WEIGHT in roles:
        kind = "residual"
    elif VOCAB in roles or ("output" in marks and CONSUMER not in roles):
        kind = "vocab"
    elif marks & {"input", "output"}:
        kind = "residual"  # a stream read and written by blocks that reaches the graph's edge
    elif PRODUCER in roles and CONSUMER in roles:
        kind = "mlp"
    else:
        kind = "other"

    widths = channels.widths_of(cg, keys)
    if len(widths) != 1:
        stops.append(f"inconsistent widths {sorted(widths)}")
    conflicts = sorted(
        {p.name for p in params if {PRODUCER, CONSUMER} <= data[("param", p.name, p.axis)]["roles"]}
    )
    if conflicts and kind != "residual":  # a tied embedding / LM head is untied when resized
        stops.append(f"one weight both writes and reads the group (tied): {conflicts[0]}")
    public = sorted({p.name for p in params} & index.public)
    if public:
        stops.append(f"weight {public[0]} is also a graph input (a caller may feed it; its shape is public)")
    axes_per_weight = Counter(name for name, _ in {(p.name, p.axis) for p in params})
    if any(c > 1 for c in axes_per_weight.values()):
        stops.append("a weight has two axes in the group")

    anchor = _anchor(index, params, values)
    if kind == "mlp" and anchor is None:
        stops.append("the consumers read different tensors")
    if kind not in ("mlp", "residual") and not stops:
        stops.append(_not_yet(kind))

    order = min((data[k]["order"] for k in keys if data[k]["order"] >= 0), default=index.size)
    return {
        "kind": kind,
        "order": order,
        "width": min(widths) if widths else 0,
        "params": tuple(params),
        "values": tuple(values),
        "anchor": anchor,
        "reshapes": tuple(sorted(set().union(*(data[k]["reshapes"] for k in keys)))),
        "scope": _scope(index, params, values),
        "frozen": "; ".join(stops[:3]) if stops else None,
    }


def _anchor(index: _GraphIndex, params: list[ParamRef], values: list[str]) -> str | None:
    """The one activation all consumer linear maps read, if there is exactly one."""
    value_names = set(values)
    read = set()
    for name in {p.name for p in params if p.role == CONSUMER}:
        read |= index.linear_inputs.get(name, set()) & value_names
    return read.pop() if len(read) == 1 else None


def _scope(index: _GraphIndex, params: list[ParamRef], values: list[str]) -> str:
    """A readable location: the exporter's module scope of the first node writing the group,
    else its node name."""
    writers = [index.writer[v] for v in values if v in index.writer]
    if not writers:
        return params[0].name if params else ""
    node = min(writers, key=lambda n: index.position[id(n)])
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    parts = [p.strip(" '\"") for p in (scopes or "").strip("[]").split(",")]
    if len(parts) > 1:  # module path; the last entry is the fx node name
        return parts[-2]
    return node.name or ""


def _not_yet(kind: str) -> str:
    return {
        "heads": "attention widths change by whole heads only (--ratio-heads), not as a width group",
        "vocab": "vocabulary width is fixed by the tokenizer",
        "other": "no rule to resize this group",
    }.get(kind, "not resizable")
