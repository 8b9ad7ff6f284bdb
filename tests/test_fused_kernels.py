"""``pipeline.fused_kernels`` where no GPU is: which layouts the norm kernel can address,
that the kernels stand aside on the CPU, and the swap of transformers' rotary function
(counted, restored, transformers' own result where the kernel does not apply). The
kernels themselves run in ``tests/gpu/test_kernels_gpu.py``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from tiny_model import FAMILY_CONFIGS, build_tiny_family

from pipeline import fused_kernels
from pipeline.models import load_model
from pipeline.runners import StaticRunner, fused_norm_forward


def test_rows_addresses_a_layers_layouts_in_two_strided_levels() -> None:
    wide = torch.zeros(4, 3, 24)
    assert fused_kernels._rows(wide) == (12, 12, 0, 24)
    # q's slice of a fused q/k/v product: rows one product-width apart
    assert fused_kernels._rows(wide[..., :8]) == (12, 12, 0, 24)
    # q's heads of that slice ([B, S, H, D]): rows of heads within rows of tokens
    heads = wide.view(4, 3, 3, 8)[:, :, :2]
    assert fused_kernels._rows(heads) == (24, 2, 24, 8)
    # a dimension of one has no stride that matters
    assert fused_kernels._rows(wide[:, :1, :8]) == (4, 4, 0, 72)
    assert fused_kernels._rows(torch.zeros(1, 1, 8)) == (1, 1, 0, 0)


def test_rows_declines_what_two_levels_cannot_address() -> None:
    wide = torch.zeros(4, 3, 24)
    assert fused_kernels._rows(wide.view(4, 3, 3, 8)[::2, :, :2]) is None  # three levels
    assert fused_kernels._rows(wide.transpose(1, 2)) is None  # last dim not contiguous
    assert fused_kernels._rows(torch.zeros(8)) is None


def test_the_kernels_stand_aside_without_cuda() -> None:
    x = torch.randn(2, 3, 8)
    assert not fused_kernels.available(x)
    assert not fused_kernels.available(x.to(torch.long))
    # The cache write declines on the CPU: the caller writes with torch.
    cache, new = torch.zeros(2, 2, 5, 8), torch.randn(2, 2, 1, 8)
    assert not fused_kernels.cache_write(cache, cache.clone(), new, new, torch.tensor([0, 3]))
    assert not cache.any()


SILU_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3"]


@pytest.mark.parametrize("family", SILU_FAMILIES)
def test_the_gated_silu_forward_feeds_the_kernel_the_gate_then_up(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SiLU family's MLP gets the gated forward, which hands the kernel its fused
    gate/up product (gate first) and ``down_proj`` its result: with a torch stand-in for
    the kernel it equals the MLP's own forward in float32; with the kernels unavailable it
    is the MLP's own forward."""
    loaded = load_model(str(build_tiny_family(tmp_path / family, family)), dtype="float32")
    runner = StaticRunner(loaded.model)
    mlps = [mlp for mlp, _group, _forward in runner._gated_mlps]
    layers = [layer.mlp for layer in runner.layers]
    assert mlps == layers
    seen = []

    def stand_in(gate_up: torch.Tensor) -> torch.Tensor:
        seen.append(gate_up.shape)
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    torch.manual_seed(4)
    x = torch.randn(3, 2, loaded.model.config.hidden_size)
    width = loaded.model.config.intermediate_size
    with torch.no_grad():
        for mlp, _group, forward in runner._gated_mlps:
            own = type(mlp).forward(mlp, x)
            assert torch.equal(forward(x), own)  # kernels unavailable: the MLP's own
            monkeypatch.setattr(fused_kernels, "available", lambda _t: True)
            monkeypatch.setattr(fused_kernels, "silu_mul", stand_in)
            torch.testing.assert_close(forward(x), own, rtol=1e-6, atol=1e-6)
            monkeypatch.undo()
    assert seen == [(3, 2, 2 * width)] * len(layers)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_a_gelu_mlp_keeps_its_own_forward(family: str, tmp_path: Path) -> None:
    loaded = load_model(str(build_tiny_family(tmp_path / family, family)), dtype="float32")
    assert StaticRunner(loaded.model)._gated_mlps == []


def test_an_unfused_split_mlp_gets_no_gated_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the fused gate/up group (``fuse=False``) a split MLP has no product to hand
    the kernel; a replaced weight sends the forward back to the MLP's own."""
    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")), dtype="float32")
    assert StaticRunner(loaded.model, fuse=False)._gated_mlps == []
    runner = StaticRunner(loaded.model)
    mlp, group, forward = runner._gated_mlps[0]
    assert group is not None and group.parent is mlp
    mlp.up_proj.weight = torch.nn.Parameter(torch.zeros_like(mlp.up_proj.weight))
    x = torch.randn(2, 1, loaded.model.config.hidden_size)
    monkeypatch.setattr(fused_kernels, "available", lambda _t: True)
    with torch.no_grad():
        out = forward(x)
    assert not out.any()  # the MLP's own forward, with the zero weight: up is 0


