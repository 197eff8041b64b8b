"""Analyze: pure functions from a prepared graph to frozen findings (channels, width groups,
norms, residual layouts, attention blocks); nothing here edits the graph."""
