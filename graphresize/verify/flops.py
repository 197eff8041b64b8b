"""Exact FLOPs of every matrix product a graph runs at given input sizes, from the shapes ONNX
Runtime reports when it runs the graph once.

The rule: ``2·M·K·N`` (times the broadcast batch dimensions) for every ``MatMul``,
``MatMulInteger``, ``Gemm``, ``FusedMatMul`` and ``MatMulNBits``, and for the two products
inside the attention operators (``Q·Kᵀ`` and ``scores·V`` of ``MultiHeadAttention``,
``GroupQueryAttention``, ONNX ``Attention`` and ORT's packed ``Attention``, whose input
projection counts as well): ``2·S·T·head_size`` per query head each, with ``S`` the new tokens
and ``T`` the attended length (past + new), the full ``S×T`` products an unfused graph computes
(causal masking does not discount them). Element-wise work (norms, softmax, rotary) is not
counted. ``weight`` is the part whose second operand is a constant weight matrix (what
:func:`graphresize.verify.evaluate.weight_flops_per_token` counts per token); ``activation``
the rest (attention's products, which grow with the context and which a resize of the MLP or
of the residual stream does not shrink).

The shapes come from ORT's node profile of one run with graph optimizations off (so the nodes
are the graph's own): it lists the shapes of each node's non-initializer inputs; constant
weights' shapes are read from the graph. Works for any export that ORT runs (dynamo, TorchScript,
Optimum with past, onnxruntime-genai, graphs fused by ``optimize --fuse``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphresize.errors import UnsupportedModelError
from graphresize.io.modelio import tensor_bytes
from graphresize.io.ort_utils import SESSION_BYTES_INLINE, cache_head_sizes, make_feeds
from graphresize.verify.evaluate import _constant_shape, _is_cache

_PRODUCTS = ("MatMul", "MatMulInteger", "Gemm", "FusedMatMul", "MatMulNBits")
_ATTENTION = ("MultiHeadAttention", "GroupQueryAttention", "Attention")

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MatMulFlops:
    """FLOPs of one run at ``batch × seq_len`` new tokens after ``past_len`` cached ones."""

    weight: int  # products with a constant weight matrix
    activation: int  # activation-by-activation products (attention)
    batch: int
    seq_len: int
    past_len: int
    by_op: dict[str, int]

    @property
    def total(self) -> int:
        return self.weight + self.activation

    @property
    def per_token(self) -> float:
        return self.total / (self.batch * self.seq_len)

    @property
    def weight_per_token(self) -> float:
        return self.weight / (self.batch * self.seq_len)


def _product(a: Shape, b: Shape, trans_a: bool = False, trans_b: bool = False) -> int:
    """``2·M·K·N`` times the broadcast batch of ``a @ b`` (numpy matmul rules, 1-D operands
    promoted), with ``a``/``b`` read transposed in their last two axes when asked."""
    a = (1, *a) if len(a) == 1 else a
    b = (*b, 1) if len(b) == 1 else b
    m, k = (a[-1], a[-2]) if trans_a else (a[-2], a[-1])
    n = b[-2] if trans_b else b[-1]
    batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return 2 * int(np.prod(batch, dtype=np.int64)) * m * k * n


def _attention(node: ir.Node, shapes: list[Shape | None]) -> tuple[int, int]:
    """(weight, activation) FLOPs of an attention operator from its input shapes."""
    attrs, op = node.attributes, node.op_type
    q = shapes[0]
    if op == "Attention" and node.domain in ("", "ai.onnx"):  # ONNX Attention (opset 23)
        k, v = shapes[1], shapes[2]
        past = shapes[4] if len(shapes) > 4 else None
        if len(q) == 4:
            batch, heads, s, head = q
            t = k[2]
            head_v = v[3]
        else:
            heads = attrs.get_int("q_num_heads", 0)
            kv_heads = attrs.get_int("kv_num_heads", 0)
            batch, s, head = q[0], q[1], q[2] // heads
            t, head_v = k[1], v[2] // kv_heads
        t += past[2] if past is not None else 0
        return 0, 2 * batch * heads * s * t * (head + head_v)
    heads = attrs.get_int("num_heads", 0)
    if op == "Attention":  # ORT's packed Attention: input projection + attention
        weights = shapes[1]
        batch, s, width = q
        sizes = attrs.get_ints("qkv_hidden_sizes", None) or [weights[1] // 3] * 3
        past = shapes[4] if len(shapes) > 4 else None
        t = s + (past[3] if past is not None else 0)
        return 2 * batch * s * width * weights[1], 2 * batch * s * t * (sizes[0] + sizes[2])
    key = shapes[1] if len(shapes) > 1 else None
    value = shapes[2] if len(shapes) > 2 else None
    if op == "GroupQueryAttention":
        past = shapes[3] if len(shapes) > 3 else None
        batch, s = q[0], q[1]
        kv_heads = attrs.get_int("kv_num_heads", 0)
        head = q[2] // (heads + 2 * kv_heads) if key is None else q[2] // heads
        t = s + (past[2] if past is not None else 0)
        return 0, 2 * batch * heads * s * t * 2 * head
    # MultiHeadAttention: query (B,S,D) or packed (B,S,N,3,H); key (B,L,D) or (B,N,L,H) or packed kv (B,L,N,2,H)
    past = shapes[6] if len(shapes) > 6 else None
    batch, s = q[0], q[1]
    if len(q) == 5:
        head = head_v = q[4]
        t = s
    elif key is not None and len(key) == 5:
        head = head_v = key[4]
        t = key[1]
    else:
        head = q[2] // heads
        if key is None:
            raise UnsupportedModelError(f"MultiHeadAttention {node.name!r}: no key input")
        t = key[2] if len(key) == 4 else key[1]
        head_v = value[3] if value is not None and len(value) == 4 else (value[2] // heads if value is not None else head)
    if past is not None and (key is None or len(key) != 4):
        t += past[2]
    return 0, 2 * batch * heads * s * t * (head + head_v)


def node_flops(node: ir.Node, shapes: list[Shape | None]) -> tuple[int, int]:
    """(weight, activation) FLOPs of one node given the shapes of its inputs (None: absent)."""
    op = node.op_type
    if op in _ATTENTION:
        return _attention(node, shapes)
    if op == "MatMulNBits":
        k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
        return 2 * int(np.prod(shapes[0][:-1], dtype=np.int64)) * k * n, 0
    a, b = shapes[0], shapes[1]
    if op in ("Gemm", "FusedMatMul"):
        flops = _product(a, b, bool(node.attributes.get_int("transA", 0)), bool(node.attributes.get_int("transB", 0)))
    else:
        flops = _product(a, b)
    weighted = _constant_shape(node.inputs[1]) is not None
    return (flops, 0) if weighted else (0, flops)


def _counted(node: ir.Node) -> bool:
    return node.op_type in _PRODUCTS or node.op_type in _ATTENTION


def _input_shapes(node: ir.Node, reported: Sequence[Shape]) -> list[Shape | None]:
    """The node's input shapes: ORT reports those of its non-initializer inputs in order;
    initializers' shapes come from the graph."""
    shapes: list[Shape | None] = []
    reported = list(reported)
    for value in node.inputs:
        if value is None:
            shapes.append(None)
        elif value.is_initializer() and value.const_value is not None:
            shapes.append(tuple(int(d) for d in value.const_value.shape))
        elif reported:
            shapes.append(tuple(reported.pop(0)))
        else:
            raise UnsupportedModelError(f"no shape for input {value.name!r} of {node.op_type} {node.name!r} in ORT's profile")
    return shapes


