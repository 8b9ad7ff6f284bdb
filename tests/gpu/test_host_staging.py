"""The engine's collection through its kept pinned buffer (``engine._HostStaging``): each
result is its own pageable copy, untouched by later collections. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from pipeline.engine import _HostStaging

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the GPU acceptance suite needs a CUDA device"
    ),
]


def test_staged_copies_are_their_own_and_outlive_the_next_collection() -> None:
    staging = _HostStaging()
    first_source = torch.randn(4, 3, 8, device="cuda")
    first = staging.copy(first_source)
    second_source = torch.randn(9, 3, 8, device="cuda")  # grows the buffer
    second = staging.copy(second_source)
    third = staging.copy(torch.zeros(2, 3, 8, device="cuda"))  # overwrites its start
    assert torch.equal(first, first_source.cpu()) and torch.equal(second, second_source.cpu())
    assert torch.equal(third, torch.zeros(2, 3, 8))
    assert not any(t.is_pinned() for t in (first, second, third))
    assert staging.buffer is not None and staging.buffer.is_pinned()
    assert staging.copy(torch.ones(2, dtype=torch.long, device="cuda")).dtype == torch.long
