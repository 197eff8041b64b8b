"""The rewrite pass manager: one list of passes, run in its order, each logged.

Unlike ``onnx_ir.passes.PassManager`` an exception of a pass is not wrapped in ``PassError``:
a ``GraphresizeError`` raised inside a pass (an unsupported stream, say) reaches the command
line as its own one-line message and exit code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx_ir as ir

logger = logging.getLogger("graphresize.passes")


class RewriteManager(ir.passes.Sequential):
    """Run ``passes`` in order on one model; log for each pass whether it changed the graph."""

    def __init__(self, passes: Sequence[ir.passes.PassBase]) -> None:
        super().__init__(*passes)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for i, pass_ in enumerate(self.passes):
            result = pass_(model)
            logger.getChild(type(pass_).__name__).debug("step %d: %s", i, "changed the graph" if result.modified else "no change")
            model = result.model
            modified = modified or result.modified
        return ir.passes.PassResult(model, modified)

    def names(self) -> list[str]:
        """The pass classes in run order (for the report and tests)."""
        return [type(p).__name__ for p in self.passes]
