"""The distillation loss, and the LM head computed with it a chunk of positions at a time.

Rule (loss): ``T²·KL`` between the teacher's top-k + rest distribution and the student's
distribution coarsened to the same outcomes, averaged over positions (:func:`topk_kl`).

Rule (chunks): when the logits are ``MatMul(hidden, W)`` with ``W`` a 2-D weight (initializers
and constants only: :func:`find_head`), the trainer runs the graph up to ``hidden`` and
:func:`head_topk_kl` computes the head and the loss for ``HEAD_CHUNK`` positions at a time. Each
chunk's gradient (with respect to ``hidden``, and ``W`` when it trains) is taken during the
forward pass, by the same operations the whole graph would run on those rows (the head's
``MatMul`` under the same autocast, then the loss in float32), and backward only hands the
stored gradients on. So the ``[batch, seq, vocab]`` chain (bf16 logits, their float32 copy,
the log-softmax kept for backward and the gradients of each: ~1 GB at 4 × 256 positions and a
49,152-token vocabulary) exists one ``[HEAD_CHUNK, vocab]`` slice at a time, and nothing is
recomputed. The gradient with respect to ``hidden`` is the whole computation's row by row; the
loss value is summed chunk by chunk (a different rounding of the same mean, reported only), and
a trained ``W`` gets its gradient as the sum of the chunks' (another rounding of the same sum).

The hold-out KL (:func:`full_kl_sum`, float64, full vocabulary) is chunked the same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch

#: Positions per chunk of the head and the loss (memory only: the gradients do not depend on it).
HEAD_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class Head:
    """The logits are ``MatMul(hidden, weight)``: the names of the two operands."""

    hidden: str
    weight: str


def find_head(graph: ir.Graph, logits: str) -> Head | None:
    """The head that produces graph output ``logits`` when it is a ``MatMul`` of an activation by
    a weight computed from initializers and constants only (e.g. ``Transpose(lm_head.weight)``);
    else ``None`` (the trainer then computes the logits whole)."""
    output = next((v for v in graph.outputs if v.name == logits), None)
    node = output.producer() if output is not None else None
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    hidden, weight = node.inputs
    if hidden is None or weight is None or not hidden.name or not weight.name or not _constant(weight, {}):
        return None
    return Head(hidden=hidden.name, weight=weight.name)


def _constant(value: ir.Value, seen: dict[str, bool]) -> bool:
    """Whether ``value`` depends on initializers and constants only (no graph input)."""
    if value.name in seen:
        return seen[value.name]
    if value.is_graph_input():
        result = False
    elif value.const_value is not None:
        result = True
    else:
        node = value.producer()
        result = node is not None and all(v is None or _constant(v, seen) for v in node.inputs)
    seen[value.name] = result
    return result


def topk_kl_terms(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Per position (``[..., k]`` targets → ``[...]``): KL between the teacher's top-k + rest
    distribution and the student's coarsened to the same outcomes, at the temperature."""
    s_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s_logp.gather(-1, teacher_ids)
    p_top = teacher_logp.exp()
    kl = (p_top * (teacher_logp - s_top)).sum(-1)
    p_rest = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - s_top.exp().sum(-1)).clamp_min(1e-12)
    return kl + p_rest * (torch.log(p_rest.clamp_min(1e-12)) - torch.log(q_rest))


def topk_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of ``T²·KL`` (:func:`topk_kl_terms`), from the whole logits."""
    kl = topk_kl_terms(student_logits, teacher_logp, teacher_ids, temperature)
    return kl.mean() * temperature * temperature


def head_topk_kl(hidden: torch.Tensor, weight: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor,
                 temperature: float, *, bf16: bool, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """``topk_kl(hidden @ weight, ...)`` with the ``MatMul`` under bf16 autocast when ``bf16``
    (as the graph runs it), computed ``chunk`` positions at a time (module rule)."""
    if weight.dim() != 2 or hidden.dim() < 2:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = torch.matmul(hidden, weight)
        return topk_kl(logits, teacher_logp, teacher_ids, temperature)
    return _ChunkedHeadKL.apply(hidden, weight, teacher_logp, teacher_ids, float(temperature), bool(bf16), max(1, int(chunk)))


class _ChunkedHeadKL(torch.autograd.Function):
    """Forward: the loss, with each chunk's gradients taken on the spot; backward: those."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_logp, teacher_ids, temperature, bf16, chunk):
        rows = hidden.detach().reshape(-1, hidden.shape[-1])
        logp = teacher_logp.reshape(-1, teacher_logp.shape[-1])
        ids = teacher_ids.reshape(-1, teacher_ids.shape[-1])
        n = rows.shape[0]
        trains_weight = weight.requires_grad
        w = weight.detach()
        if trains_weight:
            w.requires_grad_()
        elif bf16:
            w = w.to(torch.bfloat16)  # the cast autocast makes of the weight, once instead of per chunk
        grad_rows = torch.empty_like(rows)
        grad_weight = torch.zeros_like(w) if trains_weight else None
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            h = rows[start:end].detach().requires_grad_()
            with torch.enable_grad():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = torch.matmul(h, w)
                kl = topk_kl_terms(logits, logp[start:end], ids[start:end], temperature)
                loss = kl.sum() / n * temperature * temperature
            grads = torch.autograd.grad(loss, (h, w) if trains_weight else (h,))
            grad_rows[start:end] = grads[0]
            if trains_weight:
                grad_weight += grads[1]
            total += loss.detach()
            del logits, kl, loss, grads
        ctx.save_for_backward(grad_rows.reshape(hidden.shape), grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad, None if grad_weight is None else grad_weight * grad, None, None, None, None, None)


def full_kl_sum(dense_logp: np.ndarray, hidden: torch.Tensor, weight: torch.Tensor | None = None,
                chunk: int = HEAD_CHUNK) -> tuple[float, int]:
    """Sum over positions of KL(dense ‖ student) in float64 over the full vocabulary, and the
    number of positions. The student's logits are ``hidden @ weight`` (float32, no autocast),
    or ``hidden`` itself when ``weight`` is None; either way ``chunk`` positions at a time."""
    vocab = dense_logp.shape[-1]
    dense = dense_logp.reshape(-1, vocab)
    rows = hidden.reshape(-1, hidden.shape[-1])
    kl = np.empty(dense.shape[0], dtype=np.float64)
    for start in range(0, len(kl), chunk):
        end = min(len(kl), start + chunk)
        logits = rows[start:end] if weight is None else torch.matmul(rows[start:end], weight)
        s_logp = torch.log_softmax(logits.float(), dim=-1).numpy().astype(np.float64)
        d = dense[start:end]
        kl[start:end] = (np.exp(d.astype(np.float64)) * (d - s_logp)).sum(-1)
    return float(kl.sum()), int(kl.size)