def test_without_triton_the_kernels_decline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_kernels, "triton", None)
    x = torch.randn(2, 3, 8)
    assert not fused_kernels.available(x)
    assert fused_kernels.rms_norm(x, torch.ones(8), 1e-6, 0) is None
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    cos = sin = torch.randn(2, 3, 8)
    assert fused_kernels.rotary(q, k, cos, sin, torch.float32) is None
    assert fused_kernels.silu_mul(torch.randn(2, 1, 16)) is None
    cache = torch.zeros(2, 2, 5, 8)
    assert not fused_kernels.cache_write(
        cache, cache.clone(), k[:, :2, :1], k[:, :2, :1], torch.tensor([0, 1])
    )


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_each_family_swaps_its_own_rotary_function(family: str, tmp_path: Path) -> None:
    """The runner finds the family's modeling module (its layers call
    ``apply_rotary_pos_emb`` by that global name), swaps it only while it works, and the
    swapped function gives transformers' result where the kernel does not run (CPU)."""
    loaded = load_model(str(build_tiny_family(tmp_path / family, family)), dtype="float32")
    runner = StaticRunner(loaded.model, fuse=False)
    (module,) = runner._rotary_modules
    assert module.__name__.startswith("transformers.models.")
    original = module.apply_rotary_pos_emb
    torch.manual_seed(0)
    q = torch.randn(2, runner.num_heads, 3, runner.head_dim)
    k = torch.randn(2, runner.num_kv, 3, runner.head_dim)
    h = torch.randn(2, 3, loaded.model.config.hidden_size)
    cos, sin = runner._rope(h, torch.arange(3)[None].expand(2, -1), runner.layer_types[0])
    with runner.attention():
        swapped = module.apply_rotary_pos_emb
        assert swapped is not original and swapped.persona_wraps is original
        ours = swapped(q, k, cos, sin)
    assert module.apply_rotary_pos_emb is original
    for mine, ref in zip(ours, original(q, k, cos, sin), strict=True):
        assert torch.equal(mine, ref)


def test_swaps_nest_and_end_with_the_last(tmp_path: Path) -> None:
    module = importlib.import_module("transformers.models.llama.modeling_llama")
    original = module.apply_rotary_pos_emb
    with fused_kernels.rotary_swapped([module]):
        swapped = module.apply_rotary_pos_emb
        with fused_kernels.rotary_swapped([module]):
            assert module.apply_rotary_pos_emb is swapped
        assert module.apply_rotary_pos_emb is swapped  # the outer runner still works
    assert module.apply_rotary_pos_emb is original
    with pytest.raises(RuntimeError), fused_kernels.rotary_swapped([module]):
        raise RuntimeError("a step failed")
    assert module.apply_rotary_pos_emb is original
    # One wrapper a module, whatever the swap: a compiled layer's guard on the global holds.
    with fused_kernels.rotary_swapped([module]):
        assert module.apply_rotary_pos_emb is swapped


def test_a_call_the_kernel_does_not_cover_goes_to_transformers() -> None:
    module = importlib.import_module("transformers.models.llama.modeling_llama")
    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    cos, sin = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    original = module.apply_rotary_pos_emb
    with fused_kernels.rotary_swapped([module]):
        ours = module.apply_rotary_pos_emb(
            q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2
        )
    theirs = original(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2)
    for mine, ref in zip(ours, theirs, strict=True):
        assert torch.equal(mine, ref)


def test_norm_forwards_keep_the_torch_formula_on_the_cpu(tmp_path: Path) -> None:
    loaded = load_model(str(build_tiny_family(tmp_path / "olmo2", "olmo2")), dtype="float32")
    torch.manual_seed(3)
    x = torch.randn(2, 5, loaded.model.config.hidden_size)
    for module in loaded.model.modules():
        forward = fused_norm_forward(module)
        if forward is not None and module.weight.shape[0] == x.shape[-1]:
            torch.testing.assert_close(forward(x), module(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "olmo2", "phi3", "gemma3_text"])