def _profiling_session(model: ir.Model, folder: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "flops")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    if not external and tensor_bytes(model) <= SESSION_BYTES_INLINE:
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    path = folder / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, batch: int, seq_len: int, past_len: int) -> dict[str, np.ndarray]:
    """Feeds of ``seq_len`` new tokens after ``past_len`` cached ones (zeros in the cache)."""
    ids = np.zeros((batch, seq_len), dtype=np.int64)
    if past_len and not any(_is_cache(n) and 0 in f.shape for n, f in make_feeds(session, ids).items()):
        raise UnsupportedModelError("past_len > 0 needs a graph with past key/value inputs")
    return make_feeds(session, ids, past_len)


def matmul_flops(model: ir.Model, runs: Sequence[tuple[int, int, int]]) -> list[MatMulFlops]:
    """:class:`MatMulFlops` of ``model`` for each ``(batch, seq_len, past_len)`` in ``runs``
    (one profiled ORT session, one run each). Unnamed or repeated node names get unique ones
    while the session is built (ORT's profile names nodes) and are restored after."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    seen: set[str] = set()
    renamed: dict[ir.Node, str | None] = {}
    for i, node in enumerate(nodes):
        if not node.name or node.name in seen:
            renamed[node] = node.name
            node.name = f"graphresize_flops_{i}"
        seen.add(node.name)
    by_name = {node.name: node for node in nodes}
    try:
        with tempfile.TemporaryDirectory(prefix="graphresize-flops-") as tmp:
            session = _profiling_session(model, Path(tmp))
            session.graphresize_cache_head_sizes = cache_head_sizes(model)
            for batch, seq_len, past_len in runs:
                session.run(None, _feeds(session, batch, seq_len, past_len))
            events = json.loads(Path(session.end_profiling()).read_text())
    finally:
        for node, name in renamed.items():
            node.name = name
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(spans) != len(runs):
        raise UnsupportedModelError(f"ORT's profile has {len(spans)} runs, expected {len(runs)}")
    results = []
    for (start, end), (batch, seq_len, past_len) in zip(spans, runs, strict=True):
        weight = activation = 0
        by_op: dict[str, int] = {}
        for event in events:
            if event.get("cat") != "Node" or not start <= event["ts"] <= end or not event["name"].endswith("_kernel_time"):
                continue
            node = by_name.get(event["name"][: -len("_kernel_time")])
            if node is None or not _counted(node):
                continue
            shapes = _input_shapes(node, [next(iter(s.values())) for s in event["args"].get("input_type_shape", [])])
            w, a = node_flops(node, shapes)
            weight, activation = weight + w, activation + a
            by_op[node.op_type] = by_op.get(node.op_type, 0) + w + a
        results.append(MatMulFlops(weight, activation, batch, seq_len, past_len, by_op))
    return results


def prompt_flops_per_token(model: ir.Model, seq_len: int, batch: int = 1) -> float:
    """All matrix-product FLOPs per token of a ``batch × seq_len`` prompt (no cache)."""
    return matmul_flops(model, [(batch, seq_len, 0)])[0].per_token


def decode_flops_per_token(model: ir.Model, prompt_len: int, steps: int) -> float:
    """All matrix-product FLOPs per generated token of ``steps`` single-token steps through the
    KV cache after a ``prompt_len`` prompt (step ``i`` attends to ``prompt_len + i + 1``
    positions): the mean over the steps, exact from two runs since a step's count is affine in
    its past length."""
    first, last = matmul_flops(model, [(1, 1, prompt_len), (1, 1, prompt_len + steps - 1)])
    return (first.total + last.total) / 2
