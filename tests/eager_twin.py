"""An eager engine to hold a graphed one against: the same decode step, run without CUDA
graphs. Left alone, an engine that steps eagerly keeps the rounded SDPA step where a graphed
one attends over the whole cache with the decode-attention kernel (``DecodeEngine``): a
comparison of the two would compare attention kernels, not graphs."""

from __future__ import annotations

from typing import Any

from pipeline.engine import DecodeEngine


def eager_twin(loaded: Any, **kwargs: Any) -> DecodeEngine:
    """``DecodeEngine(loaded, cuda_graphs=False, **kwargs)`` whose attention is what the
    graphed engine's would be (the runner's own choice, not the eager engine's)."""
    engine = DecodeEngine(loaded, cuda_graphs=False, **kwargs)
    engine.runner.valid_keys_only = None
    return engine
