"""Peak resident memory of this process per pipeline stage.

The kernel's high-water mark (``VmHWM`` in ``/proc/self/status``) is the process's true peak
(native allocations of ONNX Runtime and numpy, and touched pages of memory-mapped files,
included); it is never reset here, so the largest stage peak equals what ``/usr/bin/time -v``
reports as "Maximum resident set size" (an earlier version reset it per stage through
``/proc/self/clear_refs``, which also lowers the ``getrusage`` maximum that ``time`` reads: the
two then disagreed). A stage's peak is:

* ``VmHWM`` at the end of the stage, when it rose during the stage (the stage set a new
  process peak: exact);
* otherwise the largest ``VmRSS`` a background thread sampled during the stage (every
  ``INTERVAL_S``; a spike shorter than that can be missed) or read at its end.

Without ``/proc`` (not Linux), the process peak so far (``getrusage``) is reported per stage.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import weakref

_STATUS = "/proc/self/status"
#: Seconds between two samples of the resident set.
INTERVAL_S = 0.01


def _status_mb(field: str) -> float | None:
    try:
        with open(_STATUS) as f:
            found = re.search(rf"^{field}:\s+(\d+)\s*kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) / 1024.0 if found else None


def _rusage_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


_watchers: weakref.WeakSet[PeakMemory] = weakref.WeakSet()
_thread: threading.Thread | None = None
_lock = threading.Lock()


def _sample_forever() -> None:
    while True:
        time.sleep(INTERVAL_S)
        watchers = list(_watchers)
        if not watchers:
            continue
        rss = _status_mb("VmRSS")
        if rss is None:
            return
        for watcher in watchers:
            watcher._seen = max(watcher._seen, rss)
        del watchers


def _start_sampler() -> None:
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_sample_forever, name="graphresize-rss", daemon=True)
            _thread.start()


class PeakMemory:
    """``lap()`` returns the peak RSS in MiB since the previous lap (or since creation)."""

    def __init__(self) -> None:
        self.per_stage = _status_mb("VmHWM") is not None
        self._seen = 0.0
        self._hwm = _status_mb("VmHWM") or 0.0
        if self.per_stage:
            _watchers.add(self)
            _start_sampler()

    def lap(self) -> float:
        if not self.per_stage:
            return round(_rusage_mb(), 1)
        hwm = _status_mb("VmHWM") or 0.0
        now = _status_mb("VmRSS") or 0.0
        peak = hwm if hwm > self._hwm else max(self._seen, now)
        self._hwm, self._seen = hwm, now
        return round(peak, 1)

    @staticmethod
    def process_peak() -> float:
        """The process's peak RSS so far in MiB (what ``/usr/bin/time -v`` reports at exit)."""
        return round(_status_mb("VmHWM") or _rusage_mb(), 1)
