"""Measurements of a graph in ONNX Runtime: perplexity and logit agreement on a token stream,
prompt and decode latency."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from graphresize.errors import UnsupportedModelError, UsageError
from graphresize.io.ort_utils import make_feeds

#: Seconds :func:`latency` waits before each timed run. After a run, ORT's idle workers
#: spin-wait for more work (its default, good for serving), and in a side-by-side timing they
#: take cores from the session timed next: on 2 cores, SmolLM2 fused dense and prune-all 0.3
#: alternated gave 266 / 178 ms per prompt (ratio 0.67) without a pause, 221-238 / 136-146 ms
#: (0.61) with 50 ms, as with spinning off (0.61) or each session timed alone (0.59-0.63).
#: (Decode needs none: its timed steps follow an untimed prompt run.)
SETTLE_S = 0.05

#: ``DecodeLatency.mode`` values.
DECODE_KV = "kv-cache"
DECODE_REGROW = "no cache: full re-run per token"


@dataclasses.dataclass(frozen=True)
class Perplexity:
    value: float
    tokens: int
    seq_len: int


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Next-token distributions of a model against a reference graph over the positions that
    perplexity scores: ``top1`` the share of positions with the same argmax, ``kl`` the mean
    KL(reference ‖ model) in nats per token."""

    top1: float
    kl: float
    tokens: int
    reference_perplexity: float


@dataclasses.dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    batch: int
    seq_len: int
    runs: int
    tokens_per_s: float = 0.0
    times_ms: tuple[float, ...] = ()  # every timed run, in order (run i of each session ran side by side)


@dataclasses.dataclass(frozen=True)
class DecodeLatency:
    """Time per generated token (``steps`` greedy tokens after a ``prompt_len`` prompt, the
    prompt itself not timed). ``mode``: ``kv-cache`` when the graph has past key/value inputs
    (one single-token run per step), else every step re-runs the whole grown sequence."""

    median_ms_per_token: float
    p90_ms_per_token: float
    tokens_per_s: float
    batch: int
    prompt_len: int
    steps: int
    runs: int
    mode: str
    times_ms_per_token: tuple[float, ...] = ()  # every timed run, in order


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _windows(stream: np.ndarray, seq_len: int, max_tokens: int | None) -> np.ndarray:
    if max_tokens is not None:
        stream = stream[:max_tokens]
    count = stream.size // seq_len
    if count == 0:
        raise ValueError(f"need at least {seq_len} tokens, got {stream.size}")
    return stream[: count * seq_len].reshape(count, seq_len)


def _logits(session: ort.InferenceSession, window: np.ndarray) -> np.ndarray:
    name = session.get_outputs()[0].name
    return session.run([name], make_feeds(session, window[None, :]))[0][0].astype(np.float32)


def perplexity(
    session: ort.InferenceSession, stream: np.ndarray, *, seq_len: int = 512, max_tokens: int | None = None, progress: bool = False
) -> Perplexity:
    """Token-level perplexity over non-overlapping windows of ``seq_len`` (the usual protocol:
    each window starts without context; every token but the first of a window is scored)."""
    return evaluate_text(session, stream, seq_len=seq_len, max_tokens=max_tokens, progress=progress)[0]


def evaluate_text(
    session: ort.InferenceSession,
    stream: np.ndarray,
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
    reference: ort.InferenceSession | None = None,
    progress: bool = False,
) -> tuple[Perplexity, Agreement | None]:
    """Perplexity of ``session`` and, with a ``reference`` session, its agreement with the
    reference over the same windows and positions (one pass over the windows)."""
    windows = _windows(stream, seq_len, max_tokens)
    positions = np.arange(seq_len - 1)
    nll = ref_nll = kl = 0.0
    same = scored = 0
    for window in tqdm(windows, desc="eval", unit="window", disable=not progress, leave=False):
        logp = _log_softmax(_logits(session, window)[:-1])
        nll -= float(logp[positions, window[1:]].astype(np.float64).sum())
        scored += seq_len - 1
        if reference is None:
            continue
        ref_logp = _log_softmax(_logits(reference, window)[:-1])
        if ref_logp.shape != logp.shape:
            raise UsageError(f"the reference's logits have shape {ref_logp.shape[1:]}, the model's {logp.shape[1:]}")
        ref_nll -= float(ref_logp[positions, window[1:]].astype(np.float64).sum())
        kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1, dtype=np.float64).sum())
        same += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    ppl = Perplexity(value=float(np.exp(nll / scored)), tokens=int(scored), seq_len=seq_len)
    if reference is None:
        return ppl, None
    agreement = Agreement(
        top1=same / scored, kl=max(kl / scored, 0.0), tokens=int(scored), reference_perplexity=float(np.exp(ref_nll / scored))
    )
    return ppl, agreement


