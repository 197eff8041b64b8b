"""What a heal trains with: one settings object for ``heal_model``, ``heal_file`` and the trainer.

Rule: every training setting is a field of :class:`HealSettings`, listed once here;
``heal_model(..., settings, **changes)`` and ``heal_file(..., settings, **changes)`` take the
object and/or its fields by name (``steps=48``), the names replacing the object's values
(:func:`heal_settings`). This module does not import torch (the command line builds settings
before it knows torch is there).
"""

from __future__ import annotations

import dataclasses

from graphresize.errors import UsageError

PRECISIONS = ("auto", "bf16", "fp32")


@dataclasses.dataclass(frozen=True)
class HealSettings:
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 128
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    threads: int = 1
    precision: str = "auto"  # "auto" (bf16 where the CPU has it natively), "bf16" or "fp32"

    @property
    def bf16(self) -> bool:
        """Whether the training forward/backward runs under bf16 autocast."""
        if self.precision == "auto":
            return cpu_has_bf16()
        return self.precision == "bf16"


def heal_settings(settings: HealSettings | None = None, **changes) -> HealSettings:
    """``settings`` (default: :class:`HealSettings`'s defaults) with the named fields replaced;
    an unknown name is a ``TypeError``, as for any unknown keyword."""
    return dataclasses.replace(settings or HealSettings(), **changes)


def check_settings(settings: HealSettings) -> None:
    """A one-line ``UsageError`` for a setting the trainer cannot use."""
    if settings.steps < 1 or settings.batch_size < 1:
        raise UsageError("--heal-steps and --heal-batch-size must be positive")
    if not settings.lr > 0 or not settings.temperature > 0 or settings.top_k < 1:
        raise UsageError("--heal-lr, --heal-temperature and --heal-top-k must be positive")
    if settings.threads < 0:
        raise UsageError("--heal-threads must be 0 (torch's default) or positive")
    if settings.precision not in PRECISIONS:
        raise UsageError(f"--heal-precision must be one of {', '.join(PRECISIONS)}, not {settings.precision!r}")


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast
    is emulated and slower than float32."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a probe that fails means: not known to be there
            continue
    return False
