"""Whole-graph checks made before analysis, so that a graph no width rule can explain is refused
with its real reason instead of a misleading group reason.

Rules:

* the main graph is acyclic: a node that (through others) reads its own output is refused as
  a malformed file (``InputError``, exit 1), naming the nodes of one cycle;
* every node's operator domain is one ONNX Runtime knows (the domains of its registered
  operator schemas: the standard one, ``ai.onnx.ml``, ``com.microsoft`` ...) or a function the
  model defines; any other domain (a custom op library that is not loaded) is refused as
  unsupported (``UnsupportedModelError``, exit 3), naming the node.
"""

from __future__ import annotations

import functools

import networkx as nx
import onnx_ir as ir

from graphresize.errors import InputError, UnsupportedModelError

#: Used when ONNX Runtime cannot list its schemas.
_FALLBACK_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc"})


@functools.cache
def runtime_domains() -> frozenset[str]:
    """Operator domains ONNX Runtime has schemas for (``ai.onnx`` is the standard domain)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        return frozenset({s.domain for s in C.get_all_operator_schema()} | {"", "ai.onnx"})
    except Exception:  # an ORT build without the schema list
        return _FALLBACK_DOMAINS


def check_graph(model: ir.Model, path) -> None:
    """Raise for a cyclic main graph or an operator domain ONNX Runtime does not know."""
    check_acyclic(model.graph, path)
    check_domains(model, path)


def check_acyclic(graph: ir.Graph, path) -> None:
    edges = nx.DiGraph()
    for node in graph:
        edges.add_node(id(node))
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.graph is graph:
                edges.add_edge(id(producer), id(node))
    if nx.is_directed_acyclic_graph(edges):  # a topological sort, linear; find_cycle alone took
        return  # ~50 s on the 7,000 nodes of a TorchScript SmolLM2 export (its edge DFS restarts per node)
    cycle = nx.find_cycle(edges)
    names = {id(n): n.name or n.op_type for n in graph}
    loop = " -> ".join(names[a] for a, _ in cycle[:6]) + (" -> ..." if len(cycle) > 6 else f" -> {names[cycle[0][0]]}")
    raise InputError(f"{path}: the graph has a cycle ({loop}); an ONNX graph must be acyclic")


def check_domains(model: ir.Model, path) -> None:
    known = runtime_domains() | {f.domain for f in model.functions.values()}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in known:
            raise UnsupportedModelError(
                f"{path}: node {node.name!r} uses {node.domain}::{node.op_type}, a domain ONNX Runtime does not know "
                "(a custom operator library that is not loaded)"
            )
