"""Steered generation: the same prompt answered with and without a trait's vector added
(ablated, or its projection capped) at one layer, for quick side-by-side reading."""

from __future__ import annotations

import math
from collections.abc import Sequence

from db import PersonaError, Store
from pipeline.chat import prompt_ids
from pipeline.decoding import answer_text, decode
from pipeline.trait_vectors import DEFAULT_KIND, check_layer, load_fitted_vector
from vectors.steering import SteeringSpec


def steer_side_by_side(
    store: Store,
    trait: str,
    *,
    layer: int,
    coefs: Sequence[float],
    prompt: str,
    kind: str = DEFAULT_KIND,
    model: str | None = None,
    positions: str = "response",
    max_new_tokens: int = 120,
    temperature: float = 0.0,
    seed: int = 0,
    device: str | None = None,
    ablate: bool = False,
    cap: float | None = None,
) -> dict[str, str]:
    """label -> answer text: unsteered first, then the ablation and the cap (when asked for),
    then each coefficient, with the trait's latest ``kind`` vector on ``model`` (default: the
    one it was made with). ``cap`` is a projection value (h . v / |v|, the monitor's unit)."""
    if cap is not None and not math.isfinite(cap):
        raise PersonaError(f"--cap must be a finite projection value (got {cap})")
    fitted = load_fitted_vector(store, trait, kind, model=model, device=device)
    loaded, vector = fitted.loaded, fitted.vector
    check_layer(layer, loaded.num_layers, steered=True)
    prompt_part = prompt_ids(loaded.tokenizer, None, prompt)

    def answer(specs: Sequence[SteeringSpec]) -> str:
        result = decode(
            loaded,
            [prompt_part],
            [seed],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            steering=specs,
        )[0]
        return answer_text(loaded, result.answer_ids)

    out = {"unsteered": answer([])}
    if ablate:
        spec = SteeringSpec(layer=layer, vector=vector, positions=positions, ablate=True)
        out[f"ablated at layer {layer}"] = answer([spec])
    if cap is not None:
        spec = SteeringSpec(layer=layer, vector=vector, positions=positions, cap=cap)
        out[f"capped at {cap:g} at layer {layer}"] = answer([spec])
    for coef in coefs:
        spec = SteeringSpec(layer=layer, vector=vector, coef=coef, positions=positions)
        out[f"coef {coef:+g} at layer {layer}"] = answer([spec])
    return out
