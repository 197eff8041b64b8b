"""A folder cache of calibration statistics (``optimize --stats-cache DIR``).

Rules:

* one file per statistic request, named by a SHA-256 over everything its numbers depend on:
  the input model's bytes (its external data files included), the graphresize version, the
  residual groups prepared for routing (folding changes the graph that is run), the
  calibration token windows, the provider and the batch size, and the request itself (the
  values it reads, its width, its unit-RMS flag); the request's key (a label) is not part of it;
* a run at another ratio, or with another method reading the same values, finds its
  statistics there and skips those forward passes; anything else is computed and stored;
* files are written whole (temporary name, then rename);
* every entry holds its own file key (the digest its name is cut from) and a SHA-256 over its
  key and arrays; an entry that cannot be read, is not a regular file, belongs to another key,
  has the wrong shapes or types, or whose checksum does not match (altered values) is a miss:
  it is recomputed, replaced, and listed in the run's summary and report, never fatal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from graphresize import __version__
from graphresize.calibrate.statistics import GroupStats, StatRequest
from graphresize.errors import InputError
from graphresize.io.modelio import file_sha256

CACHE_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class CacheRead:
    """What :meth:`StatsCache.read` found: usable statistics by request key, and the entries
    it refused (``file: why``), which are computed again."""

    found: dict[str, GroupStats]
    rejected: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class StatsCache:
    """Statistics of one model, preparation and set of windows, stored in ``folder``."""

    folder: Path
    context: str  # digest of what every request's statistics depend on

    def path(self, request: StatRequest) -> Path:
        return self.folder / f"{self.digest(request)[:32]}.npz"

    def digest(self, request: StatRequest) -> str:
        """The entry key of ``request``: SHA-256 over the context and what the request reads."""
        spec = {"values": [list(v) for v in request.values], "width": request.width, "unit_rms": request.unit_rms}
        return hashlib.sha256((self.context + json.dumps(spec, sort_keys=True)).encode()).hexdigest()

    def load(self, requests: Sequence[StatRequest]) -> dict[str, GroupStats]:
        """The cached statistics of ``requests``, by request key (misses are absent)."""
        return self.read(requests).found

    def read(self, requests: Sequence[StatRequest]) -> CacheRead:
        """The cached statistics of ``requests`` and the entries refused, with why."""
        found, rejected = {}, []
        for request in requests:
            path = self.path(request)
            try:
                info = os.stat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                rejected.append(f"{path.name}: {exc.strerror or exc}")
                continue
            if not stat.S_ISREG(info.st_mode):
                rejected.append(f"{path.name}: not a regular file")
                continue
            try:
                stats = _read_entry(path, self.digest(request), request.width)
            except MemoryError:
                raise
            except Exception as exc:  # BadZipFile, EOFError, ValueError, KeyError, zlib.error ...
                rejected.append(f"{path.name}: {_reason(exc)}")
                continue
            found[request.key] = stats
        return CacheRead(found, tuple(rejected))

    def store(self, requests: Sequence[StatRequest], stats: dict[str, GroupStats]) -> None:
        """Write the statistics of ``requests`` (a failed write only loses the cache entry)."""
        for request in requests:
            target = self.path(request)
            entry = stats[request.key]
            key = self.digest(request)
            gram = np.ascontiguousarray(entry.gram, dtype=np.float64)
            total = np.ascontiguousarray(entry.total, dtype=np.float64)
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(prefix=".stats.", suffix=".npz", dir=self.folder)
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, gram=gram, total=total, count=np.int64(entry.count), key=np.array(key),
                             checksum=np.array(_checksum(key, gram, total, int(entry.count))))
                os.replace(tmp, target)
            except OSError:
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)


class _Corrupt(ValueError):
    pass


def _read_entry(path: Path, key: str, width: int) -> GroupStats:
    """One entry, checked: its key, shapes, types and checksum (raises ``_Corrupt`` or what
    the reader raises)."""
    with np.load(path, allow_pickle=False) as data:
        if str(data["key"][()]) != key:
            raise _Corrupt("written for another request")
        gram, total, count = data["gram"], data["total"], data["count"]
        checksum = str(data["checksum"][()])
    if gram.dtype != np.float64 or total.dtype != np.float64 or count.shape != () or count.dtype.kind != "i":
        raise _Corrupt("wrong types")
    if gram.shape != (width, width) or total.shape != (width,):
        raise _Corrupt(f"wrong shape {gram.shape}, expected ({width}, {width})")
    if _checksum(key, gram, total, int(count)) != checksum:
        raise _Corrupt("checksum mismatch (altered values)")
    return GroupStats(gram=gram, total=total, count=int(count))


def _checksum(key: str, gram: np.ndarray, total: np.ndarray, count: int) -> str:
    digest = hashlib.sha256(f"{key} {gram.shape} {total.shape} {count}".encode())
    digest.update(np.ascontiguousarray(gram).tobytes())
    digest.update(np.ascontiguousarray(total).tobytes())
    return digest.hexdigest()


def _reason(exc: Exception) -> str:
    if isinstance(exc, _Corrupt):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"unreadable ({type(exc).__name__}{': ' + text[0][:80] if text else ''})"


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

