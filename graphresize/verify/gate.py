"""Quality gates of a pipeline step: refuse to write a graph that drifted too far.

Rule: with ``verify_tolerance`` set, the rewritten graph's relative output error on the
hold-out windows must be at most that value; with ``min_top1`` set, its top-1 agreement with
the original must be at least that share; with ``min_cosine`` set, the mean cosine similarity of
its output vectors with the original's must be at least that value. A miss raises
``VerificationError`` (exit 4) before anything is written. Top-1 agreement exists only for
logits over the vocabulary: ``min_top1`` on a model whose first output is hidden states (an
encoder) is a usage error (exit 2, nothing written) that names ``--min-cosine``.
"""

from __future__ import annotations

from graphresize.errors import UsageError, VerificationError
from graphresize.verify.compare import Verification


def check_options(options) -> None:
    """Usage errors in the gate options, raised before any work is done."""
    tolerance = getattr(options, "verify_tolerance", None)
    top1 = getattr(options, "min_top1", None)
    cosine = getattr(options, "min_cosine", None)
    if cosine is not None and not -1.0 <= cosine <= 1.0:
        raise UsageError(f"--min-cosine must be in [-1, 1], got {cosine}")
    if cosine is not None and options.calib is None:
        raise UsageError("--min-cosine needs hold-out data: pass --calib FILE")
    if tolerance is not None and not tolerance >= 0:
        raise UsageError(f"--verify-tolerance must be a non-negative number, got {tolerance}")
    if top1 is not None and not 0.0 <= top1 <= 1.0:
        raise UsageError(f"--min-top1 must be in [0, 1], got {top1}")


def check_top1_applies(model, groups, options) -> None:
    """``min_top1`` on a model whose first output is not logits over the vocabulary (its last
    axis is known and is not the vocabulary's width): the usage error, before any work."""
    if getattr(options, "min_top1", None) is None or not model.graph.outputs:
        return
    vocab = groups.of_kind("vocab")
    shape = model.graph.outputs[0].shape
    last = shape[-1] if shape is not None and len(shape) else None
    if vocab and isinstance(last, int) and last != max(g.width for g in vocab):
        raise UsageError(
            f"--min-top1 needs logits over the vocabulary, but this model's first output has {last} features "
            "(hidden states): use --min-cosine or --verify-tolerance"
        )


def check(verification: Verification | None, options) -> None:
    """Raise ``VerificationError`` when ``verification`` misses a gate of ``options``."""
    tolerance = getattr(options, "verify_tolerance", None)
    top1 = getattr(options, "min_top1", None)
    cosine = getattr(options, "min_cosine", None)
    if verification is None or (tolerance is None and top1 is None and cosine is None):
        return
    if top1 is not None and verification.top1_agreement is None:
        raise UsageError(
            "--min-top1 needs logits over the vocabulary, but this model's first output is hidden states "
            "(top-1 of hidden features means nothing): use --min-cosine or --verify-tolerance; nothing written"
        )
    misses = []
    if cosine is not None and not verification.cosine_similarity >= cosine:
        misses.append(f"cosine similarity {verification.cosine_similarity:.4g} < --min-cosine {cosine:g}")
    if tolerance is not None and not verification.relative_error <= tolerance:
        misses.append(f"relative output error {verification.relative_error:.4g} > --verify-tolerance {tolerance:g}")
    if top1 is not None and not verification.top1_agreement >= top1:
        misses.append(f"top-1 agreement {verification.top1_agreement:.4g} < --min-top1 {top1:g}")
    if misses:
        raise VerificationError(
            f"verification failed on {verification.tokens} hold-out tokens: {'; '.join(misses)}; nothing written"
        )
