"""Attention blocks: the head tracer over decomposed attention (``heads``) and the fused
attention ops (``fused``)."""