def _summary(times: Sequence[float]) -> tuple[float, float]:
    return statistics.median(times), sorted(times)[min(len(times) - 1, int(0.9 * len(times)))]


def latency(
    sessions: dict[str, ort.InferenceSession],
    *,
    batch: int = 1,
    seq_len: int = 128,
    runs: int = 10,
    warmup: int = 2,
    seed: int = 0,
    settle_s: float = SETTLE_S,
) -> dict[str, Latency]:
    """Median and 90th-percentile wall time of one forward pass (prompt processing) of each
    session, measured side by side: runs alternate between sessions so that load on a
    shared machine hits all of them alike, each after a pause of ``settle_s`` (``SETTLE_S``)
    in which the previous session's workers stop spinning."""
    ids = np.random.default_rng(seed).integers(0, 100, size=(batch, seq_len), dtype=np.int64)
    feeds = {name: make_feeds(s, ids) for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, s in sessions.items():
            time.sleep(settle_s)
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1000.0)
    results = {}
    for name, t in times.items():
        median, p90 = _summary(t)
        results[name] = Latency(
            median_ms=median, p90_ms=p90, batch=batch, seq_len=seq_len, runs=runs, tokens_per_s=batch * seq_len * 1000.0 / median,
            times_ms=tuple(t),
        )
    return results


def _is_cache(name: str) -> bool:
    lower = name.lower()
    return "past" in lower or "cache" in lower


def cache_io(session: ort.InferenceSession) -> dict[str, str]:
    """Past key/value input -> the output that carries it to the next step ({} without a cache).

    Outputs are matched by name (``past_key_values.0.key`` -> ``present.0.key``; ``past`` ->
    ``present``), else in order when the graph has as many non-logit outputs as cache inputs.
    """
    past = [i.name for i in session.get_inputs() if _is_cache(i.name)]
    if not past:
        return {}
    outputs = [o.name for o in session.get_outputs()]
    mapping = {}
    for name in past:
        for candidate in (name.replace("past_key_values", "present"), name.replace("past", "present")):
            if candidate != name and candidate in outputs:
                mapping[name] = candidate
                break
    if len(mapping) == len(past):
        return mapping
    rest = outputs[1:]
    if len(rest) == len(past):
        return dict(zip(past, rest, strict=True))
    raise UnsupportedModelError(f"cannot match the {len(past)} cache inputs to graph outputs {outputs[:6]}")


