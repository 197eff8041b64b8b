"""PCA (a SliceGPT-style global rotation): the residual stream rotated onto the leading
eigenvectors of its calibration Gram and cut to the new width; residual groups only."""

from __future__ import annotations

from graphresize.errors import UsageError
from graphresize.methods.base import Method
from graphresize.options import OptimizeOptions


class PCA(Method):
    residual_method = "pca"

    def check(self, options: OptimizeOptions, kinds: frozenset[str]) -> None:
        if "mlp" in kinds and options.kind_ratios.get("mlp", options.ratio) > 0:
            raise UsageError("--method pca rotates the residual stream only: use --target residual (or --ratio-mlp 0)")
