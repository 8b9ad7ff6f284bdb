"""Steering: add coef * v to the output of decoder block l-1 ("layer l", the index of the
vector file and of ``hidden_states``), or project the direction out (ablation).

Which positions are touched, exactly:
- ``prompt``: the prompt's real tokens during the prefill; nothing while decoding.
- ``response``: nothing during the prefill; while decoding, the token being fed (an answer
  token) of every row that has not finished.
- ``all``: both.
Pad positions are never touched: the caller passes a mask of real prompt tokens for the
prefill and of live rows for each decode step.

``steered(model, specs)`` applies the specs with forward hooks on HF decoder layers, for any
forward the caller runs (prefill and decode). ``apply_steering`` is the same arithmetic for
code that runs the layers itself (our decode engine).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, not '{self.positions}'")
        if self.layer < 1:
            raise ValueError(
                f"layer {self.layer} is the embedding output; steer a block output (layer >= 1)"
            )

    def direction(self) -> torch.Tensor:
        v = self.vector
        return v[self.layer] if v.dim() == 2 else v

    def touches(self, phase: str) -> bool:
        """Whether this spec acts in the ``prefill`` or in a ``decode`` step."""
        if self.positions == "all":
            return True
        return (self.positions == "prompt") == (phase == "prefill")


def apply_steering(
    h: torch.Tensor, specs: Sequence[SteeringSpec], layer: int, phase: str, mask: torch.Tensor
) -> torch.Tensor:
    """``h`` [B, T, d] after block ``layer``-1, with every spec for that layer applied at the
    positions where ``mask`` [B, T] is true. Returns a new tensor (or ``h`` untouched)."""
    for spec in specs:
        if spec.layer != layer or not spec.touches(phase):
            continue
        v = spec.direction().to(device=h.device, dtype=torch.float32)
        where = mask.to(h.device)[..., None].to(torch.float32)
        hf = h.float()
        if spec.ablate:
            unit = v / v.norm().clamp(min=1e-12)
            hf = hf - where * (hf @ unit)[..., None] * unit
        else:
            hf = hf + where * (spec.coef * v)
        h = hf.to(h.dtype)
    return h


@dataclass
class SteeringContext:
    """What the hooks need to know about the next forward: its phase and which positions
    are real tokens. The caller sets these before each forward."""

    specs: list[SteeringSpec]
    phase: str = "prefill"
    mask: torch.Tensor | None = None  # [B, T] bool; None: every position is real
    handles: list[Any] = field(default_factory=list)

    def set(self, phase: str, mask: torch.Tensor | None) -> None:
        self.phase = phase
        self.mask = mask


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
            mask = context.mask
            if mask is None:
                mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            new = apply_steering(h, context.specs, layer, context.phase, mask)
            if isinstance(output, tuple):
                return (new, *output[1:])
            return new

        context.handles.append(layers[layer - 1].register_forward_hook(hook))
    try:
        yield context
    finally:
        for handle in context.handles:
            handle.remove()
