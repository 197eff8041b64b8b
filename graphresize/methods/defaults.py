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

Global allocation (``--allocation global``, the ``prune-global`` rows; ``benchmarks/allocation.md``,
same protocol): one budget of block parameters spent where the weighted error curves say it
costs least beats the uniform cut at equal parameter count on both texts:

* 102.65M (``--allocation global --ratio 0.3``): PTB 183.05, wiki 32.91 against 245.93 / 35.31
  for the uniform ``prune-mlp`` at 0.4 (102.6M);
* 113.3M (global 0.2): PTB 138.2, wiki 23.3 against 154.7 / 25.9 for uniform at that size;
* MiniLM (an encoder; mean sentence-embedding cosine at 9.5% of parameters removed): 0.908
  against 0.906.

So ``--ratio r`` alone removes the share ``r`` of the transformer-block parameters
(``plan/allocation.py``). The recipe runs it on the segment engine (``engine: segment``,
``engine/allocate.py``): the same curves, floor factor, widths and weights as the whole-model
engine (dense statistics; SmolLM2 0.3 at 16,384 tokens: PTB 183.05, wiki 32.91, 102.65M,
both engines, byte-identical files) at a peak RSS of 1.35–1.45× the weight bytes instead of 11×. One more coupling: where
the run cuts anything but the MLPs (``--target`` other than ``mlp``) or sets a per-kind width
ratio (``--ratio-mlp``, ``--ratio-residual``), the recipe's ``allocation`` and ``engine`` are
dropped and the flag defaults (uniform, whole) apply; ``--ratio-heads`` or ``--stats-cache``
(whole-model statistics) drop its ``engine``. Healing is not in the recipe: it pays (README,
"Recovery"; ``--heal``, ``recover/recipe.py``) but costs tens of minutes and ~4 GB on a CPU.
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
    name="prune-global",
    settings={"target": "mlp", "method": "prune", "allocation": "global", "engine": "segment", "unmerge": "auto",
              "ratio_heads": 0.0, "head_method": "refit"},
    evidence="benchmarks/allocation.md (prune with global allocation: best PTB and wiki perplexity per parameter "
             "measured; benchmarks/results.md row prune-mlp is the best uniform row)",
)

#: Recipe settings that apply only where the run cuts the MLPs alone under one budget.
MLP_ONLY_SETTINGS = ("allocation", "engine")
