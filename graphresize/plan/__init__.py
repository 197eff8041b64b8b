"""Plan: the new width of every group from the ratio, per-kind ratios and rounding."""
