"""One matmul where transformers' layers run several over the same input: attention's q, k
and v projections, and the MLP's gate and up projections. A decode step at a small batch is
a read of every weight, and the narrow k and v products (and gate and up apart) each pay a
kernel's fixed cost and a split-K reduction; fused, a layer runs four weight matmuls, not
seven.

The weights are not duplicated: each projection's weight (and bias) becomes a view into one
fused tensor, rows stacked (``fuse_weights``), so the model's own forward (the HF runner,
``generate``) reads the same values. On a GPU the stacked tensor is a new allocation and the
old weights' blocks stay with PyTorch's allocator (transformers loads into one big segment,
which ``empty_cache`` cannot return), so a group is fused only where the device has room
for it beside the usual reserve. While the static runner works, the first projection's
forward runs the fused product, hands back its own slice and keeps the others' for the
projections called next on the same input tensor (``FusedGroup.forwards``). A projection
called on another tensor, or whose weight or bias changed since, computes its own.

On CUDA the MLP's ``silu(gate) * up`` then runs as one kernel on the fused product
(``gated_silu_forward``; Phi-3's gate/up product is one matmul already), where torch ran
the activation and the product apart, each over a strided half of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import fused_kernels
from pipeline.models import GPU_RESERVE

# Projections of one input, in the order transformers' layers call them.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
# (transformers 5), and those whose forward chunks ``gate_up_proj(x)`` into gate and up and
# returns ``down_proj(up * activation_fn(gate))`` (Phi-3).
SPLIT_GATED_MLPS = frozenset(
    {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "Gemma2MLP", "Gemma3MLP"}
)
FUSED_GATED_MLPS = frozenset({"Phi3MLP"})
# Activation classes that compute ``F.silu`` (transformers' ``ACT2FN["silu"]``, torch's).
SILU_CLASSES = frozenset({"SiLUActivation", "SiLU"})

Forward = Callable[[torch.Tensor], torch.Tensor]
_FUSE_LOCK = threading.Lock()  # two runners built at once on one model fuse it once


class FusedGroup:
    """One group's modules, the stacked tensors their parameters view, and its forwards."""

    def __init__(self, modules: list[nn.Module], parent: nn.Module | None = None) -> None:
        """``parent``: the module that holds them (an attention or an MLP)."""
        self.modules = modules
        self.parent = parent
        self.weights = [m.weight for m in modules]
        self.biases = [m.bias for m in modules]
        self.sizes = [w.shape[0] for w in self.weights]
        self.weight = _fused_views(self.weights)
        self.bias = None if self.biases[0] is None else _fused_views(self.biases)
        # The last fused call: (its input, every projection's output). One tuple, read and
        # written whole, so two threads' calls never mix outputs (a mismatch computes its own).
        self.kept: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def intact(self) -> bool:
        """The modules still hold the parameters made views of the stacked tensors, and
        those still view them (a load may assign new parameters, or new ``.data``)."""
        if not self._current() or self.weight is None:
            return False
        if self.biases[0] is not None and self.bias is None:
            return False
        for parts, fused in ((self.weights, self.weight), (self.biases, self.bias)):
            if fused is not None:
                views = _fused_views(parts)
                if views is None or views.data_ptr() != fused.data_ptr():
                    return False
        return True

    def release(self) -> None:
        """Let the kept outputs go (the runner's work ended)."""
        self.kept = None

    def forwards(self) -> list[tuple[nn.Module, Forward]]:
        """(module, forward): the first runs the fused product, the others take their slice
        of it (the last one lets it go)."""
        return [(self.modules[0], self._first)] + [
            (self.modules[i], self._later(i)) for i in range(1, len(self.modules))
        ]

    def _current(self) -> bool:
        return all(
            m.weight is w and m.bias is b
            for m, w, b in zip(self.modules, self.weights, self.biases, strict=True)
        )

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        module = self.modules[0]
        if not self._current():  # a parameter replaced mid-run: the module's own product
            self.kept = None
            return F.linear(x, module.weight, module.bias)
        outputs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        self.kept = (x, outputs)
        return outputs[0]

    def _later(self, index: int) -> Forward:
        module = self.modules[index]
        last = index == len(self.modules) - 1

        def forward(x: torch.Tensor) -> torch.Tensor:
            entry = self.kept
            if entry is not None and entry[0] is x:
                if last:
                    self.kept = None  # nothing of the step is held past the group
                return entry[1][index]
            return F.linear(x, module.weight, module.bias)

        return forward


