"""The benchmark rows: one dict of ``OptimizeOptions`` keyword arguments (see
``graphresize/pipeline.py``) plus a ``label`` each; ``run.py`` runs every row at every ratio.

Add a method by adding a row. A row whose options the pipeline rejects (an unknown field, a
value it refuses) is skipped with a note in ``results.md``. Labels are short slugs: they name
lines in the plot and are what ``--only`` selects.
"""

from __future__ import annotations

# `target` picks the widths (mlp, residual, all); heads go by `head_ratio` (a share of heads,
# the row's ratio does not apply to them).
METHODS: list[dict] = [
    {"label": "dotresize-mlp", "method": "dotresize", "target": "mlp"},
    {"label": "prune-mlp", "method": "prune", "target": "mlp"},
    {"label": "dotresize-residual", "method": "dotresize", "target": "residual", "unmerge": "pinv"},
    {"label": "pca-residual", "method": "pca", "target": "residual"},
    {"label": "dotresize-all", "method": "dotresize", "target": "all"},
    {"label": "prune-all", "method": "prune", "target": "all"},
    {"label": "disp", "method": "disp", "target": "residual"},
    {"label": "dotresize+disp", "method": "dotresize+disp", "target": "residual"},
    {"label": "prune-mlp+heads", "method": "prune", "target": "mlp", "head_ratio": 0.34, "head_method": "query"},
]

# Run in this order (the table sorts them): an interrupted run still spans the range.
RATIOS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.2, 0.4)
