"""``pipeline.decode_attention`` on the CPU: its launch plan (splits, tiles within the GPU's
shared memory), its declining anywhere but CUDA, the torch fallback for the boolean
whole-cache mask it serves, and when the runner takes the whole-cache steps. The kernel
itself runs in the GPU suite (tests/gpu/test_decode_attention_gpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_model import build_tiny_family

from pipeline import fused_kernels
from pipeline.decode_attention import decode_attention, split_count, tile_plan
from pipeline.engine import DecodeEngine
from pipeline.models import load_model
from pipeline.runners import StaticRunner, grouped_attention

H200_SHARED = 232448  # bytes a program may opt in to on an H200
SMALL_SHARED = 101376  # a consumer GPU's


def test_splits_only_where_the_rows_and_heads_leave_the_gpu_idle() -> None:
    assert split_count(2048, 1300, 132) == 1  # batch 256, Llama-8B: no split
    assert split_count(512, 512, 132) == 1  # batch 64
    assert split_count(128, 512, 132) == 2  # batch 16: two splits a row
    assert split_count(32, 512, 132) == 5  # batch 4
    assert split_count(8, 100, 132) == 2  # never more splits than the cache has blocks
    assert split_count(8, 1, 132) == 1


@pytest.mark.parametrize("dim_pad", [16, 64, 128, 256, 512])
@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("shared", [H200_SHARED, SMALL_SHARED])
def test_the_tiles_fit_the_gpus_shared_memory(dim_pad: int, element_size: int, shared: int) -> None:
    block, stages = tile_plan(dim_pad, element_size, shared)
    assert block >= 16 and block & (block - 1) == 0 and stages >= 1
    assert stages * 2 * block * dim_pad * element_size <= shared * 2 // 3


def test_the_measured_configurations_are_the_h200_plan() -> None:
    assert tile_plan(128, 2, H200_SHARED) == (64, 2)  # Llama-8B's heads in bf16
    assert tile_plan(256, 2, H200_SHARED) == (32, 2)  # Gemma-2's
    # fp32 heads of 256: the H200 refused 64 columns with three stages (282 KB asked).
    block, stages = tile_plan(256, 4, H200_SHARED)
    assert stages * 2 * block * 256 * 4 < 232448


def test_the_kernel_declines_off_cuda() -> None:
    q = torch.randn(2, 4, 1, 8)
    k = v = torch.randn(2, 2, 5, 8)
    allowed = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert decode_attention(q, k, v, allowed, 8**-0.5) is None


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_the_whole_cache_mask_gives_the_rounded_steps_attention(softcap) -> None:
    """Where the kernel cannot run, the boolean mask over the whole cache goes to SDPA (or
    the soft-capped matmuls) and equals the additive mask over the columns in use."""
    gen = torch.Generator().manual_seed(0)
    b, heads, kv, dim, used, whole = 3, 8, 2, 16, 24, 40
    q = torch.randn(b, heads, 1, dim, generator=gen)
    keys = torch.randn(b, kv, whole, dim, generator=gen)
    values = torch.randn(b, kv, whole, dim, generator=gen)
    valid = torch.zeros(b, whole, dtype=torch.bool)
    valid[0, 3:20] = True
    valid[1, 0:24] = True
    valid[2, 10:12] = True
    bias = torch.full((b, 1, 1, used), float("-inf")).masked_fill(valid[:, None, None, :used], 0)
    rounded = grouped_attention(
        None, q, keys[:, :, :used], values[:, :, :used], bias, 0.3, softcap=softcap
    )[0]
    whole_cache = grouped_attention(
        None, q, keys, values, valid[:, None, None, :], 0.3, softcap=softcap
    )[0]
    torch.testing.assert_close(whole_cache, rounded)


def test_the_runner_takes_whole_cache_steps_where_the_kernel_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")))
    cpu = torch.device("cpu")
    assert not StaticRunner(loaded.model).reads_valid_keys_only(cpu)
    monkeypatch.setattr(fused_kernels, "usable_on", lambda _device: True)
    assert StaticRunner(loaded.model).reads_valid_keys_only(cpu)
    # Not for a deterministic step (its own kernel) nor a compiled one (it traces torch).
    assert not StaticRunner(loaded.model, deterministic=True).reads_valid_keys_only(cpu)
    compiled = StaticRunner(loaded.model)
    compiled.compile_layers()
    assert not compiled.reads_valid_keys_only(cpu)
    forced = StaticRunner(loaded.model, valid_keys_only=False)
    assert not forced.reads_valid_keys_only(cpu)
    # An engine that steps eagerly (no CUDA graphs: here the CPU) keeps the rounded steps,
    # launch-bound as it is; one told otherwise keeps what it was told.
    assert not DecodeEngine(loaded).runner.reads_valid_keys_only(cpu)

    class Told(StaticRunner):
        def __init__(self, model, **kwargs) -> None:  # noqa: ANN001
            super().__init__(model, valid_keys_only=True, **kwargs)

    monkeypatch.setattr("pipeline.engine.StaticRunner", Told)
    assert DecodeEngine(loaded).runner.reads_valid_keys_only(cpu)
    # An override never takes a deterministic step off its repeatable kernel.
    forced_on = StaticRunner(loaded.model, deterministic=True, valid_keys_only=True)
    assert not forced_on.reads_valid_keys_only(cpu)
    assert StaticRunner(loaded.model, valid_keys_only=True).reads_valid_keys_only(cpu)
    # Heads the kernel does not take: the rounded columns, on SDPA.
    wide = StaticRunner(loaded.model)
    wide.head_dim = 512
    assert not wide.reads_valid_keys_only(cpu)
