"""The values carried between segments, one array per window batch.

A value whose arrays over all batches pass ``spill_bytes`` is written to ``.npy`` files in a
temporary folder and read back memory-mapped, so the calibration stream of a large model
lives on disk, not in RAM (the page cache holds what is being read). Small values (masks,
shapes, a tiny model's stream) stay in memory.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Above this many bytes over all batches, a carried value is kept memory-mapped on disk.
SPILL_BYTES = 256 * 2**20


class Carry:
    """``batches`` dicts of name -> array; ``put`` spills large values, ``keep`` drops the rest."""

    def __init__(self, batches: int, spill_bytes: int = SPILL_BYTES) -> None:
        self.batches: list[dict[str, np.ndarray]] = [{} for _ in range(batches)]
        self.spill_bytes = spill_bytes
        self._dir: Path | None = None
        self.spilled = 0  # arrays written to disk so far (for the report and tests)
        self._files: dict[tuple[int, str], Path] = {}

    def put(self, batch: int, name: str, array: np.ndarray) -> None:
        if array.nbytes * len(self.batches) > self.spill_bytes and array.nbytes > 0:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="graphresize-stream-"))
            path = self._dir / f"{self.spilled}.npy"
            np.save(path, array)
            array = np.load(path, mmap_mode="r")
            self._files[(batch, name)] = path
            self.spilled += 1
        self.batches[batch][name] = array

    def keep(self, names: set[str]) -> None:
        """Forget every value not in ``names`` (a spilled one's file is removed; a memory map
        still open on it stays valid until dropped)."""
        for batch, values in enumerate(self.batches):
            for name in [n for n in values if n not in names]:
                del values[name]
                path = self._files.pop((batch, name), None)
                if path is not None:
                    path.unlink(missing_ok=True)

    def close(self) -> None:
        self.batches = [{} for _ in self.batches]
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Carry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OnDisk(Sequence):
    """A list of arrays kept in ``.npy`` files: ``[i]`` reads one back whole (a plain read, not
    a memory map, so nothing stays resident once the caller drops it). For outputs held for
    the whole run (the dense hold-out reference logits): the folder goes with the object."""

    def __init__(self, arrays) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="graphresize-outputs-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._n = 0
        for array in arrays:
            np.save(self._dir / f"{self._n}.npy", np.asarray(array))
            self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return np.load(self._dir / f"{i % self._n}.npy")