class _Decoder:
    """Greedy decoding of ``steps`` tokens after a prompt, with the cache or by re-running.

    The cache path keeps every tensor in ONNX Runtime (``run_with_ort_values``): each step's
    present key/values go back in as the next step's past without a copy through numpy, as a
    serving loop (onnxruntime-genai, IOBinding) does, so the timing holds the graph's own work
    and not the Python round trip of the whole cache. ``tokens`` holds the last run's greedy
    tokens (one array of ``batch`` ids per generated position).
    """

    def __init__(self, session: ort.InferenceSession, prompt: np.ndarray, steps: int) -> None:
        self.session, self.prompt, self.steps = session, prompt, steps
        self.cache = cache_io(session)
        self.mode = DECODE_KV if self.cache else DECODE_REGROW
        self.logits = session.get_outputs()[0].name
        self.inputs = {i.name.lower(): i.name for i in session.get_inputs()}
        self.tokens: list[np.ndarray] = []

    def run(self) -> float:
        """Decode once; return the seconds spent on the ``steps`` generated tokens."""
        session, batch = self.session, self.prompt.shape[0]
        self.tokens = []
        if not self.cache:
            ids, elapsed = self.prompt, 0.0
            nxt = session.run([self.logits], make_feeds(session, ids))[0][:, -1].argmax(-1)
            for _ in range(self.steps):
                self.tokens.append(nxt)
                ids = np.concatenate([ids, nxt[:, None].astype(ids.dtype)], axis=1)
                start = time.perf_counter()
                nxt = session.run([self.logits], make_feeds(session, ids))[0][:, -1].argmax(-1)
                elapsed += time.perf_counter() - start
            return elapsed
        as_ort = ort.OrtValue.ortvalue_from_numpy
        outputs = [self.logits, *self.cache.values()]
        feeds = make_feeds(session, self.prompt)
        result = session.run_with_ort_values(outputs, {k: as_ort(v) for k, v in feeds.items()})
        length, elapsed = self.prompt.shape[1], 0.0
        for _ in range(self.steps):
            nxt = result[0].numpy()[:, -1].argmax(-1)
            self.tokens.append(nxt)
            step = {}
            for lower, name in self.inputs.items():
                dtype = feeds[name].dtype
                if lower in ("input_ids", "input", "ids", "tokens") or lower.endswith("input_ids"):
                    step[name] = as_ort(nxt[:, None].astype(dtype))
                elif "attention_mask" in lower or lower == "mask":
                    step[name] = as_ort(np.ones((batch, length + 1), dtype=dtype))
                elif "position_ids" in lower:
                    step[name] = as_ort(np.full((batch, 1), length, dtype=dtype))
                elif name not in self.cache:
                    step[name] = as_ort(feeds[name])
            for i, name in enumerate(self.cache):
                step[name] = result[1 + i]
            start = time.perf_counter()
            result = session.run_with_ort_values(outputs, step)
            elapsed += time.perf_counter() - start
            length += 1
        return elapsed


def decode_latency(
    sessions: dict[str, ort.InferenceSession],
    *,
    batch: int = 1,
    prompt_len: int = 128,
    steps: int = 16,
    runs: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, DecodeLatency]:
    """Per-token decode latency of each session, measured side by side like :func:`latency`."""
    prompt = np.random.default_rng(seed).integers(0, 100, size=(batch, prompt_len), dtype=np.int64)
    decoders = {name: _Decoder(s, prompt, steps) for name, s in sessions.items()}
    for _ in range(warmup):
        for d in decoders.values():
            d.run()
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, d in decoders.items():
            times[name].append(d.run() * 1000.0 / steps)
    results = {}
    for name, t in times.items():
        median, p90 = _summary(t)
        results[name] = DecodeLatency(
            median_ms_per_token=median, p90_ms_per_token=p90, tokens_per_s=batch * 1000.0 / median, batch=batch,
            prompt_len=prompt_len, steps=steps, runs=runs, mode=decoders[name].mode, times_ms_per_token=tuple(t),
        )
    return results


def _constant_shape(value, hops: int = 4) -> tuple[int, ...] | None:
    """Shape of a constant weight feeding a MatMul/Gemm: an initializer, a Constant, or one
    seen through Transpose/Cast/Identity/Reshape (how exporters present a tied LM head)."""
    for _ in range(hops + 1):
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(int(d) for d in value.const_value.shape)
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant":
            attr = node.attributes.get("value")
            return tuple(int(d) for d in attr.value.shape) if attr is not None else None
        if node.op_type not in ("Transpose", "Cast", "Identity", "Reshape") or not node.inputs:
            return None
        value = node.inputs[0]
    return None


def weight_flops_per_token(model) -> int:
    """Multiply-add FLOPs per token of the weight matrix products: ``2·K·N`` for every
    ``MatMul``/``Gemm``/``FusedMatMul`` (ORT's fused transpose-and-multiply, e.g. a tied LM
    head after ``--fuse``) whose second operand is a constant ``K×N`` weight (attention's
    activation-by-activation products, which grow with the context, are not counted)."""
    import onnx_ir as ir

    total = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in ("MatMul", "Gemm", "FusedMatMul") or len(node.inputs) < 2:
            continue
        shape = _constant_shape(node.inputs[1])
        if shape is None or len(shape) < 2:
            continue
        total += 2 * int(np.prod(shape))
    return total
