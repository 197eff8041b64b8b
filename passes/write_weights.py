"""Write trained arrays back into the initializers they came from."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir


class WriteWeightsPass(ir.passes.InPlacePass):
    """Rule: each named initializer's tensor is replaced by the given array, cast to the
    initializer's own dtype; the name, shape and every reader stay as they were. An unknown
    name or another shape raises ``ValueError`` before anything is written."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.weights = weights

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        inits = model.graph.initializers
        for name, array in self.weights.items():
            value = inits.get(name)
            if value is None or value.const_value is None:
                raise ValueError(f"no initializer {name!r} to write")
            if tuple(value.const_value.shape) != tuple(np.shape(array)):
                raise ValueError(f"initializer {name!r} has shape {tuple(value.const_value.shape)}, the array {np.shape(array)}")
        for name, array in self.weights.items():
            value = inits[name]
            dtype = value.const_value.dtype
            value.const_value = ir.tensor(np.ascontiguousarray(np.asarray(array).astype(dtype.numpy())), dtype=dtype, name=name)
        return ir.passes.PassResult(model, modified=bool(self.weights))