def fused_groups(model: Any) -> list[FusedGroup]:
    """Every q/k/v and gate/up group of the model that ``fuse_weights`` could fuse."""
    groups: list[FusedGroup] = []
    with _FUSE_LOCK:
        for parent in list(model.modules()):
            for names in FUSED_GROUPS:
                modules = [getattr(parent, name, None) for name in names]
                if not all(isinstance(m, nn.Module) for m in modules):
                    continue
                if fuse_weights(modules):
                    groups.append(FusedGroup(modules, parent))
    return groups


def gated_silu_forward(mlp: nn.Module, group: FusedGroup | None) -> Forward | None:
    """The forward of a gated SiLU MLP that, on CUDA, computes ``silu(gate) * up`` in one
    kernel (``fused_kernels.silu_mul``) on its gate/up product: ``group``'s fused product
    for the split classes (None: not fused, no forward), the module's own ``gate_up_proj``
    for Phi-3's. Elsewhere, or with a parameter replaced since, the class's own forward.
    None for another class or activation."""
    name = type(mlp).__name__
    if name in SPLIT_GATED_MLPS:
        act = getattr(mlp, "act_fn", None)
        if group is None or group.modules != [mlp.gate_proj, mlp.up_proj]:
            return None

        def product(x: torch.Tensor) -> torch.Tensor | None:
            return F.linear(x, group.weight, group.bias) if group._current() else None

    elif name in FUSED_GATED_MLPS:
        act = getattr(mlp, "activation_fn", None)
        gate_up = getattr(mlp, "gate_up_proj", None)
        if not isinstance(gate_up, nn.Module):
            return None

        def product(x: torch.Tensor) -> torch.Tensor | None:
            return gate_up(x)

    else:
        return None
    if type(act).__name__ not in SILU_CLASSES or not isinstance(mlp.down_proj, nn.Module):
        return None
    own = type(mlp).forward.__get__(mlp)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if fused_kernels.available(x):
            gate_up = product(x)
            if gate_up is not None:
                out = fused_kernels.silu_mul(gate_up)
                if out is None:  # a layout the kernel does not take: the same formula
                    gate, up = gate_up.chunk(2, dim=-1)
                    out = act(gate) * up
                return mlp.down_proj(out)
        return own(x)

    return forward


def fuse_weights(modules: list[nn.Module]) -> bool:
    """Make the modules' weights (and biases) views into one tensor, rows stacked, if they
    are distinct plain ``nn.Linear`` layers over one input on one device and dtype, biased
    alike, and (on a GPU) the device has room for the stacked copy; False if not. Already
    fused (a second runner on the model): True, nothing moves."""
    if len({id(m) for m in modules}) != len(modules):
        return False
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
    names = ("weight", "bias") if has_bias[0] else ("weight",)
    parts = {name: [getattr(m, name) for m in modules] for name in names}
    if all(_fused_views(p) is not None for p in parts.values()):
        return True
    if not _room_for(sum(p.nbytes for group in parts.values() for p in group), first.device):
        return False
    # Plain tensors even when a runner is built under inference mode (a probe): parameters
    # that are inference tensors would refuse later in-place updates and autograd.
    with torch.inference_mode(False), torch.no_grad():
        for name, group in parts.items():
            fused = torch.cat([p.detach() for p in group])
            pieces = fused.split([p.shape[0] for p in group])
            for module, part, piece in zip(modules, group, pieces, strict=True):
                setattr(module, name, nn.Parameter(piece, requires_grad=part.requires_grad))
    return True


def _room_for(nbytes: int, device: torch.device) -> bool:
    """Whether a GPU keeps its reserve after ``nbytes`` more (a CPU always has room)."""
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    return free - nbytes >= GPU_RESERVE * total


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
