"""Helpers for tests that need a trait's vector stored without running the method: a random
vector saved and registered as extraction would (``vectors.files.save_vector`` and
``Store.add_vector``)."""

from __future__ import annotations

from pathlib import Path

import torch

from db import Store
from vectors.files import save_vector


def store_vector(
    store: Store,
    trait: str,
    model: str,
    vector: torch.Tensor,
    kind: str = "response_avg_diff",
) -> Path:
    """Register ``vector`` [L+1, d] as the trait's newest ``kind`` vector for ``model``."""
    meta = {"trait": trait, "model": model, "kind": kind, "n_pairs": 0}
    path = save_vector(
        store.data_dir / "vectors" / trait / "planted" / f"{kind}.safetensors", vector, meta
    )
    store.add_vector(
        trait=trait,
        model=model,
        kind=kind,
        path=str(path),
        n_pairs=0,
        threshold=None,
        coherence=None,
        metadata=meta,
    )
    return path
