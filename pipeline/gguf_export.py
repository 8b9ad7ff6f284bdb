"""``persona vectors export TRAIT --format gguf``: a trait's vector as a llama.cpp control
vector (``vectors.control_vector`` holds the format and the layer mapping)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from db import PersonaError, Store
from pipeline.analyze import latest_vectors
from pipeline.sweep import MAX_COEF
from vectors.control_vector import model_hint, writable_layers, write_control_vector
from vectors.files import KINDS, load_vector


@dataclass(frozen=True)
class GgufExportParams:
    layers: tuple[int, ...] | None = None  # our numbering, 2..L; None: the recommended layer
    coef: float = 1.0
    vector: str = "response_avg_diff"
    model: str | None = None  # whose vector, when the trait has several models' vectors

    def validate(self) -> GgufExportParams:
        if self.vector not in KINDS:
            raise PersonaError(f"--vector must be one of {', '.join(KINDS)}, not '{self.vector}'")
        if not (math.isfinite(self.coef) and 0 < abs(self.coef) <= MAX_COEF):
            raise PersonaError(
                f"--coef must be a non-zero number of size at most {MAX_COEF:g} (got {self.coef})"
            )
        if self.layers is not None:
            if not self.layers:
                raise PersonaError("--layers is empty; give a layer such as 20 or a range 16-24")
            if 1 in self.layers:
                raise PersonaError(
                    "--layers 1 (block 0's output) has no llama.cpp control-vector slot "
                    "(direction.0 is refused); choose layers from 2"
                )
            if len(set(self.layers)) != len(self.layers):
                raise PersonaError(f"--layers {list(self.layers)} names a layer twice")
        return self


def export_control_vector(
    store: Store, trait: str, out: Path, params: GgufExportParams = GgufExportParams()
) -> Path:
    """Write ``out/TRAIT_KIND.gguf`` for the trait's newest vector of that kind; returns it."""
    params.validate()
    store.get_trait(trait)
    record = latest_vectors(store, trait, params.model).get(params.vector)
    if record is None:
        raise PersonaError(
            f"trait '{trait}' has no {params.vector} vector"
            + (f" for {params.model}" if params.model else "")
            + f"; run `persona extract {trait}`"
        )
    vector, _meta = load_vector(Path(record.path))
    num_layers = vector.shape[0] - 1
    layers = params.layers
    if layers is None:
        from pipeline.analyze import default_layer

        layers = (max(default_layer(store, trait, num_layers), 2),)
    allowed = writable_layers(num_layers)
    outside = sorted(layer for layer in layers if layer not in allowed)
    if outside:
        raise PersonaError(
            f"--layers {outside} are outside {allowed.start}..{allowed.stop - 1} for this "
            f"{num_layers}-layer model"
        )
    provenance = {
        "trait": trait,
        "kind": params.vector,
        "model": record.model,
        "layers": ",".join(str(layer) for layer in sorted(layers)),
        "coef": f"{params.coef:g}",
        "layer_mapping": "our layer l (added after block l-1) is direction.(l-1)",
        "source": record.path,
    }
    path = Path(out) / f"{trait}_{params.vector}.gguf"
    return write_control_vector(
        path,
        vector,
        layers,
        params.coef,
        hint=_model_hint(record.model),
        provenance=provenance,
    )


def _model_hint(model_id: str) -> str:
    """llama.cpp's architecture name for the model, read from its config.json (no weights
    load); the model id itself when the model is not on this machine."""
    from pipeline.models import resolve_model

    try:
        config = json.loads((resolve_model(model_id).path / "config.json").read_text())
    except (PersonaError, OSError, ValueError):
        return model_id
    return model_hint(str(config.get("model_type") or model_id))
