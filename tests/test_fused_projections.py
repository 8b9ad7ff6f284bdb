"""``pipeline.fused_projections`` on plain linear layers: which groups it fuses, that the
weights become views of one tensor, and that a replaced parameter, new ``.data`` or another
input falls back to the module's own product."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pipeline.fused_projections as fused_projections
from pipeline.fused_projections import FusedGroup, fuse_weights, fused_groups


class Attention(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 6, bias=bias)
        self.k_proj = nn.Linear(8, 2, bias=bias)
        self.v_proj = nn.Linear(8, 2, bias=bias)


def _install(group: FusedGroup) -> None:
    for module, forward in group.forwards():
        module.forward = forward


def _own(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, module.weight, module.bias)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_weights_and_biases_become_views_of_one_tensor() -> None:
    torch.manual_seed(0)
    attention = Attention(bias=True)
    modules = [attention.q_proj, attention.k_proj, attention.v_proj]
    copies = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in modules]
    (group,) = fused_groups(attention)
    for module, (weight, bias) in zip(modules, copies, strict=True):
        assert _storage(module.weight) == _storage(attention.q_proj.weight)
        assert _storage(module.bias) == _storage(attention.q_proj.bias)
        assert torch.equal(module.weight, weight) and torch.equal(module.bias, bias)
        assert isinstance(module.weight, nn.Parameter)
    assert group.intact()
    pointers = [p.data_ptr() for p in attention.parameters()]
    assert fuse_weights(modules)  # again: already fused, nothing moves
    assert [p.data_ptr() for p in attention.parameters()] == pointers


def test_fused_under_inference_mode_the_parameters_stay_plain_tensors() -> None:
    attention = Attention(bias=True)
    with torch.inference_mode():
        assert fused_groups(attention)
    for parameter in attention.parameters():
        assert not parameter.is_inference()
    with torch.no_grad():
        attention.q_proj.weight.mul_(1.0)  # an in-place update (a load) still works


def test_groups_that_cannot_be_one_matmul_are_left_alone(monkeypatch) -> None:
    mixed = Attention()
    mixed.v_proj.to(torch.float64)
    assert not fuse_weights([mixed.q_proj, mixed.k_proj, mixed.v_proj])

    class Quantised(nn.Linear):
        pass

    odd = Attention()
    odd.k_proj = Quantised(8, 2, bias=False)
    half_bias = Attention()
    half_bias.q_proj = nn.Linear(8, 6, bias=True)
    twice = Attention()
    twice.v_proj = twice.k_proj  # one module twice: no fused tensor could hold both
    for model in (odd, half_bias, twice):
        before = [p.data_ptr() for p in model.parameters()]
        assert fused_groups(model) == []
        assert [p.data_ptr() for p in model.parameters()] == before
    crowded = Attention()  # a GPU without room for the stacked copy
    monkeypatch.setattr(fused_projections, "_room_for", lambda _nbytes, _device: False)
    assert fused_groups(crowded) == []


def test_weights_already_stacked_with_separate_biases_keep_their_biases() -> None:
    torch.manual_seed(0)
    attention = Attention(bias=True)
    modules = [attention.q_proj, attention.k_proj, attention.v_proj]
    stacked = torch.cat([m.weight.detach() for m in modules]).split([6, 2, 2])
    for module, piece in zip(modules, stacked, strict=True):
        module.weight = nn.Parameter(piece)
    (group,) = fused_groups(attention)
    _install(group)
    x = torch.randn(3, 8)
    outputs = [m(x) for m in modules]
    for module, out in zip(modules, outputs, strict=True):
        torch.testing.assert_close(out, _own(module, x))


def test_the_first_projection_runs_the_product_and_the_others_take_slices() -> None:
    torch.manual_seed(0)
    attention = Attention()
    (group,) = fused_groups(attention)
    _install(group)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    q = attention.q_proj(x)
    assert group.kept is not None and _storage(attention.k_proj(x)) == _storage(q)
    assert torch.equal(attention.k_proj(y), _own(attention.k_proj, y))  # another input
    attention.v_proj(x)
    assert group.kept is None  # the group's last projection lets the kept product go
    attention.q_proj(x)
    group.release()  # the runner's work ended between q and v: nothing is held
    assert group.kept is None
    torch.testing.assert_close(attention.v_proj(x), _own(attention.v_proj, x))


@pytest.mark.parametrize("change", ["weight", "bias", "data"])
def test_a_changed_parameter_uses_the_modules_own_product(change: str) -> None:
    torch.manual_seed(0)
    attention = Attention(bias=True)
    (group,) = fused_groups(attention)
    if change == "weight":  # a load that assigns a new parameter
        attention.k_proj.weight = nn.Parameter(torch.randn(2, 8))
    elif change == "bias":
        attention.k_proj.bias = nn.Parameter(torch.ones(2))
    else:  # new storage under the same parameter (``model.to``, ``.data =``)
        attention.q_proj.weight.data = torch.randn(6, 8)
    assert not group.intact()  # the runner installs no fused forward for it
    # A parameter replaced while the forwards are installed (a load mid-run) is seen too.
    _install(group)
    x = torch.randn(3, 8)
    if change != "data":
        for module in (attention.q_proj, attention.k_proj, attention.v_proj):
            torch.testing.assert_close(module(x), _own(module, x))
