"""Norm junctions: where a stream is normalised over its last axis before linear readers.

Recognised forms (pure analysis, no graph change):

* ``LayerNormalization`` (ONNX), ``SimplifiedLayerNormalization`` (ORT), ``RMSNormalization``
  (opset 23), ``SkipSimplifiedLayerNormalization`` and ``SkipLayerNormalization``
  (com.microsoft), by op type;
* the decomposed RMSNorm every exporter writes for Llama-style models:
  ``Pow(x, 2) | Mul(x, x) → ReduceMean(last axis) → Add(ε) → Sqrt → Div(x, ·)`` or
  ``→ Sqrt → Reciprocal → Mul(x, ·)``, with optional ``Cast``s around it, then an optional
  ``Mul(γ)`` and ``Add(β)``.

A junction names the values whose sum is the normalised stream (``stream``), the value the
readers consume (``output``), the gain and bias initializers, and where ε lives.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphresize.analysis.channels import constant_ints, resolve_param

FUSED_FORMS = {
    # op type: (kind, has skip input, index of gain input, index of bias input or None)
    "LayerNormalization": ("layer", False, 1, 2),
    "SimplifiedLayerNormalization": ("rms", False, 1, None),
    "RMSNormalization": ("rms", False, 1, None),
    "SkipLayerNormalization": ("layer", True, 2, 3),
    "SkipSimplifiedLayerNormalization": ("rms", True, 2, None),
}


@dataclasses.dataclass(frozen=True)
class NormJunction:
    """One normalisation over the last axis.

    ``kind``: ``rms`` or ``layer``; ``form``: the fused op type or ``decomposed``.
    ``stream``: values whose sum is normalised (two for the Skip forms); ``output``: what the
    readers read (after gain and bias); ``gain``/``bias``: initializer names or None;
    ``epsilon``: ε; ``eps_value``: the constant holding ε in a decomposed chain (fused forms
    keep it in the ``epsilon`` attribute); ``nodes``: the node names of the junction, first
    to last; ``gain_node``/``bias_node``: the decomposed chain's ``Mul(γ)`` / ``Add(β)``.
    """

    kind: str
    form: str
    stream: tuple[str, ...]
    output: str
    gain: str | None
    bias: str | None
    epsilon: float
    eps_value: str | None
    nodes: tuple[str, ...]
    gain_node: str | None = None
    bias_node: str | None = None

    @property
    def node(self) -> str:
        """The node that writes the stream's normalised value (first of the chain)."""
        return self.nodes[0]


def find_norms(graph: ir.Graph) -> tuple[NormJunction, ...]:
    """Every norm junction of ``graph``'s main body, in graph order."""
    found = []
    for node in graph:
        if node.op_type in FUSED_FORMS and node.domain in ("", "ai.onnx", "com.microsoft"):
            junction = _fused(node)
        elif node.op_type == "ReduceMean":
            junction = _decomposed(node)
        else:
            junction = None
        if junction is not None:
            found.append(junction)
    return tuple(found)


def _fused(node: ir.Node) -> NormJunction | None:
    kind, skip, gain_index, bias_index = FUSED_FORMS[node.op_type]
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    axis = node.attributes.get_int("axis", -1)
    if rank is None or axis % rank != rank - 1:
        return None
    stream = (x.name, node.inputs[1].name) if skip else (x.name,)
    # SkipLayerNormalization's bias (input 4) is split off with the op before routing
    gain = _initializer(node, gain_index)
    bias = _initializer(node, bias_index) if bias_index is not None else None
    return NormJunction(
        kind=kind,
        form=node.op_type,
        stream=stream,
        output=node.outputs[0].name,
        gain=gain,
        bias=bias,
        epsilon=node.attributes.get_float("epsilon", 1e-5),
        eps_value=None,
        nodes=(node.name,),
    )


def _initializer(node: ir.Node, index: int) -> str | None:
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    view = resolve_param(node.inputs[index])
    return view.name if view is not None else None


