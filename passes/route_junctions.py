"""Route a residual stream through one orthonormal basis per norm junction, with the change of
basis on the skip path (SliceGPT's shortcut matrices)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import (
    new_initializer,
    retarget_reshape,
    set_dim,
    set_initializer,
    values_by_name,
)
from graphresize.passes.rescale_norms import RescaleNormsPass
from graphresize.passes.resize_groups import transform_axis

from graphresize.analysis.junctions import JunctionRoute
from graphresize.solve.junctions import JunctionBases


class RouteJunctionsPass(ir.passes.InPlacePass):
    """Rule, for each residual group with a route and bases ``Q_k`` (D×d_k):

    * readers of junction ``k`` (γ already folded) read ``Q_kᵀ·W``;
    * writers into slot ``k`` (embedding table, out/down projections, their biases) write
      ``W·Q_k``;
    * input ``i`` of a sum that carries slot ``a`` into slot ``b`` gets a ``MatMul`` by the
      initializer ``S = Q_aᵀ·Q_b`` (d_a×d_b) in front: the skip re-expressed in ``Q_b``;
    * junction ``k``'s norm keeps its (uniform) gain on ``d_k`` features and is rescaled to
      divide by ``D`` (``RescaleNormsPass`` per junction); stream values and Reshape targets
      get the width of their slot.

    With every ``d_k = D`` the outputs are unchanged (each skip becomes the rotation that
    connects the two bases). Weights keep their dtype.
    """

    def __init__(self, routes: Sequence[JunctionRoute], bases: Sequence[JunctionBases]) -> None:
        super().__init__()
        self.routes = tuple(routes)
        self.bases = {b.group_id: b for b in bases}
        self.skip_matrices: list[str] = []  # names of the added skip initializers

    def requires(self, model: ir.Model) -> None:
        for route in self.routes:
            if route.frozen:
                raise ir.passes.PreconditionError(f"{route.group_id} cannot be routed per junction: {route.frozen}")
            bases = self.bases.get(route.group_id)
            if bases is None or len(bases.bases) != route.count or bases.width != route.width:
                raise ir.passes.PreconditionError(f"{route.group_id}: need {route.count} bases of width {route.width}")
            for junction in route.layout.junctions:
                if junction.gain is not None:
                    gain = model.graph.initializers[junction.gain].const_value.numpy()
                    if np.ptp(gain) != 0:
                        raise ir.passes.PreconditionError(f"{route.group_id}: norm gain {junction.gain} is not folded")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for route in self.routes:
            self._route(graph, route, self.bases[route.group_id])
            widths = self.bases[route.group_id].widths
            single = [dataclasses.replace(route.layout, group_id=f"{route.group_id}#{k}", junctions=(j,), readers=(r,))
                      for k, (j, r) in enumerate(zip(route.layout.junctions, route.layout.readers, strict=True))]
            RescaleNormsPass(single, {f"{route.group_id}#{k}": (route.width, w) for k, w in enumerate(widths)})(model)
        return ir.passes.PassResult(model, modified=bool(self.routes))

    def _route(self, graph: ir.Graph, route: JunctionRoute, bases: JunctionBases) -> None:
        q = bases.bases
        for k, (junction, readers) in enumerate(zip(route.layout.junctions, route.layout.readers, strict=True)):
            for reader in readers:
                _map(graph, reader.weight, reader.axis, q[k].T, reads=True)
            if junction.gain is not None:
                gain = graph.initializers[junction.gain].const_value.numpy()
                set_initializer(graph, junction.gain, _first(gain, q[k].shape[1]))
        for writer in route.writers:
            _map(graph, writer.name, writer.axis, q[writer.slot], reads=False)
        values = values_by_name(graph)
        nodes = {node.name: node for node in graph}
        for skip in route.skips:
            node = nodes[skip.node]
            x = node.inputs[skip.index]
            dtype = x.dtype or ir.DataType.FLOAT
            matrix = new_initializer(graph, f"{skip.node}.skip{skip.index}", bases.skip(skip.source, skip.target).astype(dtype.numpy()))
            self.skip_matrices.append(matrix.name)
            mul = ir.node("MatMul", [x, matrix], name=f"{skip.node}.skip{skip.index}")
            mul.outputs[0].name = f"{x.name}.to_slot{skip.target}.{skip.node}"
            mul.outputs[0].dtype = x.dtype
            if x.shape is not None:
                mul.outputs[0].shape = ir.Shape(x.shape.dims)
                set_dim(mul.outputs[0], -1, q[skip.target].shape[1])
            graph.insert_before(node, mul)
            node.replace_input_with(skip.index, mul.outputs[0])
        for name, slot in route.slots.items():
            if name in values:
                set_dim(values[name], -1, q[slot].shape[1])
        for node_name, slot in route.reshapes:
            retarget_reshape(graph, nodes[node_name], q[slot].shape[1])


def _first(gain: np.ndarray, size: int) -> np.ndarray:
    """A uniform gain vector of the same value on ``size`` features."""
    flat = gain.reshape(-1)
    return np.full(gain.shape[:-1] + (size,), flat[0], dtype=gain.dtype)


def _map(graph: ir.Graph, name: str, axis: int, matrix: np.ndarray, *, reads: bool) -> None:
    array = graph.initializers[name].const_value.numpy()
    set_initializer(graph, name, transform_axis(array, axis, matrix, reads=reads).astype(array.dtype))
