"""``pipeline.fused_projections`` on plain linear layers: which groups it fuses, that the
weights become views of one tensor, and that a replaced weight or another input falls back
to the module's own product."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.fused_projections import fuse_weights, projection_forwards


class Attention(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 6, bias=bias)
        self.k_proj = nn.Linear(8, 2, bias=bias)
        self.v_proj = nn.Linear(8, 2, bias=bias)


def _installed(model: nn.Module) -> list:
    forwards = projection_forwards(model)
    for module, forward in forwards:
        module.forward = forward
    return forwards


def test_weights_and_biases_become_views_of_one_tensor() -> None:
    torch.manual_seed(0)
    attention = Attention(bias=True)
    copies = [m.weight.detach().clone() for m in (attention.q_proj, attention.k_proj)]
    assert fuse_weights([attention.q_proj, attention.k_proj, attention.v_proj])
    storage = attention.q_proj.weight.untyped_storage().data_ptr()
    bias_storage = attention.q_proj.bias.untyped_storage().data_ptr()
    for name in ("k_proj", "v_proj"):
        module = getattr(attention, name)
        assert module.weight.untyped_storage().data_ptr() == storage
        assert module.bias.untyped_storage().data_ptr() == bias_storage
    assert torch.equal(attention.q_proj.weight, copies[0])
    assert torch.equal(attention.k_proj.weight, copies[1])
    assert isinstance(attention.k_proj.weight, nn.Parameter)
    assert fuse_weights([attention.q_proj, attention.k_proj, attention.v_proj])  # again: kept
    assert attention.q_proj.weight.untyped_storage().data_ptr() == storage


def test_groups_that_cannot_be_one_matmul_are_left_alone() -> None:
    mixed = Attention()
    mixed.v_proj.to(torch.float64)
    assert not fuse_weights([mixed.q_proj, mixed.k_proj, mixed.v_proj])

    class Quantised(nn.Linear):
        pass

    odd = Attention()
    odd.k_proj = Quantised(8, 2, bias=False)
    assert not fuse_weights([odd.q_proj, odd.k_proj, odd.v_proj])
    half_bias = Attention()
    half_bias.q_proj = nn.Linear(8, 6, bias=True)
    assert projection_forwards(half_bias) == []
    before = [p.data_ptr() for p in odd.parameters()]
    assert projection_forwards(odd) == [] and [p.data_ptr() for p in odd.parameters()] == before


def test_a_replaced_weight_or_another_input_uses_the_modules_own_product() -> None:
    torch.manual_seed(0)
    attention = Attention()
    _installed(attention)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    q = attention.q_proj(x)
    assert q.untyped_storage().data_ptr() == attention.k_proj(x).untyped_storage().data_ptr()
    assert torch.equal(attention.k_proj(y), nn.functional.linear(y, attention.k_proj.weight))
    attention.v_proj(x)  # the group's last projection lets the kept product go
    fresh = nn.Parameter(torch.randn(2, 8))
    attention.k_proj.weight = fresh  # a load that assigns a new parameter
    attention.q_proj(x)
    torch.testing.assert_close(attention.k_proj(x), x @ fresh.T)
    torch.testing.assert_close(attention.v_proj(x), x @ attention.v_proj.weight.T)
