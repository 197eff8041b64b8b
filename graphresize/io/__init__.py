"""Input and output: load/save (``modelio``), ONNX Runtime sessions (``ort_utils``), export
from torch (``capture``, ``exporting``), serving files (``sidecars``), the embedded model
(``embedded``) and the calibration statistics cache (``stats_cache``)."""
