"""Steered generation: the same prompt answered with and without a trait's vector added
(ablated, or its projection capped) at one layer, for quick side-by-side reading; and the
steering setting of the dashboard's live monitor (a coefficient, a cap) with its one check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from db import PersonaError, Store
from pipeline.chat import prompt_ids
from pipeline.decoding import answer_text, decode_one
from pipeline.trait_vectors import DEFAULT_KIND, check_layer, load_fitted_vector

if TYPE_CHECKING:
    import torch

    from vectors.steering import SteeringSpec


@dataclass(frozen=True)
class SteeringSetting:
    """How one answer is steered at a layer: ``coef`` x v added (0: nothing added), then the
    projection on v capped at ``cap`` (h . v / |v|, the monitor's unit; None: no cap). The
    one default and check of the dashboard's coefficient and cap inputs."""

    coef: float = 0.0
    cap: float | None = None
    positions: str = "response"  # checked by SteeringSpec (vectors.steering.POSITIONS)

    def validate(self) -> SteeringSetting:
        from pipeline.sweep import MAX_COEF

        if not (math.isfinite(self.coef) and abs(self.coef) <= MAX_COEF):
            raise PersonaError(f"coef must be a finite number of size at most {MAX_COEF:g}")
        if self.cap is not None and not math.isfinite(self.cap):
            raise PersonaError(f"--cap must be a finite projection value (got {self.cap})")
        return self

    @property
    def active(self) -> bool:
        return self.coef != 0 or self.cap is not None

    def specs(self, layer: int, vector: torch.Tensor) -> list[SteeringSpec]:
        """The add first, then the cap: the cap bounds what the answer ends up with."""
        from vectors.steering import SteeringSpec

        specs = []
        if self.coef:
            specs.append(SteeringSpec(layer, vector, coef=self.coef, positions=self.positions))
        if self.cap is not None:
            specs.append(SteeringSpec(layer, vector, positions=self.positions, cap=self.cap))
        return specs

    def label(self) -> str:
        """``steering coef +6``, ``capped at 3.5``, both, or ``unsteered``."""
        parts = [f"steering coef {self.coef:+g}"] if self.coef else []
        if self.cap is not None:
            parts.append(f"capped at {self.cap:g}")
        return ", ".join(parts) or "unsteered"


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
    from vectors.steering import SteeringSpec

    SteeringSetting(cap=cap).validate()
    fitted = load_fitted_vector(store, trait, kind, model=model, device=device)
    loaded, vector = fitted.loaded, fitted.vector
    check_layer(layer, loaded.num_layers, steered=True)
    prompt_part = prompt_ids(loaded.tokenizer, None, prompt)

    def answer(specs: Sequence[SteeringSpec]) -> str:
        result = decode_one(
            loaded,
            prompt_part,
            seed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            steering=specs,
        )
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


@dataclass(frozen=True)
class WatchedAnswer:
    """One answer with each token's projection at the watched layer, read after the
    steering there (a capped answer never shows more than its cap)."""

    label: str
    tokens: list[str]  # answer tokens, decoded one by one
    values: list[float]
    finish_reason: str

    def average(self) -> float:
        return sum(self.values) / len(self.values) if self.values else 0.0


def steered_and_unsteered(
    store: Store,
    trait: str,
    prompt: str,
    setting: SteeringSetting,
    *,
    layer: int,
    kind: str = DEFAULT_KIND,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[WatchedAnswer]:
    """The model's answer to ``prompt`` unsteered, then steered by ``setting`` at ``layer``
    (same prompt, same seed), each token projected on the trait's ``kind`` vector there:
    ``persona steer``'s side by side, with the monitor's heatmaps."""
    from pipeline.engine import Watch

    if not setting.validate().active:
        raise PersonaError("nothing to compare: set a steering coefficient or a cap")
    fitted = load_fitted_vector(store, trait, kind)
    loaded = fitted.loaded
    check_layer(layer, loaded.num_layers, steered=True)
    tok = loaded.tokenizer
    prompt_part = prompt_ids(tok, None, prompt)
    watch = [Watch(kind, layer, fitted.vector[layer])]
    shown = []
    for label, specs in (
        ("unsteered", []),
        (f"{setting.label()} at layer {layer}", setting.specs(layer, fitted.vector)),
    ):
        result = decode_one(
            loaded,
            prompt_part,
            seed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            steering=specs,
            watch=watch,
        )
        values = result.projections[:, 0].tolist() if result.projections is not None else []
        tokens = [tok.decode([t]) for t in result.answer_ids]
        shown.append(WatchedAnswer(label, tokens, values, result.finish_reason))
    return shown
