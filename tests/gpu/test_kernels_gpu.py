"""The Triton kernels of ``pipeline.fused_kernels`` against transformers' own code on CUDA,
per family: the rotary embedding bit for bit (bf16, fp32, OLMo-2's float32 cos and sin,
Phi-3's partial rotary), the RMSNorm within a rounding of the model's dtype, the gated
SiLU bit for bit against torch's ``silu(gate) * up``, the cache write against torch's
indexing, and the swap of transformers' rotary function in place while a runner works and
gone after. Skipped without CUDA."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from tiny_model import FAMILY_CONFIGS, build_tiny_family

from pipeline import fused_kernels
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig
from pipeline.models import load_model
from pipeline.runners import StaticRunner, fused_norm_forward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the GPU acceptance suite needs a CUDA device"
    ),
]
MODELING = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "olmo2": "olmo2",
}


def _projection_views(b: int, s: int, heads: int, kv: int, dim: int, dtype: torch.dtype):
    """q and k as a layer makes them: slices of one fused q/k/v product, viewed as heads
    and transposed ([B, H, S, D], not contiguous)."""
    fused = torch.randn(b, s, (heads + 2 * kv) * dim, device="cuda", dtype=dtype)
    q, k, _v = fused.split([heads * dim, kv * dim, kv * dim], dim=-1)
    return (
        q.view(b, s, heads, dim).transpose(1, 2),
        k.view(b, s, kv, dim).transpose(1, 2),
    )


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq", [1, 7])
def test_rotary_kernel_equals_transformers_bit_for_bit(
    family: str, dtype: torch.dtype, seq: int, tmp_path: Path
) -> None:
    loaded = load_model(str(build_tiny_family(tmp_path / family, family)), dtype="float32")
    model = loaded.model.to(dtype)
    module = importlib.import_module(
        f"transformers.models.{MODELING[family]}.modeling_{MODELING[family]}"
    )
    original = module.apply_rotary_pos_emb
    runner = StaticRunner(model, fuse=False)
    assert module in runner._rotary_modules
    torch.manual_seed(0)
    q, k = _projection_views(3, seq, runner.num_heads, runner.num_kv, runner.head_dim, dtype)
    h = torch.randn(3, seq, model.config.hidden_size, device="cuda", dtype=dtype)
    positions = torch.arange(40, 40 + seq, device="cuda")[None].expand(3, -1)
    cos, sin = runner._rope(h, positions, runner.layer_types[0])
    theirs = original(q, k, cos, sin)
    with fused_kernels.rotary_swapped([module]):
        assert module.apply_rotary_pos_emb is not original
        ours = module.apply_rotary_pos_emb(q, k, cos, sin)
    assert module.apply_rotary_pos_emb is original
    direct = fused_kernels.rotary(q, k, cos, sin, theirs[0].dtype)
    assert direct is not None, "the kernel declined the layer's own layout"
    for mine, kernel, ref in zip(ours, direct, theirs, strict=True):
        assert mine.dtype == ref.dtype and mine.shape == ref.shape
        assert torch.equal(mine, ref)
        assert torch.equal(kernel, ref)


@pytest.mark.parametrize(
    "dim, rotated, dtype, cos_batch, cos_strided",
    [
        (64, 48, torch.bfloat16, 2, False),  # Phi-3's partial rotary: the rest copied
        (96, 96, torch.bfloat16, 2, False),  # Phi-3-mini's head of 96: halves of 48
        (96, 64, torch.float16, 1, False),  # fp16; one cos row for the whole batch
        (128, 128, torch.bfloat16, 2, True),  # cos and sin slices of wider tensors
    ],
)
def test_rotary_kernel_on_other_shapes_equals_transformers(
    dim: int, rotated: int, dtype: torch.dtype, cos_batch: int, cos_strided: bool
) -> None:
    module = importlib.import_module("transformers.models.phi3.modeling_phi3")
    torch.manual_seed(1)
    q, k = _projection_views(2, 5, 4, 2, dim, dtype)
    width = 2 * rotated if cos_strided else rotated
    cos = torch.randn(cos_batch, 5, width, device="cuda", dtype=dtype)[..., :rotated]
    sin = torch.randn(cos_batch, 5, width, device="cuda", dtype=dtype)[..., :rotated]
    theirs = module.apply_rotary_pos_emb(q, k, cos, sin)
    ours = fused_kernels.rotary(q, k, cos, sin, dtype)
    assert ours is not None, "the kernel declined"
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine.shape == ref.shape and mine.dtype == ref.dtype
        assert torch.equal(mine, ref)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_norm_kernel_equals_the_norms_formula(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every norm of the model (q/k norms, post norms, Gemma's 1 + weight), bf16, on the
    layouts a layer hands it (rows of a fused product, heads of one, a batch of one
    token; and one of three strided levels, which the torch code takes): within one
    rounding of bf16 of the torch formula, and exactly its dtype and shape."""
    loaded = load_model(str(build_tiny_family(tmp_path / family, family)), dtype="float32")
    model = loaded.model.to(torch.bfloat16)
    norms = [(m, f) for m in model.modules() if (f := fused_norm_forward(m)) is not None]
    assert norms
    torch.manual_seed(2)
    launched: list[bool] = []  # per call of the kernel: whether it ran (not declined)
    rms_norm = fused_kernels.rms_norm

    def recorded(*args, **kwargs):
        out = rms_norm(*args, **kwargs)
        launched.append(out is not None)
        return out

    monkeypatch.setattr(fused_kernels, "rms_norm", recorded)
    ran = 0
    for module, forward in norms:
        n = module.weight.shape[0]
        wide = torch.randn(4, 3, 3 * n, device="cuda", dtype=torch.bfloat16) * 3
        heads = wide.view(4, 3, 3, n)
        for x in (wide[..., :n], heads[:, :, :2], wide[:, :1, :n], heads[::2, :, :2]):
            fused_kernels.ENABLED = True
            out = forward(x)
            fused_kernels.ENABLED = False
            try:
                ref = forward(x)
            finally:
                fused_kernels.ENABLED = True
            assert out.dtype == ref.dtype == x.dtype and out.shape == x.shape
            torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-6)
            assert (out == ref).float().mean() > 0.99
            ran += 1
    assert ran == 4 * len(norms)
    # The kernel ran on the three layouts a layer makes and declined the fourth.
    assert launched == [True, True, True, False] * len(norms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(16, 1, 2 * 14336), (2, 7, 2 * 300), (1, 1, 2 * 5)])
