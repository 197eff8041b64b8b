"""A segment's calibration as map + reduce over window shards (``--workers N``, ``--ray-address``).

Rule: a group's statistics are sums over window batches (``calibrate.statistics``: the float64
Gram ``Σ AᵀA``, the column sums and the row count). The carried batches of a segment are cut
into ``shards`` contiguous runs; each *map* task builds the segment's ONNX Runtime session
from its serialized protobuf (weights inline: one segment, shipped once per segment through
Ray's object store), runs its batches and returns the partial float64 sums of every request;
the driver *reduces* them in shard order. Each batch's product is the same float32 product as
in the single-process run; only the float64 summation order changes, so statistics agree to
float64 rounding (~1e-16 relative).

Runners:

* :class:`RayRunner` — tasks on a Ray cluster: a local one with ``workers`` CPUs started here
  (``--workers N``) or an existing one joined (``--ray-address ADDR``). A task that raises or
  whose worker dies is retried once by Ray (``max_retries=1``); a shard that fails twice ends
  the run with :class:`ShardError` (one line; the pipeline writes nothing).
* :class:`SerialRunner` — the same map and reduce in this process, one shard after the other
  (the reference for tests, and a check of the sharding without a cluster).

Fault injection for tests: ``GRAPHRESIZE_FAIL_SHARD=<i>`` makes every attempt of shard ``i``
raise (``<i>:once`` only its first attempt, which the retry then recovers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from graphresize.calibrate.statistics import GroupStats, StatRequest, _Accumulator
from graphresize.errors import GraphresizeError, UsageError

FAIL_ENV = "GRAPHRESIZE_FAIL_SHARD"


class ShardError(GraphresizeError):
    """A calibration shard failed on every attempt."""


def shard_bounds(batches: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, stop) runs over ``batches`` (sizes differ by at most one;
    none empty)."""
    shards = max(1, min(shards, batches))
    edges = np.linspace(0, batches, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _injected_failure(shard: int, attempt_marker: str, spec: str) -> None:
    if not spec:
        return
    index, _, mode = spec.partition(":")
    if index.strip() != str(shard):
        return
    if mode == "once":
        if os.path.exists(attempt_marker):
            return
        with open(attempt_marker, "w"):
            pass
    raise RuntimeError(f"injected failure of shard {shard} ({FAIL_ENV})")


def map_shard(proto: bytes, feeds: Sequence[dict[str, np.ndarray]], outputs: Sequence[str],
              requests: Sequence[StatRequest], provider: str, shard: int = 0,
              marker: str = "", fail: str = "") -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """The map task: partial sums of ``requests`` over ``feeds`` (one dict per batch) through
    the segment ``proto``; key -> (gram, total, count). ``fail``: the driver's
    ``GRAPHRESIZE_FAIL_SHARD`` (workers do not see the driver's later environment)."""
    import onnxruntime as ort

    from graphresize.io.ort_utils import providers_for, session_options

    _injected_failure(shard, marker, fail)
    options = session_options()
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(proto, options, providers=providers_for(provider))
    acc = {r.key: _Accumulator(r.width, r.unit_rms) for r in requests}
    for batch in feeds:
        values = dict(zip(outputs, session.run(list(outputs), batch), strict=True))
        for request in requests:
            for entry in request.values:
                acc[request.key].add(sum(values[name] for name in entry))
    return {key: (a.gram, a.total, a.count) for key, a in acc.items()}


def reduce_partials(partials: Sequence[dict[str, tuple[np.ndarray, np.ndarray, int]]],
                    requests: Sequence[StatRequest]) -> dict[str, GroupStats]:
    """The reduce: the partial sums added in shard order, in float64."""
    out = {}
    for request in requests:
        gram = np.zeros((request.width, request.width))
        total = np.zeros(request.width)
        count = 0
        for part in partials:
            g, t, c = part[request.key]
            gram += g
            total += t
            count += c
        out[request.key] = GroupStats(gram=gram, total=total, count=count)
    return out


class SerialRunner:
    """Map tasks one after the other in this process (module docstring)."""

    def __init__(self, shards: int = 2) -> None:
        self.shards = shards

    def map(self, proto: bytes, shard_feeds: list[list[dict]], outputs, requests, provider: str) -> list[dict]:
        parts = []
        for i, feeds in enumerate(shard_feeds):
            try:
                parts.append(map_shard(proto, feeds, outputs, requests, provider, i, fail=os.environ.get(FAIL_ENV, "")))
            except Exception as exc:
                raise ShardError(f"calibration shard {i} failed: {str(exc).splitlines()[0][:200]}") from None
        return parts

    def close(self) -> None:
        pass


class RayRunner:
    """Map tasks on Ray (module docstring); ``shards`` = the cluster's CPUs unless given."""

    def __init__(self, workers: int = 0, address: str | None = None, shards: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError("--workers/--ray-address need Ray: pip install 'graphresize[ray]'") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    ray.init(num_cpus=workers, object_store_memory=max(256 * 2**20, workers * 128 * 2**20), **kwargs)
            except Exception as exc:
                where = f"the Ray cluster at {address}" if address else f"a local Ray cluster of {workers} workers"
                raise UsageError(f"cannot start {where}: {str(exc).splitlines()[0][:200]}") from None
        self.shards = shards or max(1, int(ray.cluster_resources().get("CPU", workers or 1)))
        self._task = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=True)(map_shard)
        import tempfile

        self._markers = tempfile.mkdtemp(prefix="graphresize-shards-")

    def map(self, proto: bytes, shard_feeds: list[list[dict]], outputs, requests, provider: str) -> list[dict]:
        ray = self._ray
        proto_ref = ray.put(proto)
        refs = [self._task.remote(proto_ref, feeds, list(outputs), list(requests), provider, i,
                                  os.path.join(self._markers, f"{i}.attempt"), os.environ.get(FAIL_ENV, ""))
                for i, feeds in enumerate(shard_feeds)]
        parts = []
        for i, ref in enumerate(refs):
            try:
                parts.append(ray.get(ref))
            except Exception as exc:
                for other in refs[i + 1 :]:
                    ray.cancel(other, force=True)
                cause = getattr(exc, "cause", None) or exc
                text = str(cause).strip().splitlines()
                reason = next((line for line in reversed(text) if line.strip()), type(cause).__name__)
                raise ShardError(f"calibration shard {i} failed twice (Ray): {reason.strip()[:200]}") from None
        del proto_ref
        return parts

    def close(self) -> None:
        import shutil

        shutil.rmtree(self._markers, ignore_errors=True)
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


def make_runner(options) -> SerialRunner | RayRunner | None:
    """The runner ``options`` ask for (None: calibrate in the engine's own loop)."""
    workers = getattr(options, "workers", 0) or 0
    address = getattr(options, "ray_address", None)
    if not workers and not address:
        return None
    return RayRunner(workers=workers, address=address)


def accumulate(runner, model, cut, k: int, carry, requests: list[StatRequest], provider: str) -> dict[str, GroupStats]:
    """Statistics of ``requests`` (all computed by segment ``k``) over every carried batch,
    as map + reduce over ``runner.shards`` contiguous shards of batches."""
    from graphresize.engine.submodel import segment_proto

    seg = cut.segments[k]
    names = list(dict.fromkeys(n for r in requests for n in r.names()))
    proto = segment_proto(model, seg, names).SerializeToString()
    bounds = shard_bounds(len(carry.batches), runner.shards)
    shard_feeds = [[{n: np.ascontiguousarray(carry.batches[b][n]) for n in seg.inputs} for b in range(start, stop)]
                   for start, stop in bounds]
    parts = runner.map(proto, shard_feeds, names, requests, provider)
    return reduce_partials(parts, requests)
