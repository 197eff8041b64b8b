"""Calibrate: token windows from text or ids (``tokens``) and per-group statistics from ONNX
Runtime runs of the prepared graph (``statistics``)."""
