"""Recovery after a resize ("healing"): distil the dense model into the narrowed one.

    from graphresize.recover import heal_file, heal_model
    result = heal_file("model.onnx", "model.small.onnx", "model.healed.onnx", "wiki.txt", steps=100)
    result = heal_file(..., HealSettings(steps=100, lr=3e-4))  # the same settings as one object

The narrowed graph is trained as a torch module interpreted from the ONNX graph itself
(``torch_graph.py``, written by hand: ``onnx2torch`` 1.5.15 needs ``torchvision`` and has no
converter for ``LessOrEqual``-16, which every tiny and SmolLM2 export here uses); only the
initializers the resize changed train, and the trained arrays go back into the same
initializers (``graphresize.passes.write_weights``), so the graph, its names and its dtype
stay as they were. torch is an optional extra (``pip install 'graphresize[heal]'``); without
it healing is a one-line usage error. This module imports torch only when healing runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphresize.errors import UsageError
from graphresize.recover.settings import HealSettings, heal_settings

__all__ = ["HealFileResult", "HealSettings", "apply_weights", "heal_file", "heal_model", "heal_settings", "load_dense",
           "require_torch"]


def require_torch():
    """The torch module, or a one-line ``UsageError`` saying how to install it."""
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise UsageError(
            "healing needs torch, which is not installed: pip install 'graphresize[heal]' "
            "(the CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
        ) from None


def heal_model(
    dense: ir.Model | str | os.PathLike,
    narrow: ir.Model,
    windows: np.ndarray,
    settings: HealSettings | None = None,
    *,
    check_windows: np.ndarray | None = None,
    trainable: list[str] | None = None,
    provider: str = "cpu",
    progress: bool = True,
    **changes,
):
    """Train ``narrow``'s changed weights to match ``dense``'s next-token distribution on the
    calibration ``windows`` (``[n, seq]`` int64); return a ``distill.HealResult`` (trained
    arrays by initializer name, KL before/after on ``check_windows``, steps, seconds, peak
    RSS). ``settings``: a :class:`HealSettings`; ``changes``: its fields by name (``steps=48``),
    which replace the object's. Neither model's values change: apply the result with
    :func:`apply_weights` (``narrow``'s protobuf-held initializers are re-held as numpy arrays
    with the same bytes, ``arrays.py``).

    ``dense``: the dense model as the resize saw it (after ``prepare_passes``, so that the changed
    initializers are found by name), or its file, which is then loaded and prepared here and
    released once its targets are computed, before the training (a model passed in stays
    resident as long as the caller holds it: SmolLM2's 0.54 GB at the training's peak)."""
    require_torch()
    from graphresize.recover import distill

    settings = heal_settings(settings, **changes)
    if not isinstance(dense, ir.Model):
        dense = load_dense(dense)
    targets = distill.dense_targets(dense, narrow, windows, settings, check_windows=check_windows, trainable=trainable,
                                    provider=provider, progress=progress)
    del dense  # the last reference when it was loaded here
    return distill.train(narrow, windows, targets, settings, progress=progress)


def load_dense(path: str | os.PathLike) -> ir.Model:
    """The dense model at ``path``, prepared as the resize saw it (``prepare_passes``)."""
    from graphresize.io import modelio
    from graphresize.passes import prepare_passes

    dense = modelio.load_model(path)
    prepare_passes()(dense)
    return dense


def apply_weights(model: ir.Model, result) -> ir.Model:
    """Write a heal result's arrays into ``model``'s initializers (in place; returned)."""
    from graphresize.passes.write_weights import WriteWeightsPass

    WriteWeightsPass(result.weights)(model)
    return model


@dataclasses.dataclass(frozen=True, eq=False)
class HealFileResult:
    heal: object  # distill.HealResult
    output: Path
    files: tuple[Path, ...]
    calib_source: str
    calib_windows: int
    check_windows: int


def heal_file(
    dense_path: str | os.PathLike,
    narrow_path: str | os.PathLike,
    output_path: str | os.PathLike,
    calib: str | os.PathLike,
    settings: HealSettings | None = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    tokens: int = 16384,
    seq_len: int = 256,
    holdout_windows: int = 4,
    overwrite: bool = False,
    provider: str = "cpu",
    progress: bool = True,
    **changes,
) -> HealFileResult:
    """Heal the narrowed model at ``narrow_path`` against ``dense_path`` and write it to
    ``output_path`` (atomically; neither input is modified); ``settings`` and ``changes`` as
    for :func:`heal_model`. The windows are drawn from ``calib`` as ``optimize`` draws them
    (same ``tokens``, ``seq_len``, ``holdout_windows`` and ``settings.seed`` give the same
    windows): training sees the calibration windows only, the disjoint hold-out windows
    measure the KL before and after. The dense model is released before the training."""
    from graphresize.calibrate import tokens as token_windows
    from graphresize.io import modelio

    require_torch()
    from graphresize.recover import distill

    settings = heal_settings(settings, **changes)
    dense_path, narrow_path, output_path, calib = Path(dense_path), Path(narrow_path), Path(output_path), Path(calib)
    if output_path.exists() and dense_path.exists() and os.path.samefile(output_path, dense_path):
        raise UsageError(f"{output_path}: output path is the dense model; choose another path")
    modelio.check_output_path(narrow_path, output_path, overwrite=overwrite)
    if not calib.is_file():
        raise UsageError(f"{calib}: calibration file not found")
    dense = load_dense(dense_path)
    narrow = modelio.load_model(narrow_path)
    _check_derived(dense, narrow, dense_path, narrow_path)
    tok = None if calib.suffix == ".npy" else token_windows.find_tokenizer(dense_path, Path(tokenizer) if tokenizer else None)
    stream = token_windows.read_token_stream(calib, tok)
    windows = token_windows.make_windows(stream, seq_len=seq_len, tokens=tokens, holdout_windows=holdout_windows,
                                         seed=settings.seed, source=str(calib), tokenizer=str(tok) if tok else None)
    targets = distill.dense_targets(dense, narrow, windows.calib, settings, check_windows=windows.holdout, provider=provider,
                                    progress=progress)
    del dense  # -its size at the training's peak
    result = distill.train(narrow, windows.calib, targets, settings, progress=progress)
    apply_weights(narrow, result)
    files = modelio.save_model_atomic(narrow, output_path, overwrite=overwrite, keep=[dense_path, narrow_path])
    return HealFileResult(heal=result, output=output_path, files=tuple(files), calib_source=str(calib),
                          calib_windows=len(windows.calib), check_windows=len(windows.holdout))


def _check_derived(dense: ir.Model, narrow: ir.Model, dense_path: Path, narrow_path: Path) -> None:
    """``narrow`` must be a resize of ``dense``: some float initializers changed (else there is
    nothing to heal) and some kept as they were (else it is another model)."""
    from graphresize.recover.distill import FLOAT_TYPES, changed_initializers

    changed = set(changed_initializers(dense, narrow))
    floats = {n for n, v in narrow.graph.initializers.items() if v.const_value is not None and v.dtype in FLOAT_TYPES}
    if not changed:
        raise UsageError(f"{narrow_path}: no weight differs from {dense_path}: nothing to heal (pass the narrowed model second)")
    if changed >= floats:
        raise UsageError(f"{narrow_path}: shares no weight with {dense_path}: not a model narrowed from it")
