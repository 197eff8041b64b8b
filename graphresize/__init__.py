"""graphresize: make exported transformer ONNX graphs narrower and faster.

    import graphresize
    graphresize.analyze("model.onnx")                                   # width groups
    graphresize.optimize("model.onnx", "small.onnx", ratio=0.3, calib="text.txt")
"""

__version__ = "0.1.0"  # before the imports below: graphresize.stats_cache reads it

from graphresize.errors import GraphresizeError  # noqa: E402

_LAZY = ("OptimizeOptions", "OptimizeResult", "analyze", "optimize")


def __getattr__(name: str):
    """The pipeline (numpy, onnx, ONNX Runtime) is imported on first use, not with the package,
    so that the CLI starts, and reports a failed import as one line, from inside its handler."""
    if name in _LAZY:
        from graphresize import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'graphresize' has no attribute {name!r}")

__all__ = ["GraphresizeError", "OptimizeOptions", "OptimizeResult", "__version__", "analyze", "optimize"]
