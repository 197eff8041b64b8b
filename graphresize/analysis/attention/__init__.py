"""Attention blocks: ``find`` lists every attention layer; ``heads`` traces decomposed attention
(the head tracer), ``fused`` reads the fused attention ops."""