def test_silu_mul_kernel_equals_torch_bit_for_bit(dtype: torch.dtype, shape: tuple) -> None:
    """On a fused gate/up product (a decode step's, a prefill's, a ragged width) and values
    from far negative to far positive: torch's ``silu(gate) * up``, every bit."""
    torch.manual_seed(11)
    gate_up = (torch.randn(shape, device="cuda") * 8).to(dtype)
    gate_up.view(-1)[:6] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-3, -20.0])
    out = fused_kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    assert out is not None and out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out, ref), (out.float() - ref.float()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("column_dtype", [torch.int64, torch.int32])
def test_cache_write_kernel_equals_indexing(dtype: torch.dtype, column_dtype: torch.dtype) -> None:
    """A decode step's key (contiguous, as the rotary kernel leaves it) and value (a view of
    the fused q/k/v product, transposed) into each row's column, nothing else touched."""
    torch.manual_seed(12)
    b, kv, length, dim, heads = 5, 4, 40, 128, 8
    keys = torch.randn(b, kv, length + 1, dim, device="cuda").to(dtype)
    values = torch.randn_like(keys)
    fused = torch.randn(b, 1, (heads + 2 * kv) * dim, device="cuda").to(dtype)
    _q, k, v = fused.split([heads * dim, kv * dim, kv * dim], dim=-1)
    key = k.reshape(b, 1, kv, dim).transpose(1, 2).contiguous()
    value = v.view(b, 1, kv, dim).transpose(1, 2)
    column = torch.tensor([0, 39, 7, 40, 7], device="cuda", dtype=column_dtype)
    ref_keys, ref_values = keys.clone(), values.clone()
    rows = torch.arange(b, device="cuda")
    ref_keys[rows, :, column.long()] = key[:, :, 0]
    ref_values[rows, :, column.long()] = value[:, :, 0]
    assert fused_kernels.cache_write(keys, values, key, value, column)
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)


def test_a_run_goes_through_the_kernels_and_leaves_transformers_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graphed decode and the prefill call both kernels (transformers' layers call the
    swapped global); after the run the module's function is transformers' again."""
    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")), dtype="bfloat16")
    module = importlib.import_module("transformers.models.llama.modeling_llama")
    original = module.apply_rotary_pos_emb
    calls = {"rotary": 0, "norm": 0, "silu": 0, "cache": 0}
    rotary, rms_norm = fused_kernels.rotary, fused_kernels.rms_norm
    silu_mul, cache_write = fused_kernels.silu_mul, fused_kernels.cache_write

    def counted_silu(*args, **kwargs):
        out = silu_mul(*args, **kwargs)
        calls["silu"] += out is not None
        return out

    def counted_cache(*args, **kwargs):
        out = cache_write(*args, **kwargs)
        calls["cache"] += out
        return out

    def counted_rotary(*args, **kwargs):  # launches, not calls the kernel declined
        out = rotary(*args, **kwargs)
        calls["rotary"] += out is not None
        return out

    def counted_norm(*args, **kwargs):
        out = rms_norm(*args, **kwargs)
        calls["norm"] += out is not None
        return out

    monkeypatch.setattr(fused_kernels, "rotary", counted_rotary)
    monkeypatch.setattr(fused_kernels, "rms_norm", counted_norm)
    monkeypatch.setattr(fused_kernels, "silu_mul", counted_silu)
    monkeypatch.setattr(fused_kernels, "cache_write", counted_cache)
    engine = DecodeEngine(loaded, capture=True)
    assert engine.cuda_graphs
    requests = [DecodeRequest([5, 6, 7, 8, 9], seed=0), DecodeRequest([5, 6], seed=1)]
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    kernels_on = engine.run(requests, sampling)
    layers = engine.runner.num_layers
    assert calls["rotary"] >= 2 * layers  # the prefill and the eager warm-up step at least
    assert calls["norm"] >= 2 * (2 * layers + 1)
    assert calls["silu"] >= 2 * layers  # the prefill's MLPs and the warm-up step's
    assert calls["cache"] >= layers  # the warm-up step's (the prefill writes its own way)
    assert module.apply_rotary_pos_emb is original
    monkeypatch.setattr(fused_kernels, "ENABLED", False)
    kernels_off = DecodeEngine(loaded, capture=True).run(requests, sampling)
    for on, off in zip(kernels_on, kernels_off, strict=True):
        # The norms' mean is a reduction in another order: a rare bf16 rounding apart.
        agree = sum(a == b for a, b in zip(on.answer_ids, off.answer_ids, strict=True))
        assert agree >= len(on.answer_ids) // 2
