"""The options of one ``optimize`` run: a frozen dataclass with no heavy imports, so that the
command line and ``--config`` validation can read its fields without loading the stages."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

#: Entropic regularisation of the OT merge on the median-normalised cost; 0: the exact plan.
DEFAULT_REG = 0.0

#: ``--target``: the kinds of width group a run resizes.
TARGETS = {"mlp": frozenset({"mlp"}), "residual": frozenset({"residual"}), "all": frozenset({"mlp", "residual"})}
#: ``--unmerge``: the reader map (``auto``: per kind, ``AUTO_UNMERGE``).
UNMERGES = ("auto", "lsq", "ot", "pinv")
#: ``--unmerge auto``: the reader map that measured best per kind on SmolLM2. MLP: lsq
#: (PTB 178 against 194 for ot at 0.3); residual: pinv, the orthogonal projection (0.2: 259
#: against 292 for lsq), which also keeps the LM head's fit to the embedding within the re-tie
#: tolerance.
AUTO_UNMERGE = {"mlp": "lsq", "residual": "pinv"}
#: ``--engine``: calibrate the whole model in one ORT pass, or segment by segment (sequential
#: statistics, one segment's session at a time; ``graphresize/engine/``).
ENGINES = ("whole", "segment")
#: ``--allocation``: how widths are spread over groups (``graphresize/plan/allocation.py``).
ALLOCATIONS = ("uniform", "global")


@dataclasses.dataclass(frozen=True)
class OptimizeOptions:
    """Every knob of ``optimize`` (the CLI flags map one to one)."""

    ratio: float
    target: str = "all"
    method: str = "dotresize"  # a name of graphresize.methods.registry
    unmerge: str = "auto"  # auto: lsq on MLP widths, pinv on the residual stream (see unmerge_for)
    calib: Path | None = None
    tokenizer: Path | None = None
    tokens: int = 16384
    seq_len: int = 256
    batch_size: int = 4
    holdout_windows: int = 4
    seed: int = 0
    reg: float = DEFAULT_REG
    metric: str = "euclidean"
    target_mass: str = "cluster"
    multiple_of: int = 8
    kind_ratios: Mapping[str, float] = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True
    provider: str = "cpu"
    verify_tolerance: float | None = None
    min_top1: float | None = None
    min_cosine: float | None = None
    head_ratio: float = 0.0
    head_method: str = "refit"
    stats_cache: Path | None = None  # folder of calibration statistics reused across runs
    fuse: bool = False  # emit ORT's fused ops (graphresize/fusion.py), checked against the unfused graph
    engine: str = "whole"  # ENGINES: whole-model calibration, or segment by segment
    workers: int = 0  # --workers N: a segment's calibration sharded over a local Ray cluster of N workers
    ray_address: str | None = None  # --ray-address ADDR: the same on an existing Ray cluster
    allocation: str = "uniform"  # uniform: every group the same ratio; global: one budget (plan/allocation.py)
    allocation_floors: tuple[float, ...] = (0.5, 0.75, 0.9)  # floor factors tried on the hold-out windows
    plots: bool = True  # width-profile PNGs beside the output (OUT.alloc.png, OUT.disp.png); the CLI's --no-sidecars turns them off
    allocation_stats: str = "dense"  # --engine segment --allocation global: chosen widths solved from dense or sequential statistics (engine/allocate.py)
    heal_steps: int = 0  # recovery by distillation after the rewrite (0: none; needs torch)
    heal_lr: float = 3e-4  # AdamW peak learning rate of the healing (warm-up, cosine to 0)
    heal_batch_size: int = 4  # calibration windows per healing step
    heal_tokens: int = 0  # training windows' tokens (0: the calibration windows; more: drawn from the same text)
    heal_threads: int = 1  # torch/ORT threads of the healing (0: torch's default); recover/distill.py
    heal_precision: str = "auto"  # auto (bf16 autocast where the CPU has native bf16), bf16 or fp32


def unmerge_for(options: OptimizeOptions, kind: str) -> str:
    """The reader map for groups of ``kind``: ``--unmerge``, or the kind's best under ``auto``."""
    return AUTO_UNMERGE[kind] if options.unmerge == "auto" else options.unmerge
