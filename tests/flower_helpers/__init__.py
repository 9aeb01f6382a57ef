"""Helpers of tests/test_flower.py: Flower processes, an in-process grid, FATHOM recomputed."""