def test_the_layers_call_the_swapped_function(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' layers (the installed version) reach the rotary function through the
    module global the runner swaps: a decode run calls it for every layer of the prefill
    and of each step. A version that called it some other way would leave the kernel
    unused on CUDA; this fails there first. Also: a function replaced between two swaps
    (here by the test) is the one wrapped, not the first one seen."""
    from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig

    loaded = load_model(str(build_tiny_family(tmp_path / family, family)), dtype="float32")
    engine = DecodeEngine(loaded, capture=False)
    (module,) = engine.runner._rotary_modules
    requests = [DecodeRequest([5, 6, 7, 8], seed=0)]
    sampling = SamplingConfig(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    engine.run(requests, sampling)  # a swap with transformers' own function first
    calls = []
    original = module.apply_rotary_pos_emb

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "apply_rotary_pos_emb", counted)
    engine.run(requests, sampling)
    layers = engine.runner.num_layers
    prefill = [shape for shape in calls if shape[2] == 4]
    steps = [shape for shape in calls if shape[2] == 1]
    assert len(prefill) == layers  # q [B, H, S, D]: the prompt's 4 tokens, once a layer
    # every decode step (the loop runs on to its next host check) calls it once a layer
    assert len(steps) >= 2 * layers and len(steps) % layers == 0
    assert len(prefill) + len(steps) == len(calls)
    assert module.apply_rotary_pos_emb is counted


class _FailingKernel:
    """A Triton kernel that cannot be built here, as ``kernel[grid](...)`` sees it."""

    def __getitem__(self, grid):
        def launch(*_args, **_meta):
            raise RuntimeError("CUDA error: no kernel image is available for execution\nmore")

        return launch


class _TritonStub:
    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << (n - 1).bit_length()


def test_a_kernel_triton_cannot_build_turns_the_kernels_off_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU or driver Triton does not support: the norm, the rotary embedding and the gated
    SiLU decline (their callers run the torch code), and the kernels stay off for the
    process."""
    monkeypatch.setattr(fused_kernels, "ENABLED", True)
    monkeypatch.setattr(fused_kernels, "triton", _TritonStub())
    monkeypatch.setattr(fused_kernels, "_rms_norm_kernel", _FailingKernel(), raising=False)
    monkeypatch.setattr(fused_kernels, "_rotary_kernel", _FailingKernel(), raising=False)
    x = torch.randn(2, 3, 8)
    with caplog.at_level("WARNING", logger="persona.engine"):
        assert fused_kernels.rms_norm(x, torch.ones(8), 1e-6, 0) is None
    assert fused_kernels.ENABLED is False
    assert caplog.messages == [
        "Triton kernels off for this process (CUDA error: no kernel image is available for "
        "execution); the torch code runs"
    ]
    monkeypatch.setattr(fused_kernels, "ENABLED", True)
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    cos = sin = torch.randn(2, 3, 8)
    assert fused_kernels.rotary(q, k, cos, sin, torch.float32) is None
    assert fused_kernels.ENABLED is False
    monkeypatch.setattr(fused_kernels, "ENABLED", True)
    monkeypatch.setattr(fused_kernels, "_silu_mul_kernel", _FailingKernel(), raising=False)
    monkeypatch.setattr(fused_kernels, "SILU_BLOCK", 8)
    monkeypatch.setattr(fused_kernels.triton, "cdiv", lambda a, b: -(-a // b), raising=False)
    assert fused_kernels.silu_mul(torch.randn(2, 1, 16)) is None
    assert fused_kernels.ENABLED is False


def test_only_the_tested_families_rotary_is_swapped(tmp_path: Path) -> None:
    """Other families rotate interleaved pairs or hand a half-width cos: the kernel does
    not compute their formula, so their function stays theirs even while a runner works."""
    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")), dtype="float32")
    loaded.model.config.model_type = "cohere"  # the layout fits; the rotary formula differs
    assert StaticRunner(loaded.model, fuse=False)._rotary_modules == []


def test_a_function_replaced_during_a_swap_is_left_in_place() -> None:
    """Another library's replacement made while a runner works stays after it; our own
    wrapper put back later is unwrapped, never wrapped twice."""
    module = importlib.import_module("transformers.models.llama.modeling_llama")
    original = module.apply_rotary_pos_emb

    def theirs(*args, **kwargs):
        return original(*args, **kwargs)

    try:
        with fused_kernels.rotary_swapped([module]):
            kept = module.apply_rotary_pos_emb
            module.apply_rotary_pos_emb = theirs
        assert module.apply_rotary_pos_emb is theirs
        module.apply_rotary_pos_emb = kept  # ours, put back by whoever kept it
        with fused_kernels.rotary_swapped([module]):
            assert module.apply_rotary_pos_emb is kept
            assert kept.persona_wraps is original
        assert module.apply_rotary_pos_emb is original
    finally:
        module.apply_rotary_pos_emb = original


def test_an_environment_variable_turns_the_kernels_off() -> None:
    import subprocess
    import sys

    code = "import pipeline.fused_kernels as k; print(k.ENABLED)"
    root = Path(__file__).resolve().parents[1]
    for value, expected in (("0", "False"), ("1", "True")):
        env = {"PERSONA_TRITON_KERNELS": value, "PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
        )
        assert out.stdout.strip() == expected, out.stderr


def test_a_split_mlp_runs_its_gated_forward_only_while_its_group_is_intact(
    tmp_path: Path,
) -> None:
    """Inside ``attention()`` each split MLP whose fused gate/up group is intact runs its
    gated forward; one whose group lost a parameter runs its class's own, the others keep
    theirs."""
    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")), dtype="float32")
    runner = StaticRunner(loaded.model)
    (first, _, first_forward), (second, _, second_forward) = runner._gated_mlps[:2]
    with runner.attention():
        assert vars(first).get("forward") is first_forward
        assert vars(second).get("forward") is second_forward
    assert "forward" not in vars(first)
    first.up_proj.weight = torch.nn.Parameter(first.up_proj.weight.detach().clone())
    with runner.attention():
        assert "forward" not in vars(first)
        assert vars(second).get("forward") is second_forward
