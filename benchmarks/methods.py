"""The benchmark rows: one dict of ``OptimizeOptions`` keyword arguments (see
``graphresize/pipeline.py``) plus a ``label`` each; ``run.py`` runs every row at every ratio.

Add a method by adding a row. A row whose options the pipeline rejects (an unknown field, a
value it refuses) is skipped with a note in ``results.md``. Labels are short slugs: they name
lines in the plot and are what ``--only`` selects.
"""

from __future__ import annotations

METHODS: list[dict] = [
    {"label": "dotresize-mlp", "method": "dotresize"},
    {"label": "prune-mlp", "method": "prune"},
]

RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
