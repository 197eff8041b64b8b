"""An ONNX Runtime session over one segment of an in-memory model.

The segment's nodes are serialized into a new ``ModelProto`` with only the initializers they
read (copied once: one segment's weights, read from the memory map when the model has
external data), its fed values as graph inputs and the requested values as outputs. Input and
output types carry the element type only (no shapes), so a rewrite that narrowed a width
cannot leave a stale static shape at the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphresize.engine.segments import Segment
from graphresize.errors import VerificationError
from graphresize.io.ort_utils import providers_for, session_options


def _value_info(value: ir.Value | None, name: str) -> onnx.ValueInfoProto:
    dtype = value.dtype if value is not None and value.dtype is not None else ir.DataType.FLOAT
    return onnx.helper.make_tensor_value_info(name, int(dtype), None)


def segment_proto(model: ir.Model, segment: Segment, outputs: Sequence[str]) -> onnx.ModelProto:
    """``segment`` of ``model`` as a standalone model with ``outputs``."""
    graph = model.graph
    values = {v.name: v for node in segment.nodes for v in (*node.inputs, *node.outputs) if v is not None}
    proto = onnx.GraphProto(name=f"segment_{segment.index}")
    proto.node.extend(ir.serde.serialize_node(node) for node in segment.nodes)
    for name in segment.initializers:
        value = graph.initializers.get(name) or values[name]
        const = value.const_value
        if isinstance(const, ir.ExternalTensor):  # read from its memory map into the segment's proto
            const = ir.Tensor(const.numpy(), dtype=const.dtype, name=name)
        tensor = ir.serde.serialize_tensor(const)
        tensor.name = name
        proto.initializer.append(tensor)
    proto.input.extend(_value_info(values.get(name), name) for name in segment.inputs)
    proto.output.extend(_value_info(values.get(name), name) for name in outputs)
    model_proto = onnx.helper.make_model(
        proto,
        opset_imports=[onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    model_proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return model_proto


def segment_session(model: ir.Model, segment: Segment, outputs: Sequence[str], *, provider: str = "cpu") -> ort.InferenceSession:
    """An ORT session over ``segment`` returning ``outputs`` (in that order)."""
    data = segment_proto(model, segment, outputs).SerializeToString()
    options = session_options()
    options.enable_cpu_mem_arena = False  # a session per segment: give its buffers back when it goes
    try:
        return ort.InferenceSession(data, options, providers=providers_for(provider))
    except Exception as exc:  # ORT raises its own pybind exception types
        raise VerificationError(f"ONNX Runtime cannot load segment {segment.index}: {str(exc).splitlines()[0][:300]}") from None
