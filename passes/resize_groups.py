"""Apply channel transforms to width groups: weights, value shapes and Reshape targets."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from graphresize.passes.edit import retarget_reshape, set_dim, values_by_name

from graphresize.analysis.channels import CONSUMER, NORM_WEIGHT
from graphresize.analysis.groups import WidthGroups
from graphresize.solve.transforms import ChannelTransform


def transform_axis(array: np.ndarray, axis: int, matrix: np.ndarray, *, reads: bool) -> np.ndarray:
    """``array`` with axis ``axis`` mapped by ``matrix``.

    Reading axes (consumer rows) become ``matrix @ W`` along the axis (``matrix`` is d×D);
    writing axes become ``W @ matrix`` along the axis (``matrix`` is D×d).
    """
    work = np.moveaxis(array.astype(np.float64), axis, -1)
    mapped = work @ (matrix.T if reads else matrix)
    return np.moveaxis(mapped, -1, axis)


class ResizeGroupsPass(ir.passes.InPlacePass):
    """Narrow each group that has a transform.

    Rule: a weight axis that writes the group's features is multiplied by ``merge``; one
    that reads them by ``unmerge``; a norm weight (uniform once folded) keeps its value on
    the first ``d`` features. Every activation of the group gets the new last-axis size,
    and every Reshape whose constant target names the old width names the new one (a private
    copy of the constant, so other users keep theirs). Weights keep their dtype.
    """

    def __init__(self, groups: WidthGroups, transforms: Mapping[str, ChannelTransform]) -> None:
        super().__init__()
        self.groups = groups
        self.transforms = dict(transforms)

    def requires(self, model: ir.Model) -> None:
        initializers = model.graph.initializers
        for group_id, transform in self.transforms.items():
            group = self.groups.by_id(group_id)
            if not group.resizable:
                raise ir.passes.PreconditionError(f"{group_id} is frozen: {group.frozen}")
            if transform.width != group.width:
                raise ir.passes.PreconditionError(
                    f"{group_id}: transform width {transform.width} != group width {group.width}"
                )
            for ref in group.params:
                if ref.name not in initializers:
                    raise ir.passes.PreconditionError(f"{group_id}: no initializer {ref.name}")
                array = initializers[ref.name].const_value.numpy()
                if array.shape[ref.axis] != group.width:
                    raise ir.passes.PreconditionError(f"{group_id}: {ref.name} axis {ref.axis} has another width")
                if ref.role == NORM_WEIGHT and transform.new_width != transform.width and np.ptp(array) != 0:
                    raise ir.passes.PreconditionError(f"{group_id}: norm weight {ref.name} is not folded (not uniform)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = values_by_name(graph)
        nodes = {node.name: node for node in graph}
        for group_id, transform in self.transforms.items():
            group = self.groups.by_id(group_id)
            for ref in group.params:
                if ref.role == NORM_WEIGHT:  # uniform after folding: the same value on fewer features
                    _replace_initializer(graph.initializers[ref.name], ref.axis, _first(transform), reads=False)
                    continue
                reads = ref.role == CONSUMER
                matrix = transform.unmerge if reads else transform.merge
                _replace_initializer(graph.initializers[ref.name], ref.axis, matrix, reads=reads)
            for name in group.values:
                set_dim(values[name], -1, transform.new_width)
            for node_name in group.reshapes:
                retarget_reshape(graph, nodes[node_name], transform.new_width)
        return ir.passes.PassResult(model, modified=bool(self.transforms))

    def ensures(self, model: ir.Model) -> None:
        initializers = model.graph.initializers
        for group_id, transform in self.transforms.items():
            for ref in self.groups.by_id(group_id).params:
                size = initializers[ref.name].const_value.shape[ref.axis]
                if size != transform.new_width:
                    raise ir.passes.PostconditionError(f"{group_id}: {ref.name} axis {ref.axis} is {size}")


def _first(transform: ChannelTransform) -> np.ndarray:
    """The D×d selection of the first ``d`` features."""
    return np.eye(transform.width, transform.new_width)



def _replace_initializer(value: ir.Value, axis: int, matrix: np.ndarray, *, reads: bool) -> None:
    old = value.const_value
    array = old.numpy()
    new = transform_axis(array, axis, matrix, reads=reads).astype(array.dtype)
    value.const_value = ir.tensor(new, dtype=old.dtype, name=value.name)
    value.shape = ir.Shape(new.shape)
