"""The default recipe: what ``graphresize optimize model.onnx --ratio R`` cuts when no flag says
what to cut.

Rule (applied by :func:`graphresize.cli.options.prepare`): every setting of
:data:`DEFAULT_RECIPE` that neither the command line nor ``--config`` sets takes the recipe's
value; an explicit flag or config key always wins. One coupling: when ``--method`` is given
without ``--target`` and that method refuses the recipe's target (``pca`` and ``disp`` cut the
residual stream only), the flag default ``--target all`` applies instead. The Python API
(``graphresize.optimize``, ``OptimizeOptions``) keeps the plain field defaults.

Evidence (``benchmarks/results.md``, 2026-11-23 run, SmolLM2-135M, 16,384 wiki calibration
tokens, PTB / held-out wiki perplexity over 4,096 tokens, dense 66.95 / 16.28): at equal
parameter count the ``prune-mlp`` row (``--target mlp --method prune``, least-squares
readout) is the best at every size measured:

* 110.5M params (``prune-mlp`` at 0.3): PTB 169.96, wiki 28.27, top-1 0.628, against
  ``dotresize-mlp`` 0.3 (same size) 205.05 / 33.07 and the old CLI default ``dotresize-all``
  at 0.3 (76.9M) 2236 / 487;
* MLP pruning plus query-head removal (``prune-mlp+heads``, ``--ratio-heads 0.34
  --head-method query``) is worse at every size: 112.1M gives PTB 211.40 / wiki 27.56
  against 169.96 / 28.27 for ``prune-mlp`` at 110.5M (fewer parameters), and 103.8M gives
  319.23 / 34.94 against 245.93 / 35.31 for ``prune-mlp`` at 102.6M; so no heads are removed;
* ``prune-all`` at 0.1 (114.6M) gives PTB 177.79, worse than ``prune-mlp`` at 0.3 with fewer
  parameters.

The lead may swap this object for a better measured row (global allocation, the sequential
engine, a new method); nothing else needs to change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named configuration: ``settings`` maps ``optimize`` flag destinations (``target``,
    ``method``, ``ratio_heads``, ...) to values; ``evidence`` is the benchmark row it comes from."""

    name: str
    settings: Mapping[str, Any]
    evidence: str

    def describe(self) -> str:
        """``prune-mlp (target=mlp, method=prune, ...)`` for the summary and the report."""
        return f"{self.name} ({', '.join(f'{k}={v}' for k, v in self.settings.items())})"


#: What ``--ratio`` alone does. Keys are ``optimize`` flag destinations.
DEFAULT_RECIPE = Recipe(
    name="prune-mlp",
    settings={"target": "mlp", "method": "prune", "unmerge": "auto", "ratio_heads": 0.0, "head_method": "refit"},
    evidence="benchmarks/results.md row prune-mlp (best PTB and wiki perplexity per parameter at every ratio 0.1-0.5)",
)
