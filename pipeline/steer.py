"""Steered generation: the same prompt answered with and without a persona vector added
(ablated, or its projection capped) at one layer, for quick side-by-side reading."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from db import PersonaError
from pipeline.chat import prompt_ids
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig
from pipeline.models import load_model
from vectors.steering import SteeringSpec


def steer_side_by_side(
    *,
    model: str,
    vector: torch.Tensor,
    layer: int,
    coefs: Sequence[float],
    prompt: str,
    positions: str = "response",
    max_new_tokens: int = 120,
    temperature: float = 0.0,
    seed: int = 0,
    device: str | None = None,
    ablate: bool = False,
    cap: float | None = None,
) -> dict[str, str]:
    """label -> answer text: unsteered first, then the ablation and the cap (when asked for),
    then each coefficient. ``cap`` is a projection value (h . v / |v|, the monitor's unit)."""
    if cap is not None and not math.isfinite(cap):
        raise PersonaError(f"--cap must be a finite projection value (got {cap})")
    loaded = load_model(model, device=device)
    if not 1 <= layer <= loaded.num_layers:
        raise PersonaError(
            f"--layer must be in 1..{loaded.num_layers} for this model (got {layer})"
        )
    if vector.shape[0] != loaded.num_layers + 1 or vector.shape[1] != loaded.hidden_size:
        raise PersonaError(
            f"the vector has shape {list(vector.shape)} but {model} needs "
            f"[{loaded.num_layers + 1}, {loaded.hidden_size}]; it was made for another model"
        )
    engine = DecodeEngine(loaded, capture=False)
    request = [DecodeRequest(prompt_ids(loaded.tokenizer, None, prompt), seed)]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)

    def answer(specs: Sequence[SteeringSpec]) -> str:
        result = engine.run(request, sampling, steering=specs)[0]
        return loaded.tokenizer.decode(result.answer_ids, skip_special_tokens=True)

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
