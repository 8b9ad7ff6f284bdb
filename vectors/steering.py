"""Steering: add coef * v to the output of decoder block l-1 ("layer l", the index of the
vector file and of ``hidden_states``), or project the direction out (ablation).

Which positions are touched, exactly (as the method's code does it):
- ``response``: in the prefill, the last real prompt token of each row (the position whose
  output is the first answer token, so that token is steered too); while decoding, the token
  being fed (an answer token) of every row that has not finished.
- ``prompt``: the prompt's real tokens during the prefill (the last one included); nothing
  while decoding.
- ``all``: both.
Pad positions are never touched. ``prefill_masks``, ``decode_masks`` and ``sequence_masks``
are the one statement of these rules: each maps a ``positions`` value to the [B, T] mask of
the positions it touches in one forward (None: none).

Three modes: add ``coef * v``; ablate (``ablate=True``: h - (h.u) u, u = v/|v|); cap
(``cap=tau``: h - max(0, h.u - tau) u, so the projection on v is at most tau and a position
already at or below it is left bit-equal). tau is in the units of the monitor's projection
(h . v / |v|), so a value read off a heatmap can be used as it is.

``steered(model, specs)`` applies the specs with forward hooks on HF decoder layers, for any
forward the caller runs. ``apply_steering`` is the same arithmetic for code that runs the
layers itself (our decode engine). ``SteeringSpec.on(device)`` moves a vector to the device
once, before any CUDA-graph capture (a host-to-device copy cannot be captured).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

POSITIONS = ("response", "prompt", "all")


@dataclass(frozen=True)
class SteeringSpec:
    layer: int  # hidden-state index: hooks the output of block layer-1
    vector: torch.Tensor  # [d] (or [L+1, d]: the row at ``layer`` is used)
    coef: float = 1.0
    positions: str = "response"
    ablate: bool = False  # project the direction out instead of adding
    cap: float | None = None  # clamp the projection h.v/|v| to at most this instead of adding

    def __post_init__(self) -> None:
        if self.cap is not None and not math.isfinite(self.cap):
            raise ValueError(f"cap must be a finite projection value, not {self.cap}")
        if self.cap is not None and self.ablate:
            raise ValueError("a spec either caps or ablates the direction, not both")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, not '{self.positions}'")
        if self.layer < 1:
            raise ValueError(
                f"layer {self.layer} is the embedding output; steer a block output (layer >= 1)"
            )

    def direction(self) -> torch.Tensor:
        v = self.vector
        return v[self.layer] if v.dim() == 2 else v

    def on(self, device: Any) -> SteeringSpec:
        """The same spec with its direction as a float32 [d] tensor on ``device``."""
        v = self.direction().to(device=device, dtype=torch.float32)
        return replace(self, vector=v)


# positions value -> [B, T] bool mask of the positions it touches in one forward (None: none).
PositionMasks = dict[str, torch.Tensor | None]


def prefill_masks(valid: torch.Tensor) -> PositionMasks:
    """For a left-padded prefill whose real tokens are ``valid`` [B, S]: the last column is
    every row's last real prompt token."""
    last = torch.zeros_like(valid)
    last[:, -1] = valid[:, -1]
    return {"prompt": valid, "response": last, "all": valid}


def decode_masks(live: torch.Tensor) -> PositionMasks:
    """For a decode step whose fed tokens are answer tokens of the rows ``live`` [B, 1]."""
    return {"prompt": None, "response": live, "all": live}


def sequence_masks(prompt_len: int, total_len: int, device: Any = None) -> PositionMasks:
    """For one teacher-forced forward over prompt ids + answer ids (no padding): what the
    engine touches while generating that answer."""
    index = torch.arange(total_len, device=device)[None]
    return {
        "prompt": index < prompt_len,
        "response": index >= prompt_len - 1,
        "all": torch.ones_like(index, dtype=torch.bool),
    }


def apply_steering(
    h: torch.Tensor,
    specs: Sequence[SteeringSpec],
    layer: int,
    masks: PositionMasks,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h`` [B, T, d] after block ``layer``-1, with every spec for that layer applied at the
    positions its ``positions`` mask marks. Returns a new tensor (or ``h`` untouched).
    ``rows`` [B, len(specs)] (bool): spec k steers only the rows where ``rows[:, k]`` (a
    sweep's settings in one batch); a spec leaves the other rows bit-equal. Specs, masks and
    rows should already be on ``h``'s device (then nothing is copied)."""
    for k, spec in enumerate(specs):
        mask = masks.get(spec.positions)
        if spec.layer != layer or mask is None:
            continue
        v = spec.direction().to(device=h.device, dtype=torch.float32)
        mask = mask.to(h.device)
        if rows is not None:
            mask = mask & rows[:, k, None].to(h.device)
        where = mask[..., None].to(torch.float32)
        hf = h.float()
        if spec.cap is not None:
            unit = v / v.norm().clamp(min=1e-12)
            excess = where * (hf @ unit - spec.cap).clamp(min=0)[..., None]
            # Selected, not subtracted, where nothing exceeds: those positions stay bit-equal.
            hf = torch.where(excess > 0, hf - excess * unit, hf)
        elif spec.ablate:
            unit = v / v.norm().clamp(min=1e-12)
            hf = hf - where * (hf @ unit)[..., None] * unit
        else:
            hf = hf + where * (spec.coef * v)
        h = hf.to(h.dtype)
    return h


@dataclass
class SteeringContext:
    """Which positions the next forward's hooks touch. ``masks`` None: every position, as
    ``all`` would (for a plain forward); callers set them before each forward."""

    specs: list[SteeringSpec]
    masks: PositionMasks | None = None
    handles: list[Any] = field(default_factory=list)

    def set(self, masks: PositionMasks | None) -> None:
        self.masks = masks


@contextmanager
def steered(model: Any, specs: Sequence[SteeringSpec]) -> Iterator[SteeringContext]:
    """Forward hooks on the HF decoder layers named by ``specs``; removed on exit."""
    context = SteeringContext(list(specs))
    core = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = core.layers
    for layer in sorted({s.layer for s in specs}):
        if layer > len(layers):
            raise ValueError(f"layer {layer} is past the model's {len(layers)} blocks")

        def hook(_module: Any, _inputs: Any, output: Any, layer: int = layer) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            masks = context.masks
            if masks is None:
                every = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
                masks = dict.fromkeys(POSITIONS, every)
            new = apply_steering(h, context.specs, layer, masks)
            if isinstance(output, tuple):
                return (new, *output[1:])
            return new

        context.handles.append(layers[layer - 1].register_forward_hook(hook))
    try:
        yield context
    finally:
        for handle in context.handles:
            handle.remove()
