"""Solve: from calibration statistics to channel transforms (pure maths, no graph edits):
OT merge and pruning (``merge``), the residual stream (``residual``), DISP subsets (``disp``),
attention heads (``heads``, ``head_merge``)."""
