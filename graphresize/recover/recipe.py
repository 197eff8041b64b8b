"""The measured healing recipe: what ``optimize --heal`` trains.

Rule: ``--heal`` fills each ``--heal-*`` setting of :data:`HEAL_RECIPE` that neither the
command line nor ``--config`` sets (an explicit flag or config key always wins, so
``--heal --heal-steps 48`` is the recipe with fewer steps); ``--heal-steps N`` alone keeps
its own defaults (the calibration windows only, lr 3e-4) as before.

Evidence: ``benchmarks/heal.md`` ("Two parameter counts", issue 19): SmolLM2-135M with the
default recipe (global allocation) at 20% and at 30% of the parameters removed. At 30%
(``--ratio 0.38``, 94.15M) PTB 234.72 → 177.91 and wiki 42.09 → 29.35 (0.41× / 0.44× of the
uniform prune-mlp row's increase over dense); at 20% (``--ratio 0.254``, 107.5M) 169.37 →
136.51 and 28.52 → 23.02 (0.52× / 0.46×). ~50 minutes of steps plus the dense targets of 512
windows on 2 shared CPU cores; peak RSS ~6 GB then, ~4 GB since the memory cuts of
``benchmarks/heal.md`` ("Heal memory": 5.4 → 3.7 GB for ``optimize --heal-steps 8``, the same bytes).
"""

from __future__ import annotations

from graphresize.methods.defaults import Recipe

#: What ``--heal`` sets. Keys are ``optimize`` flag destinations.
HEAL_RECIPE = Recipe(
    name="heal",
    settings={"heal_steps": 128, "heal_tokens": 131072, "heal_lr": 3e-4, "heal_batch_size": 4},
    evidence="benchmarks/heal.md, two parameter counts: 128 steps of 4 windows drawn from 131,072 (one epoch) calibration tokens",
)
