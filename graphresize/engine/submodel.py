"""An ONNX Runtime session over one segment of an in-memory model.

The segment's nodes are serialized into a new ``ModelProto`` with only the initializers they
read, its fed values as graph inputs and the requested values as outputs. Float weights of at
least ``SHARED_BYTES`` are not copied into the protobuf: each is a placeholder external tensor
whose data ONNX Runtime takes from an ``OrtValue`` over the model's own array
(``SessionOptions.add_external_initializers``; for an external-data model that array is the
memory map, so a segment's weights are read from disk once and never serialized). Input and
output types carry the element type only (no shapes), so a rewrite that narrowed a width
cannot leave a stale static shape at the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphresize.engine.segments import Segment
from graphresize.errors import VerificationError
from graphresize.io.ort_utils import providers_for, session_options


def _value_info(value: ir.Value | None, name: str) -> onnx.ValueInfoProto:
    dtype = value.dtype if value is not None and value.dtype is not None else ir.DataType.FLOAT
    return onnx.helper.make_tensor_value_info(name, int(dtype), None)


#: Float initializers of at least this many bytes are handed to ORT as arrays, not serialized.
SHARED_BYTES = 1024
_SHARED_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


def _shared(const) -> bool:
    return const is not None and const.dtype in _SHARED_TYPES and const.nbytes >= SHARED_BYTES


def _placeholder(name: str, const) -> onnx.TensorProto:
    """An external-data ``TensorProto`` with ``const``'s type and shape and no data (ORT
    replaces it with the array given to ``add_external_initializers``)."""
    tensor = onnx.TensorProto(name=name, data_type=int(const.dtype), dims=[int(d) for d in const.shape],
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "graphresize-shared.data"), ("offset", "0"), ("length", str(const.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def segment_proto(model: ir.Model, segment: Segment, outputs: Sequence[str], *,
                  shared: dict[str, object] | None = None) -> onnx.ModelProto:
    """``segment`` of ``model`` as a standalone model with ``outputs``; with ``shared`` (a dict
    filled here: name -> array), large float weights become placeholders (module docstring)."""
    graph = model.graph
    values = {v.name: v for node in segment.nodes for v in (*node.inputs, *node.outputs) if v is not None}
    proto = onnx.GraphProto(name=f"segment_{segment.index}")
    proto.node.extend(ir.serde.serialize_node(node) for node in segment.nodes)
    for name in segment.initializers:
        value = graph.initializers.get(name) or values[name]
        const = value.const_value
        if shared is not None and _shared(const):
            shared[name] = const.numpy()
            proto.initializer.append(_placeholder(name, const))
            continue
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
    shared: dict[str, object] = {}
    data = segment_proto(model, segment, outputs, shared=shared).SerializeToString()
    options = session_options()
    options.enable_cpu_mem_arena = False  # a session per segment: give its buffers back when it goes
    arrays = [np.ascontiguousarray(a) for a in shared.values()]
    if arrays:
        options.add_external_initializers(list(shared), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    try:
        session = ort.InferenceSession(data, options, providers=providers_for(provider))
        session.graphresize_arrays = arrays  # ORT reads these buffers: alive as long as the session
        return session
    except Exception as exc:  # ORT raises its own pybind exception types
        raise VerificationError(f"ONNX Runtime cannot load segment {segment.index}: {str(exc).splitlines()[0][:300]}") from None
