"""graphresize: make exported transformer ONNX graphs narrower and faster.

    import graphresize
    graphresize.analyze("model.onnx")                                   # width groups
    graphresize.optimize("model.onnx", "small.onnx", ratio=0.3, calib="text.txt")

The names below are loaded on first use (PEP 562), so ``import graphresize`` and
``graphresize --help`` do not import POT, ONNX Runtime or torch.
"""

__version__ = "0.1.0"

from graphresize.errors import GraphresizeError

_PIPELINE = ("OptimizeOptions", "OptimizeResult", "analyze", "optimize")

__all__ = ["GraphresizeError", "OptimizeOptions", "OptimizeResult", "__version__", "analyze", "optimize"]


def __getattr__(name: str):
    if name in _PIPELINE:
        from graphresize import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'graphresize' has no attribute {name!r}")
