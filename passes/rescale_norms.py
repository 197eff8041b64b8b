"""Re-express RMS norms over a narrowed stream so they still divide by the original width."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import new_initializer, set_initializer

from graphresize.analysis.residual import ResidualLayout


class RescaleNormsPass(ir.passes.InPlacePass):
    """Rule: an RMS norm that read ``D`` features and now reads ``d`` computes
    ``x / √(‖x‖²/d + ε)``; with ``ε' = ε·D/d`` and gain ``γ' = γ·√(D/d)`` it equals
    ``x / √(‖x‖²/D + ε)·γ``, the norm over the original width (DOTResize's condition for the
    orthonormal part ``Q`` to pass through the norm). ``widths`` maps a group id to
    ``(D, d)``.
    """

    def __init__(self, layouts: Sequence[ResidualLayout], widths: Mapping[str, tuple[int, int]]) -> None:
        super().__init__()
        self.layouts = tuple(layouts)
        self.widths = dict(widths)

    def requires(self, model: ir.Model) -> None:
        for layout in self.layouts:
            if layout.kind != "rms":
                raise ir.passes.PreconditionError(f"{layout.group_id}: stream is not read through RMS norms")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        modified = False
        for layout in self.layouts:
            width, new_width = self.widths[layout.group_id]
            if width == new_width:
                continue
            factor = width / new_width
            for junction in layout.junctions:
                if junction.gain is not None:
                    gain = graph.initializers[junction.gain].const_value.numpy()
                    set_initializer(graph, junction.gain, (gain.astype(np.float64) * np.sqrt(factor)).astype(gain.dtype))
                if junction.eps_value is None:
                    node = nodes[junction.node]
                    node.attributes["epsilon"] = ir.AttrFloat32("epsilon", junction.epsilon * factor)
                else:
                    add = nodes[junction.nodes[2]]
                    index = next(i for i, v in enumerate(add.inputs) if v.name == junction.eps_value)
                    old = np.asarray(ir.convenience.get_const_tensor(add.inputs[index]).numpy())
                    eps = new_initializer(graph, f"{junction.eps_value}.{add.name}", (old * factor).astype(old.dtype))
                    add.replace_input_with(index, eps)
                modified = True
        return ir.passes.PassResult(model, modified=modified)
