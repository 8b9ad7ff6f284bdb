"""``pipeline.decode_attention``'s kernel on CUDA against an independent attention in
float64, over each tested family's head shapes (grouped heads 1-8, head sizes 64-256,
Gemma-2's soft-capping), masks with holes, padded rows, windows and single keys, split and
unsplit; under a CUDA graph replayed over masks it was not captured with; and the engine
taking it: one graph a session, equal to the eager step and to the SDPA step. Skipped
without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eager_twin import eager_twin
from tiny_model import build_tiny_family

from pipeline import decode_attention as kernel_module
from pipeline import fused_kernels
from pipeline.decode_attention import decode_attention
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig
from pipeline.models import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the GPU acceptance suite needs a CUDA device"
    ),
]


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention in float64 with the key/value heads repeated, [B, 1, H, D]."""
    groups = q.shape[1] // k.shape[1]
    keys = k.double().repeat_interleave(groups, 1)
    values = v.double().repeat_interleave(groups, 1)
    scores = (q.double() @ keys.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2)


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that fails turns Triton off for the process (``fused_kernels.launch``): on
    again for each test, so one failure is one failed test, not every test after it."""
    monkeypatch.setattr(fused_kernels, "ENABLED", True)


def _masks(b: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Per row: left padding then a run of keys (a prompt and its answer so far), one with
    random holes, one with a window's worth, one with a single key, and one with two runs
    far apart (whole blocks and splits between them with no key to see)."""
    allowed = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        kind = row % 5
        if kind == 0:
            start = int(torch.randint(0, max(1, n // 2), (1,), generator=generator))
            stop = int(torch.randint(start + 1, n + 1, (1,), generator=generator))
            allowed[row, start:stop] = True
        elif kind == 1:
            allowed[row] = torch.rand(n, generator=generator) < 0.4
            allowed[row, n - 1] = True
        elif kind == 2:
            stop = int(torch.randint(1, n + 1, (1,), generator=generator))
            allowed[row, max(0, stop - 17) : stop] = True
        elif kind == 3:
            allowed[row, int(torch.randint(0, n, (1,), generator=generator))] = True
        else:
            allowed[row, :5] = True
            allowed[row, max(0, n - 10) :] = True
    return allowed[:, None, None, :].cuda()


# (batch, query heads, key/value heads, head size, keys, softcap): Llama/Qwen3 (4 groups),
# Gemma-2 (2 groups, 256, capped), Phi-3 (no grouping, 96), 8 groups, 3 groups, a batch
# large enough for one split, and a key count off the block size.
SHAPES = [
    (3, 8, 2, 128, 300, None),
    (2, 4, 2, 256, 200, 50.0),
    (2, 6, 6, 96, 130, None),
    (2, 16, 2, 64, 64, None),
    (5, 12, 4, 128, 77, None),
    (600, 8, 2, 128, 150, None),
    (4, 4, 1, 256, 1, 30.0),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_attention_in_float64(shape, dtype: torch.dtype) -> None:
    b, heads, kv_heads, dim, n, softcap = shape
    generator = torch.Generator().manual_seed(sum(shape[:5]))
    q = torch.randn(b, heads, 1, dim, generator=generator).to("cuda", dtype)
    # The cache as the runner hands it: a slice of one more column, strided.
    cache_k = torch.randn(b, kv_heads, n + 1, dim, generator=generator).to("cuda", dtype)
    cache_v = torch.randn(b, kv_heads, n + 1, dim, generator=generator).to("cuda", dtype)
    k, v = cache_k[:, :, :n], cache_v[:, :, :n]
    allowed = _masks(b, n, generator)
    scale = dim**-0.5
    out = decode_attention(q, k, v, allowed, scale, softcap)
    assert out is not None and out.shape == (b, 1, heads, dim) and out.dtype == dtype
    expected = _reference(q, k, v, allowed, scale, softcap)
    # fp32: exact products and float32 sums; bf16: the probabilities rounded to bf16 before
    # the values' matmul (as flash attention does) and the output rounded.
    tolerance = (
        {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    )
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_the_kernel_takes_the_layouts_a_layer_hands_it() -> None:
    """The query as a view of one fused q/k/v product (a batch stride past its heads'), the
    mask a slice of a wider one (a row stride past its columns), fp16."""
    generator = torch.Generator().manual_seed(11)
    b, heads, kv_heads, dim, n = 6, 8, 2, 128, 700
    dtype = torch.float16
    fused = torch.randn(b, 1, (heads + 2 * kv_heads) * dim, generator=generator)
    fused = fused.to("cuda", dtype)
    q = fused[..., : heads * dim].view(b, 1, heads, dim).transpose(1, 2)
    assert q.stride(0) != heads * dim
    k = torch.randn(b, kv_heads, n + 1, dim, generator=generator).to("cuda", dtype)[:, :, :n]
    v = torch.randn(b, kv_heads, n + 1, dim, generator=generator).to("cuda", dtype)[:, :, :n]
    wide = torch.zeros(b, 1, 1, n + 64, dtype=torch.bool, device="cuda")
    wide[..., :n] = _masks(b, n, generator)
    allowed = wide[..., :n]
    assert allowed.stride(0) != n
    out = decode_attention(q, k, v, allowed, dim**-0.5)
    assert out is not None
    expected = _reference(q, k, v, allowed, dim**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)


def test_the_kernel_under_a_cuda_graph_follows_the_mask_it_is_replayed_with() -> None:
    """The graph is captured once; each replay reads the mask's current contents, so one
    graph serves a session as its rows grow, finish and are refilled."""
    generator = torch.Generator().manual_seed(7)
    b, heads, kv_heads, dim, n = 4, 8, 2, 128, 256
    q = torch.randn(b, heads, 1, dim, generator=generator).to("cuda", torch.bfloat16)
    k = torch.randn(b, kv_heads, n, dim, generator=generator).to("cuda", torch.bfloat16)
    v = torch.randn(b, kv_heads, n, dim, generator=generator).to("cuda", torch.bfloat16)
    allowed = torch.zeros(b, 1, 1, n, dtype=torch.bool, device="cuda")
    allowed[..., :10] = True
    out = decode_attention(q, k, v, allowed, dim**-0.5)  # warm: the kernel compiles here
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.graph(graph, stream=stream):
        out = decode_attention(q, k, v, allowed, dim**-0.5)
    for _ in range(3):
        allowed.copy_(_masks(b, n, generator))
        graph.replay()
        torch.cuda.synchronize()
        expected = decode_attention(q, k, v, allowed, dim**-0.5)
        assert torch.equal(out, expected)
        torch.testing.assert_close(
            out.double(), _reference(q, k, v, allowed, dim**-0.5), atol=2e-2, rtol=2e-2
        )


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_the_engine_attends_over_the_whole_cache_with_one_graph_a_session(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel serves every decode step, with one CUDA graph for the session's lengths;
    greedy tokens (fp32) equal the SDPA steps over the rounded columns, refilled slots and
    all, and the graphed steps equal the eager ones."""
    loaded = load_model(str(build_tiny_family(tmp_path / family, family)), dtype="float32")
    requests = [
        DecodeRequest(list(range(5, 5 + length)), seed=i)
        for i, length in enumerate([7, 30, 12, 3, 21])
    ]
    # Several rounded lengths over 64 steps: the rounded steps capture more than one graph.
    monkeypatch.setattr("pipeline.engine.ATTENTION_ROUND", 16)
    sampling = SamplingConfig(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    calls = {"kernel": 0}
    original = kernel_module.decode_attention

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["kernel"] += out is not None
        return out

    monkeypatch.setattr("pipeline.runners.decode_attention", counted)
    captures: list[int] = []
    real_graph = torch.cuda.CUDAGraph

    def counted_graph(*args, **kwargs):
        captures.append(1)
        return real_graph(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", counted_graph)
    engine = DecodeEngine(loaded, capture=True)
    assert engine.runner.reads_valid_keys_only(loaded.device)
    step_functions: list[int] = []  # one a session and one after each compaction
    make_step = engine._make_step

    def counted_step(*args, **kwargs):
        step_functions.append(1)
        return make_step(*args, **kwargs)

    monkeypatch.setattr(engine, "_make_step", counted_step)
    whole = engine.run(requests, sampling, slots=3, check_every=8)
    assert calls["kernel"] >= loaded.num_layers  # the eager warm-up step at least
    # One graph a step function, whatever lengths its steps attend over.
    whole_captures = len(captures)
    assert whole_captures == len(step_functions)
    # Eager, the engine keeps the rounded SDPA step (launch-bound); its twin, the kernel's.
    assert not DecodeEngine(loaded, cuda_graphs=False).runner.reads_valid_keys_only(loaded.device)
    eager_engine = eager_twin(loaded, capture=True)
    assert eager_engine.runner.reads_valid_keys_only(loaded.device)
    eager = eager_engine.run(requests, sampling, slots=3, check_every=8)
    captures.clear()
    monkeypatch.setattr(fused_kernels, "ENABLED", False)
    rounded_engine = DecodeEngine(loaded, capture=True)
    assert not rounded_engine.runner.reads_valid_keys_only(loaded.device)
    rounded = rounded_engine.run(requests, sampling, slots=3, check_every=8)
    assert whole_captures < len(captures)
    for w, e, r in zip(whole, eager, rounded, strict=True):
        assert w.answer_ids == e.answer_ids == r.answer_ids
        torch.testing.assert_close(w.activations["response_avg"], e.activations["response_avg"])
        torch.testing.assert_close(
            w.activations["response_avg"], r.activations["response_avg"], atol=1e-4, rtol=1e-4
        )
