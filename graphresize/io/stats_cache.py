"""A folder cache of calibration statistics (``optimize --stats-cache DIR``).

Rules:

* one file per statistic request, named by a SHA-256 over everything its numbers depend on:
  the input model's bytes (its external data files included), the graphresize version, the
  residual groups prepared for routing (folding changes the graph that is run), the
  calibration token windows, the provider and the batch size, and the request itself (the
  values it reads, its width, its unit-RMS flag); the request's key (a label) is not part of it;
* a run at another ratio, or with another method reading the same values, finds its
  statistics there and skips those forward passes; anything else is computed and stored;
* files are written whole (temporary name, then rename); an unreadable entry counts as a miss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from graphresize import __version__
from graphresize.calibrate.statistics import GroupStats, StatRequest
from graphresize.errors import InputError
from graphresize.io.modelio import file_sha256

CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class StatsCache:
    """Statistics of one model, preparation and set of windows, stored in ``folder``."""

    folder: Path
    context: str  # digest of what every request's statistics depend on

    def path(self, request: StatRequest) -> Path:
        spec = {"values": [list(v) for v in request.values], "width": request.width, "unit_rms": request.unit_rms}
        digest = hashlib.sha256((self.context + json.dumps(spec, sort_keys=True)).encode()).hexdigest()
        return self.folder / f"{digest[:32]}.npz"

    def load(self, requests: Sequence[StatRequest]) -> dict[str, GroupStats]:
        """The cached statistics of ``requests``, by request key (misses are absent)."""
        found = {}
        for request in requests:
            try:
                with np.load(self.path(request), allow_pickle=False) as data:
                    stats = GroupStats(gram=data["gram"], total=data["total"], count=int(data["count"]))
            except (OSError, KeyError, ValueError):
                continue
            if stats.gram.shape == (request.width, request.width):
                found[request.key] = stats
        return found

    def store(self, requests: Sequence[StatRequest], stats: dict[str, GroupStats]) -> None:
        """Write the statistics of ``requests`` (a failed write only loses the cache entry)."""
        for request in requests:
            target = self.path(request)
            entry = stats[request.key]
            try:
                fd, tmp = tempfile.mkstemp(prefix=".stats.", suffix=".npz", dir=self.folder)
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, gram=entry.gram, total=entry.total, count=np.int64(entry.count))
                os.replace(tmp, target)
            except OSError:
                Path(tmp).unlink(missing_ok=True)


def open_cache(
    folder: Path,
    model_files: Iterable[Path],
    prepared: Iterable[str],
    windows: np.ndarray,
    *,
    provider: str,
    batch_size: int,
) -> StatsCache:
    """The cache in ``folder`` (created if missing) for this model, preparation and windows."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot use as --stats-cache ({exc.strerror or exc})") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(f"{folder}: --stats-cache must be a writable folder")
    digest = hashlib.sha256(f"graphresize {__version__} stats {CACHE_FORMAT}".encode())
    for path in sorted(Path(p).resolve() for p in model_files):
        digest.update(file_sha256(path).encode())
    digest.update(json.dumps(sorted(prepared)).encode())
    windows = np.ascontiguousarray(windows, dtype=np.int64)
    digest.update(repr(windows.shape).encode() + windows.tobytes())
    digest.update(f"{provider} {batch_size}".encode())
    return StatsCache(folder, digest.hexdigest())

