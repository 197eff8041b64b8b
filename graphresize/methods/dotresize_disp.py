"""dotresize+disp: the residual stream rotated (exactly) into the principal basis of its
calibration Gram, every block keeping a prefix of it of one width (nested subsets: ``Slice``
and ``Pad`` only); MLP groups merged by DOTResize. See ``graphresize/methods/disp.py``."""

from __future__ import annotations

from graphresize.methods.disp import Disp


class DotResizeDisp(Disp):
    composed = True
