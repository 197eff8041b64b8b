"""Quality gates of a pipeline step: refuse to write a graph that drifted too far.

Rule: with ``verify_tolerance`` set, the rewritten graph's relative output error on the
hold-out windows must be at most that value; with ``min_top1`` set, its top-1 agreement with
the original must be at least that share. A miss raises ``VerificationError`` (exit 4) before
anything is written.
"""

from __future__ import annotations

from graphresize.errors import UsageError, VerificationError
from graphresize.verify.compare import Verification


def check_options(options) -> None:
    """Usage errors in the gate options, raised before any work is done."""
    tolerance = getattr(options, "verify_tolerance", None)
    top1 = getattr(options, "min_top1", None)
    if tolerance is not None and not tolerance >= 0:
        raise UsageError(f"--verify-tolerance must be a non-negative number, got {tolerance}")
    if top1 is not None and not 0.0 <= top1 <= 1.0:
        raise UsageError(f"--min-top1 must be in [0, 1], got {top1}")


def check(verification: Verification | None, options) -> None:
    """Raise ``VerificationError`` when ``verification`` misses a gate of ``options``."""
    tolerance = getattr(options, "verify_tolerance", None)
    top1 = getattr(options, "min_top1", None)
    if verification is None or (tolerance is None and top1 is None):
        return
    misses = []
    if tolerance is not None and not verification.relative_error <= tolerance:
        misses.append(f"relative output error {verification.relative_error:.4g} > --verify-tolerance {tolerance:g}")
    if top1 is not None and not verification.top1_agreement >= top1:
        misses.append(f"top-1 agreement {verification.top1_agreement:.4g} < --min-top1 {top1:g}")
    if misses:
        raise VerificationError(
            f"verification failed on {verification.tokens} hold-out tokens: {'; '.join(misses)}; nothing written"
        )
