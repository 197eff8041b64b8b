"""Types and shapes for values behind ``com.microsoft`` ops, which ONNX shape inference skips."""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

_LARGE = 1024  # initializers above this many elements are passed as typed inputs, not data


class ContribShapeInferencePass(ir.passes.InPlacePass):
    """Rule: in a graph with ``com.microsoft`` ops (fused by ``onnxruntime.transformers`` or
    onnxscript's ORT fusions: SkipLayerNormalization, FastGelu, Attention ...), values that
    have no type or shape after ONNX shape inference get the ones ONNX Runtime's symbolic
    shape inference finds. Values that already have both are left alone; a failure of the
    inference changes nothing (analysis then freezes what it cannot see).

    Before that, ops whose output has their first input's type and shape (RotaryEmbedding)
    pass them on and ONNX shape inference runs again behind them: ORT's symbolic inference
    stops at ops it does not know (ONNX Attention of opset 23) and would leave them unshaped.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if not any(node.domain == "com.microsoft" for node in graph):
            return ir.passes.PassResult(model, modified=False)
        missing = {
            out.name: out for node in graph for out in node.outputs if out.name and (out.type is None or out.shape is None)
        }
        if not missing:
            return ir.passes.PassResult(model, modified=False)
        if _pass_through_shapes(graph):
            ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
            missing = {name: v for name, v in missing.items() if v.type is None or v.shape is None}
            if not missing:
                return ir.passes.PassResult(model, modified=True)
        try:
            inferred = _symbolic_value_infos(model)
        except Exception as exc:  # ORT's tool raises anything
            logger.info("symbolic shape inference failed: %s", exc)
            return ir.passes.PassResult(model, modified=False)
        modified = False
        for name, value in missing.items():
            info = inferred.get(name)
            if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
                continue
            found = ir.serde.deserialize_value_info_proto(info, None)
            if value.type is None:
                value.type = found.type
            if value.shape is None:
                value.shape = found.shape
            modified = True
        return ir.passes.PassResult(model, modified=modified)


_SAME_AS_INPUT = frozenset({"RotaryEmbedding"})


def _pass_through_shapes(graph: ir.Graph) -> bool:
    """Give each unshaped output of a ``com.microsoft`` op in ``_SAME_AS_INPUT`` its data
    input's type and shape (graph order, so chains resolve); whether any was given."""
    modified = False
    for node in graph:
        if node.domain != "com.microsoft" or node.op_type not in _SAME_AS_INPUT or not node.outputs:
            continue
        out, data = node.outputs[0], node.inputs[0]
        if data is None or data.type is None or data.shape is None or (out.type is not None and out.shape is not None):
            continue
        out.type, out.shape = data.type, ir.Shape(data.shape)
        modified = True
    return modified


def _symbolic_value_infos(model: ir.Model) -> dict[str, onnx.ValueInfoProto]:
    """What ORT's symbolic shape inference finds, complete or not. Its ``infer_shapes`` entry
    point is not used: when inference is incomplete it writes a debug model (and data files)
    into the working directory, then raises, dropping the partial result."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_rank, verbose
    inference._preprocess(_weightless_proto(model))
    while inference.run_:
        inference._infer_impl()
    return {vi.name: vi for vi in inference.out_mp_.graph.value_info}


def _weightless_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto with large initializers turned into typed graph inputs: shape
    inference needs their shapes, not their data (small ones, e.g. shape constants, stay)."""
    large = [v for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.size > _LARGE]
    saved = {v.name: v.const_value for v in large}
    serde_logger = logging.getLogger(ir.serde.__name__)  # it warns about each data-less initializer
    level = serde_logger.level
    try:
        serde_logger.setLevel(logging.ERROR)
        for value in large:
            value.const_value = None
        proto = ir.serde.serialize_model(model)
    finally:
        serde_logger.setLevel(level)
        for value in large:
            value.const_value = saved[value.name]
    kept = [t for t in proto.graph.initializer if t.name not in saved]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    names = {i.name for i in proto.graph.input}
    for value in large:
        if value.name not in names:
            tensor = saved[value.name]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(value.name, tensor.dtype.value, list(tensor.shape)))
    return proto
