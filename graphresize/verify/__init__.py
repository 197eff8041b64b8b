"""Verify: hold-out comparison with the original (``compare``), quality gates (``gate``) and
perplexity evaluation (``evaluate``)."""
