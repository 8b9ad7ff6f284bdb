"""Tensor math and vector files: mean-diff, projection, steering hooks, norms, formats."""
