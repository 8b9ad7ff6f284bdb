"""One matmul where transformers' layers run several over the same input: attention's q, k
and v projections, and the MLP's gate and up projections. A decode step at a small batch is
a read of every weight, and the narrow k and v products (and gate and up apart) each pay a
kernel's fixed cost and a split-K reduction; fused, a layer runs four weight matmuls, not
seven.

The weights are not copied: each projection's weight (and bias) becomes a view into one
fused tensor, rows stacked (``fuse_weights``), so memory stays as it was and the model's own
forward (the HF runner, ``generate``) reads the same values. While the static runner works,
the first projection's forward runs the fused product, hands back its own slice and keeps
the others' for the projections called next on the same input tensor (``projection_forwards``).
A projection called on another tensor, or whose weight was replaced since, computes its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Projections of one input, in the order transformers' layers call them.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

Forward = Callable[[torch.Tensor], torch.Tensor]


def projection_forwards(model: Any) -> list[tuple[nn.Module, Forward]]:
    """(module, fused forward) for every projection of every group that ``fuse_weights``
    could fuse, to install as the modules' forwards while the runner works."""
    forwards: list[tuple[nn.Module, Forward]] = []
    for parent in list(model.modules()):
        for names in FUSED_GROUPS:
            modules = [getattr(parent, name, None) for name in names]
            if all(isinstance(m, nn.Module) for m in modules) and fuse_weights(modules):
                forwards.extend(zip(modules, _group_forwards(modules), strict=True))
    return forwards


def fuse_weights(modules: list[nn.Module]) -> bool:
    """Make the modules' weights (and biases) views into one tensor, rows stacked, if they
    are plain ``nn.Linear`` layers over one input on one device and dtype; False if not.
    Already fused (a second runner on the model): True, nothing moves."""
    if not all(type(m) is nn.Linear and not hasattr(m, "_hf_hook") for m in modules):
        return False
    weights = [m.weight for m in modules]
    first = weights[0]
    has_bias = [m.bias is not None for m in modules]
    if (
        first.device.type == "meta"
        or any(w.device != first.device or w.dtype != first.dtype for w in weights)
        or len({w.shape[1] for w in weights}) != 1
        or len(set(has_bias)) != 1
    ):
        return False
    if _fused_views(weights) is not None:
        return True
    with torch.no_grad():
        for name in ("weight", "bias") if has_bias[0] else ("weight",):
            parts = [getattr(m, name) for m in modules]
            fused = torch.cat([p.detach() for p in parts])
            pieces = fused.split([p.shape[0] for p in parts])
            for module, part, piece in zip(modules, parts, pieces, strict=True):
                setattr(module, name, nn.Parameter(piece, requires_grad=part.requires_grad))
    return True


def _fused_views(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor these are consecutive row blocks of (contiguous, one storage), or
    None."""
    base = tensors[0]
    storage = base.untyped_storage().data_ptr()
    offset = base.storage_offset()
    for t in tensors:
        same = t.untyped_storage().data_ptr() == storage and t.dtype == base.dtype
        if not same or not t.is_contiguous() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return base.as_strided((rows, *base.shape[1:]), base.stride(), base.storage_offset())


def _group_forwards(modules: list[nn.Module]) -> list[Forward]:
    """The group's forwards: the first runs the fused product, the others take their slice
    of it (the last one lets it go)."""
    weights = [m.weight for m in modules]
    sizes = [w.shape[0] for w in weights]
    fused_weight = _fused_views(weights)
    fused_bias = None
    if modules[0].bias is not None:
        fused_bias = _fused_views([m.bias for m in modules])
    # The last fused call: (its input, every projection's output). One tuple, read and
    # written whole, so two threads' calls never mix outputs (a mismatch computes its own).
    kept: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None] = [None]

    def intact() -> bool:
        return all(m.weight is w for m, w in zip(modules, weights, strict=True))

    def first(x: torch.Tensor) -> torch.Tensor:
        if not intact():  # a weight replaced since (a load): the module's own product
            kept[0] = None
            return F.linear(x, modules[0].weight, modules[0].bias)
        outputs = F.linear(x, fused_weight, fused_bias).split(sizes, dim=-1)
        kept[0] = (x, outputs)
        return outputs[0]

    def later(index: int) -> Forward:
        module = modules[index]
        last = index == len(modules) - 1

        def forward(x: torch.Tensor) -> torch.Tensor:
            entry = kept[0]
            if entry is not None and entry[0] is x:
                if last:
                    kept[0] = None  # nothing of the step is held past the group
                return entry[1][index]
            return F.linear(x, module.weight, module.bias)

        return forward

    return [first] + [later(i) for i in range(1, len(modules))]
