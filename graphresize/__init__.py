"""graphresize: make exported transformer ONNX graphs narrower and faster.

    import graphresize
    graphresize.analyze("model.onnx")                                   # width groups
    graphresize.optimize("model.onnx", "small.onnx", ratio=0.3, calib="text.txt")
"""

__version__ = "0.1.0"  # before the imports below: graphresize.io.stats_cache reads it

from graphresize.errors import GraphresizeError  # noqa: E402
from graphresize.pipeline import OptimizeOptions, OptimizeResult, analyze, optimize  # noqa: E402

__all__ = ["GraphresizeError", "OptimizeOptions", "OptimizeResult", "__version__", "analyze", "optimize"]
