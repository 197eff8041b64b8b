"""Peak resident memory of this process per pipeline stage.

On Linux the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``) is read at the end
of each stage and reset (``5`` written to ``/proc/self/clear_refs``), so every stage gets its
own peak, native allocations (ONNX Runtime, numpy) included. Elsewhere, or where the reset is
not allowed, the process peak so far (``getrusage``) is reported instead: it never goes down.
"""

from __future__ import annotations

import re
import sys

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _hwm_mb() -> float | None:
    try:
        with open(_STATUS) as f:
            found = re.search(r"^VmHWM:\s+(\d+)\s*kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) / 1024.0 if found else None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rusage_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


class PeakMemory:
    """``lap()`` returns the peak RSS in MiB since the previous lap (or since creation)."""

    def __init__(self) -> None:
        self.per_stage = _hwm_mb() is not None and _reset_hwm()

    def lap(self) -> float:
        if self.per_stage:
            peak = _hwm_mb()
            if peak is not None and _reset_hwm():
                return round(peak, 1)
            self.per_stage = False
        return round(_rusage_mb(), 1)
