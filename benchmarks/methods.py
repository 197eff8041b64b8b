"""The benchmark rows: one dict of ``OptimizeOptions`` keyword arguments plus a ``label`` each;
``run.py`` runs every row at every ratio.

The rows are declared with their method in the registry (``graphresize/methods/registry.py``,
``MethodSpec.bench``): adding a method there adds its rows here. A row whose options the
pipeline rejects (an unknown field, a value it refuses) is skipped with a note in
``results.md``. Labels are short slugs: they name lines in the plot and are what ``--only``
selects. ``target`` picks the widths (mlp, residual, all); heads go by ``head_ratio`` (a share
of heads, the row's ratio does not apply to them). ``ratios``: the row runs at those ratios
only (the healing rows, ``heal_steps``, cost 8-25 s per step on SmolLM2 on 2 shared cores: 0.2
and 0.3 only; ``run.py --no-heal`` skips them). The rows of issue 19's two points (20% and 30%
of the parameters removed: ``prune-mlp-20/30%`` at 0.34 / 0.51, ``prune-global-20/30%`` and
``prune-global+heal`` at 0.254 / 0.38) run only when ``--ratios`` names those ratios:
``run.py --ratios 0.254,0.34,0.38,0.51 --only prune-mlp-20/30%,prune-global-20/30%,prune-global+heal``.
"""

from __future__ import annotations

from graphresize.methods import registry

METHODS: list[dict] = [dict(row) for spec in registry.specs() for row in spec.bench]

# Run in this order (the table sorts them): an interrupted run still spans the range.
RATIOS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.2, 0.4)
