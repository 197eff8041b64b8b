"""The measured healing recipe: what ``optimize --heal`` trains.

Rule: ``--heal`` fills each ``--heal-*`` setting of :data:`HEAL_RECIPE` that neither the
command line nor ``--config`` sets (an explicit flag or config key always wins, so
``--heal --heal-steps 48`` is the recipe with fewer steps); ``--heal-steps N`` alone keeps
its own defaults (the calibration windows only, lr 3e-4) as before.

Evidence: ``benchmarks/heal.md`` ("Two parameter counts" and "20% point: one pass over 1024
windows", issue 19): SmolLM2-135M with the default recipe (global allocation) at 20% of the
parameters removed (``--ratio 0.254``, 107.5M): 256 steps over 262,144 tokens (1024 distinct
windows, one pass) take the hold-out calibration KL 0.575 → 0.386 (128 steps over 512 windows:
0.433; 192 steps over them: 0.415; lr 6e-4: 0.391), PTB 169.37 → 130.22 and wiki 28.52 → 22.23
(0.48× / 0.41× of the uniform prune-mlp row's increase over dense). At 30% (``--ratio 0.38``,
94.15M) hold-out KL 0.901 → 0.599, PTB 234.72 → 167.48, wiki 42.09 → 27.67 (0.37× / 0.38×; the
former 128-step recipe: 0.673, 0.41× / 0.44×). 256 steps (16–53 minutes) plus the dense
targets of 1024 windows (20–40 minutes) on 2 shared CPU cores; peak RSS ~6 GB before the
memory cuts of ``benchmarks/heal.md`` ("Heal memory": 5.4 → 3.7 GB for ``optimize
--heal-steps 8``, the same bytes), ~4 GB since.
"""

from __future__ import annotations

from graphresize.methods.defaults import Recipe

#: What ``--heal`` sets. Keys are ``optimize`` flag destinations.
HEAL_RECIPE = Recipe(
    name="heal",
    settings={"heal_steps": 256, "heal_tokens": 262144, "heal_lr": 3e-4, "heal_batch_size": 4},
    evidence="benchmarks/heal.md, 20% point with 1024 windows: 256 steps of 4 windows drawn from 262,144 (one epoch) calibration tokens",
)
