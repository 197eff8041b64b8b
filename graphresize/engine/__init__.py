"""The segment-by-segment engine (``--engine segment``): see ``sequential.py``."""
