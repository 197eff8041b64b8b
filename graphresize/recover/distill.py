"""Recovery by distillation: train a narrowed graph's changed weights toward the dense
graph's next-token distribution.

Rule: minimise ``T²·KL(p_dense^T ‖ p_narrow^T)`` (``T`` the temperature) averaged over every
position of the calibration windows, with AdamW over the trainable initializers only
(:func:`changed_initializers`: the float tensors the resize created or changed); everything
else stays frozen. The dense distribution is computed once per window in ONNX Runtime and
kept as its ``top_k`` log-probabilities plus the rest of the mass in one bucket, so the loss
is the KL between the two distributions coarsened to those ``top_k + 1`` outcomes (exact
when ``top_k`` covers the vocabulary). The learning rate warms up linearly over the first
tenth of the steps and then follows a cosine to zero; gradients are clipped to norm 1.

Speed (measured on SmolLM2 prune-mlp 0.3, 4 × 256 tokens a step, 2 shared cores; profile in
``benchmarks/heal.md``): the step is a long chain of small element-wise ops, and two
OpenMP threads fighting other processes for two cores spend most of their time waiting on each
other (one 1.1M-element ``mul``: 9.6 ms with 2 threads, 1.25 ms with 1). So healing runs on
``threads`` torch/ORT threads (default 1: 43 s → 15 s a step) and, where the CPU has native
bf16 (AVX512-BF16/AMX), under ``torch.autocast(bfloat16)`` (``precision="auto"``; 15 s → 8 s):
the matrix products run in bf16, the master weights, the optimizer state, the loss and
everything written back stay float32, and the hold-out KL is measured in float32.

Memory (SmolLM2-135M pruned at 0.3, a short heal: peak RSS 5.8 GB before these rules, 4.0 GB
after; ``benchmarks/heal.md``, "Heal memory"): the dense model's work is done first
(:func:`dense_targets`: the changed initializers, the top-k targets, the hold-out
log-probabilities), so that a caller that loaded it (``recover.heal_model`` given its file,
``heal_file``, ``optimize --heal``) drops it before :func:`train` starts; the narrow model's
initializers are held as numpy arrays that the frozen torch tensors share
(``arrays.HoldAsArraysPass``, ``torch_graph.tensor_to_torch(share=True)``); and the LM head
with the loss runs a chunk of positions at a time (``loss.head_topk_kl``). None of the three
changes a trained weight or a KL where measured (SmolLM2 and the tiny test models: the same
bytes as before them); the chunked head computes each row as the whole head does, so only a
kernel that rounds a short chunk's rows differently can move last bits (``tests/test_heal.py``).

Determinism: the window order comes from ``numpy.random.default_rng(seed)``, torch is seeded
and set to deterministic algorithms, and the thread count is fixed by the settings, so one
seed on one machine gives the same weights, byte for byte.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch
from tqdm import tqdm

from graphresize.errors import UnsupportedModelError, UsageError
from graphresize.io.ort_utils import cache_head_sizes, make_feeds, make_session
from graphresize.memory import PeakMemory
from graphresize.recover.arrays import HoldAsArraysPass
from graphresize.recover.loss import Head, find_head, full_kl_sum, head_topk_kl, topk_kl
from graphresize.recover.settings import PRECISIONS, HealSettings, check_settings, cpu_has_bf16
from graphresize.recover.torch_graph import TorchGraph

__all__ = ["PRECISIONS", "DenseTargets", "HealResult", "HealSettings", "changed_initializers", "check_settings",
           "cpu_has_bf16", "dense_targets", "schedule", "topk_kl", "train"]

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass(frozen=True, eq=False)
class HealResult:
    """Trained arrays by initializer name (the model's dtype), and what the training cost.

    ``kl_before`` / ``kl_after``: mean KL(dense ‖ narrow) in nats per token (full vocabulary,
    temperature 1) on ``kl_windows`` (``holdout``: windows the training never saw;
    ``calibration``: the first training windows, when no held-out windows were given).
    ``loss_first`` / ``loss_last``: the training loss (top-k KL) of the first and last step.
    """

    weights: Mapping[str, np.ndarray]
    settings: HealSettings
    kl_before: float
    kl_after: float
    kl_windows: str
    loss_first: float
    loss_last: float
    steps: int
    tokens_seen: int
    params_trained: int
    seconds: float
    seconds_per_step: float
    teacher_seconds: float
    peak_rss_mb: float

    @property
    def trained(self) -> tuple[str, ...]:
        return tuple(self.weights)


def changed_initializers(dense: ir.Model, narrow: ir.Model) -> tuple[str, ...]:
    """Float initializers of ``narrow`` that the resize created or changed: absent from
    ``dense`` by name, or present with another shape or other values (compare against the
    dense model as the resize saw it, i.e. after ``prepare_passes``, so that tensors it only
    renamed or untied are recognised)."""
    before = dense.graph.initializers
    changed = []
    for name, value in narrow.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or value.dtype not in FLOAT_TYPES or tensor.size == 0:
            continue
        old = before.get(name)
        if old is None or old.const_value is None or old.dtype != value.dtype:
            changed.append(name)
            continue
        if tuple(old.const_value.shape) != tuple(tensor.shape) or not np.array_equal(old.const_value.numpy(), tensor.numpy()):
            changed.append(name)
    return tuple(changed)


def schedule(windows: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Window indices for each step, ``[steps, batch_size]``: epochs of seeded permutations."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    order = np.concatenate([rng.permutation(windows) for _ in range(-(-need // windows))])
    return order[:need].reshape(steps, batch_size)


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first tenth of the steps, then a cosine to zero."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def torch_feeds(model: ir.Model, ids: np.ndarray) -> dict[str, torch.Tensor]:
    """Torch feeds for token ids ``[batch, seq]``, by the rules of ``ort_utils.make_feeds``."""

    class _Spec:  # what make_feeds reads of an ORT input description
        def __init__(self, value: ir.Value) -> None:
            self.name = value.name
            self.type = f"tensor({_ORT_NAMES.get(value.dtype, 'unknown')})"
            self.shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else []

    class _Inputs:
        graphresize_cache_head_sizes = cache_head_sizes(model)

        def get_inputs(self):
            return [_Spec(v) for v in model.graph.inputs]

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in make_feeds(_Inputs(), ids).items()}


_ORT_NAMES = {
    ir.DataType.INT64: "int64",
    ir.DataType.INT32: "int32",
    ir.DataType.FLOAT: "float",
    ir.DataType.FLOAT16: "float16",
    ir.DataType.DOUBLE: "double",
    ir.DataType.BOOL: "bool",
}


def _logits_name(model: ir.Model) -> str:
    outputs = [v.name for v in model.graph.outputs]
    return "logits" if "logits" in outputs else outputs[0]


@dataclasses.dataclass(frozen=True, eq=False)
class _Teacher:
    """Per window: the dense model's top-k log-probabilities at the temperature and their
    token ids (``[windows, seq, k]``)."""

    logp: torch.Tensor
    ids: torch.Tensor


def _dense_logits(session, model: ir.Model, ids: np.ndarray) -> np.ndarray:
    name = _logits_name(model)
    return session.run([name], make_feeds(session, ids))[0].astype(np.float32)


def _teacher(session, dense: ir.Model, windows: np.ndarray, used: Sequence[int], settings: HealSettings,
             progress: bool) -> _Teacher:
    seq = windows.shape[1]
    k = None
    logp = ids = None
    used = list(used)
    batch = max(1, settings.batch_size)
    for start in tqdm(range(0, len(used), batch), desc="heal: dense targets", unit="batch", disable=not progress, leave=False):
        rows = used[start:start + batch]
        logits = torch.from_numpy(_dense_logits(session, dense, windows[rows]))
        if logits.dim() != 3 or logits.shape[1] != seq:
            raise UnsupportedModelError(f"the dense model's logits have shape {tuple(logits.shape)}; expected [batch, {seq}, vocab]")
        lp = torch.log_softmax(logits / settings.temperature, dim=-1)
        if k is None:
            k = min(settings.top_k, lp.shape[-1])
            logp = torch.zeros(len(windows), seq, k, dtype=torch.float32)
            ids = torch.zeros(len(windows), seq, k, dtype=torch.int64)
        top = torch.topk(lp, k, dim=-1, sorted=True)
        logp[rows], ids[rows] = top.values, top.indices
    return _Teacher(logp=logp, ids=ids)


def _log_softmax_np(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))




@dataclasses.dataclass(frozen=True, eq=False)
class DenseTargets:
    """All the training needs of the dense model, computed before the training starts so
    that the dense model can be released first: which initializers train, the top-k targets
    of every scheduled window, and the dense log-probabilities of the KL windows."""

    trainable: tuple[str, ...]
    plan: np.ndarray  # window indices per step, [steps, batch_size]
    teacher: _Teacher
    check: np.ndarray  # the windows the KL before/after is measured on
    check_logp: list[np.ndarray]  # their dense log-probabilities, one [batch, seq, vocab] array per batch
    kl_windows: str
    seconds: float
    memory: PeakMemory  # started before the dense model's work, so the heal's peak includes it


def dense_targets(
    dense: ir.Model,
    narrow: ir.Model,
    windows: np.ndarray,
    settings: HealSettings,
    *,
    check_windows: np.ndarray | None = None,
    trainable: Sequence[str] | None = None,
    provider: str = "cpu",
    progress: bool = True,
) -> DenseTargets:
    """The dense model's part of a heal (``narrow`` is only compared with it, to find the
    changed initializers unless ``trainable`` names them). Runs ONNX Runtime on
    ``settings.threads`` threads."""
    check_settings(settings)
    windows = _check_windows(windows)
    names = tuple(changed_initializers(dense, narrow) if trainable is None else trainable)
    if not names:
        raise UsageError("the narrow model has no weights that differ from the dense model: nothing to heal")
    memory = PeakMemory()  # resets the high-water mark: the peak below is the heal's own
    start = time.perf_counter()
    plan = schedule(len(windows), settings.steps, settings.batch_size, settings.seed)
    used = sorted(set(plan.reshape(-1).tolist()))
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        session = make_session(dense, provider=provider, threads=settings.threads or None)
        teacher = _teacher(session, dense, windows, used, settings, progress)
        if check_windows is not None and len(check_windows):
            check, kl_windows = np.asarray(check_windows, dtype=np.int64), "holdout"
        else:
            check, kl_windows = windows[plan[0]], "calibration"
        batch = settings.batch_size
        check_logp = [_log_softmax_np(_dense_logits(session, dense, check[i:i + batch])) for i in range(0, len(check), batch)]
        del session
    finally:
        torch.set_num_threads(threads)
    return DenseTargets(trainable=names, plan=plan, teacher=teacher, check=check, check_logp=check_logp, kl_windows=kl_windows,
                        seconds=time.perf_counter() - start, memory=memory)


def _check_windows(windows: np.ndarray) -> np.ndarray:
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or len(windows) == 0:
        raise UsageError(f"healing needs calibration windows [n, seq], got shape {windows.shape}")
    return windows


def train(narrow: ir.Model, windows: np.ndarray, targets: DenseTargets, settings: HealSettings, *,
          progress: bool = True) -> HealResult:
    """Train ``narrow``'s ``targets.trainable`` initializers toward the dense targets on
    ``windows`` (the ones ``targets`` was made from); the model's values are not modified (its
    protobuf-held initializers are re-held as numpy arrays with the same bytes,
    ``arrays.HoldAsArraysPass``, so that the frozen torch tensors share them). See the module rule."""
    entered = time.perf_counter()
    check_settings(settings)
    windows = _check_windows(windows)
    HoldAsArraysPass()(narrow)
    torch.manual_seed(settings.seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        logits = _logits_name(narrow)
        head = find_head(narrow.graph, logits)
        module = TorchGraph(narrow, trainable=targets.trainable, outputs=[head.hidden, head.weight] if head else [logits])
        kl_before = _mean_kl(module, head, narrow, targets, settings.batch_size)
        params = list(module.params)
        optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
        teacher, plan = targets.teacher, targets.plan
        losses = []
        train_start = time.perf_counter()
        bar = tqdm(range(settings.steps), desc="heal", unit="step", disable=not progress, leave=False)
        for step in bar:
            rows = plan[step]
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_factor(step, settings.steps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                outs = module(torch_feeds(narrow, windows[rows]))
            if head is None:
                loss = topk_kl(outs[0], teacher.logp[rows], teacher.ids[rows], settings.temperature)
            else:
                loss = head_topk_kl(outs[0], outs[1], teacher.logp[rows], teacher.ids[rows], settings.temperature, bf16=settings.bf16)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            del outs
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
        train_seconds = time.perf_counter() - train_start
        kl_after = _mean_kl(module, head, narrow, targets, settings.batch_size)
        weights = {}
        for name, param in module.named_trainable().items():
            dtype = narrow.graph.initializers[name].dtype.numpy()
            weights[name] = param.detach().numpy().astype(dtype)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    return HealResult(
        weights=weights,
        settings=settings,
        kl_before=kl_before,
        kl_after=kl_after,
        kl_windows=targets.kl_windows,
        loss_first=losses[0],
        loss_last=losses[-1],
        steps=settings.steps,
        tokens_seen=int(settings.steps * settings.batch_size * windows.shape[1]),
        params_trained=int(sum(w.size for w in weights.values())),
        seconds=targets.seconds + time.perf_counter() - entered,
        seconds_per_step=train_seconds / settings.steps,
        teacher_seconds=targets.seconds,
        peak_rss_mb=targets.memory.lap(),
    )


def _mean_kl(module: TorchGraph, head: Head | None, narrow: ir.Model, targets: DenseTargets, batch: int) -> float:
    """Mean KL(dense ‖ narrow) per position over ``targets.check`` (float32 forward, float64 KL)."""
    total = count = 0.0
    check = targets.check
    with torch.no_grad():
        for i, start in enumerate(range(0, len(check), batch)):
            outs = module(torch_feeds(narrow, check[start:start + batch]))
            s, n = full_kl_sum(targets.check_logp[i], outs[0], outs[1] if head is not None else None)
            total, count = total + s, count + n
    return total / max(count, 1.0)
