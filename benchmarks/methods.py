"""The benchmark rows: one dict of ``OptimizeOptions`` keyword arguments (see
``graphresize/pipeline.py``) plus a ``label`` each; ``run.py`` runs every row at every ratio.

Add a method by adding a row. A row whose options the pipeline rejects (an unknown field, a
value it refuses) is skipped with a note in ``results.md``. Labels are short slugs: they name
lines in the plot and are what ``--only`` selects.
"""

from __future__ import annotations

# The two rows below resize the MLP width only: that is all this pipeline resizes today. When
# OptimizeOptions gains `target` (residual-stream resizing), give them "target": "mlp" if its
# default covers more, and add rows such as {"method": "pca", "target": "residual"} or
# {"method": "dotresize", "target": "all", "unmerge": "pinv"}.
METHODS: list[dict] = [
    {"label": "dotresize-mlp", "method": "dotresize"},
    {"label": "prune-mlp", "method": "prune"},
]

# Run in this order (the table sorts them): an interrupted run still spans the range.
RATIOS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.2, 0.4)
