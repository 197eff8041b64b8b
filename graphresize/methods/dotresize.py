"""DOTResize: neurons merged by optimal transport on their calibration activations (MLP groups,
``solve.merge.ot_merge``) and the residual stream merged the same way through its QR split
(``solve.residual.residual_transform``). All hooks are the defaults of ``Method``."""

from __future__ import annotations

from graphresize.methods.base import Method


class DotResize(Method):
    residual_method = "dotresize"
