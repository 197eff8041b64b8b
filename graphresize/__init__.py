"""graphresize: make exported transformer ONNX graphs narrower and faster.

    import graphresize
    graphresize.analyze("model.onnx")                                   # width groups
    graphresize.optimize("model.onnx", "small.onnx", ratio=0.3, calib="text.txt")
"""

from graphresize.errors import GraphresizeError
from graphresize.pipeline import OptimizeOptions, OptimizeResult, analyze, optimize

__version__ = "0.1.0"
__all__ = ["GraphresizeError", "OptimizeOptions", "OptimizeResult", "__version__", "analyze", "optimize"]
