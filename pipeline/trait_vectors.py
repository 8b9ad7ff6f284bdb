"""A trait's stored vectors as the steps that use them need them: the latest vector of a kind
with the model it fits (monitor, steer, sweep, screen and the dashboard share this), the
layer rules that go with a loaded model, and the original project's ``.pt`` files in and
out of the store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from db import PersonaError, Store
from db.store import VectorRecord

if TYPE_CHECKING:
    import torch

    from pipeline.models import LoadedModel

DEFAULT_KIND = "response_avg_diff"
IMPORTED_ROW_L = "hidden_states[L], final norm applied (original format)"


# ---- layers -----------------------------------------------------------------------------------
def check_layer(layer: int, num_layers: int, *, steered: bool) -> int:
    """A layer index of this model. Read (monitor, screen): 0..L, 0 being the embeddings.
    Steered: 1..L, since steering adds to a block's output and layer 0 has no block."""
    low = 1 if steered else 0
    if not low <= layer <= num_layers:
        if steered:
            raise PersonaError(
                f"--layer must be in 1..{num_layers} for this model (got {layer}); steering "
                "adds to a block's output"
            )
        raise PersonaError(f"--layer {layer} is outside 0..{num_layers} for this model")
    return layer


def check_steered_layers(layers: Sequence[int], num_layers: int) -> None:
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if bad:
        raise PersonaError(f"--layers {bad} are outside 1..{num_layers} for this model")


# ---- the latest vector, with the model it fits -------------------------------------------------
@dataclass
class FittedVector:
    record: VectorRecord
    vector: torch.Tensor  # [L+1, d]
    loaded: LoadedModel

    def layer_or_default(self, store: Store, layer: int | None, *, steered: bool) -> int:
        """``layer`` checked against this model; None: the trait's default layer."""
        from pipeline.analyze import default_layer

        if layer is None:
            return default_layer(store, self.record.trait, self.loaded.num_layers)
        return check_layer(layer, self.loaded.num_layers, steered=steered)


def latest_vector(
    store: Store, trait: str, kind: str = DEFAULT_KIND
) -> tuple[VectorRecord, torch.Tensor]:
    from pipeline.analyze import latest_vectors
    from vectors.files import load_vector

    records = latest_vectors(store, trait)
    if kind not in records:
        raise PersonaError(
            f"trait '{trait}' has no {kind} vector; run `persona extract {trait}` (or press x "
            "on the Vectors screen)"
        )
    return records[kind], load_vector(records[kind].path)[0]


def load_fitted_vector(
    store: Store,
    trait: str,
    kind: str = DEFAULT_KIND,
    *,
    model: str | None = None,
    device: str | None = None,
) -> FittedVector:
    """The trait's latest ``kind`` vector and the model to use it with (``model``, else the
    one it was made with), refused when its shape does not fit that model."""
    from pipeline.models import load_model
    from vectors.files import check_fits

    record, vector = latest_vector(store, trait, kind)
    loaded = load_model(model or record.model, device=device)
    what = f"the {kind} vector of {trait} (made with {record.model})"
    check_fits(vector, loaded.num_layers, loaded.hidden_size, what=what)
    return FittedVector(record, vector, loaded)


# ---- the original project's .pt files ----------------------------------------------------------
def import_vector(store: Store, trait: str, path: Path, *, model: str, kind: str) -> list[int]:
    """Store a ``.pt`` vector (read with weights_only) as the trait's ``kind`` vector after
    checking its shape against ``model``; returns the shape. Its row L is kept as it came:
    the original format's HF ``hidden_states[L]``, final norm applied."""
    from pipeline.models import load_model
    from vectors.files import check_fits, import_pt, save_vector

    store.get_trait(trait)
    # The file is read before the model loads: a missing or unsafe file fails at once.
    vector = import_pt(path)
    loaded = load_model(model, device="cpu")
    check_fits(vector, loaded.num_layers, loaded.hidden_size, what=str(path))
    meta = {
        "trait": trait,
        "model": loaded.model_id,
        "kind": kind,
        "source": f"imported:{path.name}",
        "n_pairs": 0,
        "row_L": IMPORTED_ROW_L,
    }
    folder = store.data_dir / "vectors" / trait / "imported"
    saved = save_vector(folder / f"{kind}.safetensors", vector, meta)
    store.add_vector(
        trait=trait,
        model=loaded.model_id,
        kind=kind,
        path=str(saved),
        n_pairs=0,
        threshold=None,
        coherence=None,
        metadata=meta,
    )
    return list(vector.shape)


def export_vectors(
    store: Store, trait: str, folder: Path, *, model: str | None = None, device: str | None = None
) -> list[tuple[Path, list[int]]]:
    """Write ``{trait}_{kind}.pt`` float32 tensors in the original convention (row L after
    the final norm); returns each file with its shape."""
    from pipeline.extract import original_format_vectors
    from vectors.files import export_pt

    vectors = original_format_vectors(store, trait, model=model, device=device)
    return [
        (export_pt(vector, folder / f"{trait}_{kind}.pt"), list(vector.shape))
        for kind, vector in vectors.items()
    ]