def _only_user(value: ir.Value, op_types: tuple[str, ...]) -> ir.Node | None:
    """The single node using ``value``, if it has one of ``op_types``."""
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node.op_type not in op_types:
        return None
    return uses[0].node


def _through_casts(value: ir.Value) -> ir.Value:
    while value.producer() is not None and value.producer().op_type == "Cast":
        value = value.producer().inputs[0]
    return value


def _scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None:
        return None
    array = np.asarray(tensor.numpy())
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    others = [v for v in node.inputs if v is not value]
    return others[0] if len(others) == 1 else None


def _decomposed(reduce: ir.Node) -> NormJunction | None:
    """An RMSNorm chain around ``reduce`` (a ReduceMean over the last axis of ``x²``)."""
    square = reduce.inputs[0].producer() if reduce.inputs[0] is not None else None
    if square is None:
        return None
    if square.op_type == "Pow" and _scalar(square.inputs[1]) == 2.0 or square.op_type == "Mul" and square.inputs[0] is square.inputs[1]:
        x = square.inputs[0]
    else:
        return None
    rank = len(x.shape) if x.shape is not None else None
    axes = reduce.attributes.get_ints("axes", None)
    if axes is None and len(reduce.inputs) > 1:
        axes = constant_ints(reduce.inputs[1])
    if rank is None or not axes or [a % rank for a in axes] != [rank - 1]:
        return None
    if reduce.attributes.get_int("keepdims", 1) != 1:
        return None
    add = _only_user(reduce.outputs[0], ("Add",))
    if add is None:
        return None
    eps_input = _other_input(add, reduce.outputs[0])
    epsilon = _scalar(eps_input)
    sqrt = _only_user(add.outputs[0], ("Sqrt",))
    if epsilon is None or sqrt is None:
        return None
    chain = [square, reduce, add, sqrt]
    scale = _only_user(sqrt.outputs[0], ("Div", "Reciprocal"))
    if scale is None:
        return None
    if scale.op_type == "Reciprocal" or (
        scale.inputs[1] is sqrt.outputs[0] and _scalar(scale.inputs[0]) == 1.0
    ):  # 1/√· then x·(1/√·): Reciprocal, or Div(1, ·) from the legacy exporter
        chain.append(scale)
        apply = _only_user(scale.outputs[0], ("Mul",))
        if apply is None or _other_input(apply, scale.outputs[0]) is not x:
            return None
    else:
        apply = scale
        if apply.inputs[0] is not x or apply.inputs[1] is not sqrt.outputs[0]:
            return None
    chain.append(apply)
    output = apply.outputs[0]
    gain = bias = gain_node = bias_node = None
    value = output
    cast = _only_user(value, ("Cast",))
    if cast is not None:
        chain.append(cast)
        value = cast.outputs[0]
    mul = _only_user(value, ("Mul",))
    if mul is not None:
        view = resolve_param(_other_input(mul, value))
        if view is not None and view.rank >= 1:
            gain, gain_node = view.name, mul.name
            chain.append(mul)
            value = mul.outputs[0]
            add_bias = _only_user(value, ("Add",))
            bias_view = resolve_param(_other_input(add_bias, value)) if add_bias is not None else None
            if bias_view is not None and bias_view.rank >= 1:
                bias, bias_node = bias_view.name, add_bias.name
                chain.append(add_bias)
                value = add_bias.outputs[0]
    return NormJunction(
        kind="rms",
        form="decomposed",
        stream=(x.name,),
        output=value.name,
        gain=gain,
        bias=bias,
        epsilon=epsilon,
        eps_value=eps_input.name,
        nodes=tuple(n.name for n in chain),
        gain_node=gain_node,
        bias_node=bias_node,
    )


def junctions_by_output(norms: tuple[NormJunction, ...]) -> dict[str, NormJunction]:
    return {j.output: j for j in norms}
