"""Rotary position embedding ops on a q/k head path: ``com.microsoft`` RotaryEmbedding and ONNX
(opset 23) RotaryEmbedding.

Rule: both ops rotate pairs of features inside one head (``(2i, 2i+1)`` when ``interleaved``,
``(i, i + rd/2)`` otherwise, over the first ``rotary_embedding_dim`` features, all of them when
it is 0) by an angle read from ``cos_cache``/``sin_cache`` at the token's position. Those caches
are indexed by position and ``rd/2`` only: no input has a head axis. So a whole head can be
removed through the op: the head axis passes through (the 4-D form ``[B, H, S, hd]``), or the
``[.., H·hd]`` features of the 3-D form keep their per-head layout. What names the head count is
the ``num_heads`` attribute (when set), recorded as an attribute edit of the head unit of the
path. The op is accepted only when the head size it rotates with is the layer's ``hd``
(``H·hd / num_heads``, or twice the cache width when ``num_heads`` and
``rotary_embedding_dim`` are unset), so its pairs never straddle two heads.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

MS = "com.microsoft"

#: (domain, input index of the data, of cos_cache, of sin_cache) per RotaryEmbedding form
_FORMS = {MS: (0, 2, 3), "": (0, 1, 2), "ai.onnx": (0, 1, 2)}


class RotaryError(Exception):
    """The op does not rotate whole heads of the layer (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Rotary:
    """One RotaryEmbedding met on a head path: its data input and its ``num_heads`` (0: unset)."""

    node: str
    data: ir.Value
    num_heads: int


def is_rotary(node: ir.Node) -> bool:
    return node.op_type == "RotaryEmbedding" and node.domain in _FORMS


def _dim(value: ir.Value | None, axis: int) -> int | None:
    shape = value.shape if value is not None else None
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def rotary_through(node: ir.Node, rank: int, head_dim: int | None, axes: tuple[int, int] | None = None) -> Rotary:
    """Read a RotaryEmbedding whose output (rank ``rank``) carries whole heads of ``head_dim``:
    the 4-D form with head and head-dimension axes ``axes`` (they must be ``(1, 3)``:
    ``[B, H, S, w]``; ``w`` may be a slice of the head dimension, as for a partial rotary
    the exporter cuts out first), or the 3-D form ``[B, S, H·hd]``. Raises ``RotaryError``
    when that does not hold."""
    data_index, cos_index, sin_index = _FORMS[node.domain]
    data = node.inputs[data_index]
    attrs = node.attributes
    num_heads = attrs.get_int("num_heads", 0)
    rotary_dim = attrs.get_int("rotary_embedding_dim", 0)
    where = f"{node.domain or 'ai.onnx'}::RotaryEmbedding {node.name}"
    if attrs.get_int("is_packed_batching", 0):
        raise RotaryError(f"{where}: packed batching")
    if rank == 4:  # the op's own head size: the layer's, or the rotated slice of it (partial rotary)
        head_dim = _dim(data, -1) or head_dim
    if head_dim is None:
        raise RotaryError(f"{where}: unknown head dimension")
    caches = [node.inputs[i] if len(node.inputs) > i else None for i in (cos_index, sin_index)]
    half = {_dim(c, -1) for c in caches}
    if None in caches or len(half) != 1 or None in half:
        raise RotaryError(f"{where}: cos/sin caches of unknown width")
    half_width = half.pop()
    if any(c.shape is not None and len(c.shape) not in (2, 3) for c in caches):
        raise RotaryError(f"{where}: cos/sin caches of rank other than 2 or 3")
    if rank == 4:
        if axes != (1, 3):
            raise RotaryError(f"{where}: 4-D input whose head and head-dimension axes are {axes}, not (1, 3)")
    elif rank == 3:
        width = _dim(data, -1)
        if num_heads:
            if width is None or width != num_heads * head_dim:
                raise RotaryError(f"{where}: width {width} is not num_heads={num_heads} heads of {head_dim}")
        elif rotary_dim or 2 * half_width != head_dim:
            raise RotaryError(f"{where}: without num_heads it rotates heads of {2 * half_width}, not {head_dim}")
    else:
        raise RotaryError(f"{where}: input of rank {rank}")
    if 2 * half_width > head_dim or (rotary_dim and rotary_dim != 2 * half_width):
        raise RotaryError(f"{where}: rotary width {rotary_dim or 2 * half_width} does not fit heads of {head_dim}")
    return Rotary(node.name, data, num_heads)
