"""Does the same command give the same tokens every time on a GPU? The 8B shape (bf16,
random weights, 16 layers), 64 prompts, 128 new tokens, each variant in a fresh process
(as a rerun of ``persona generate`` would be) and run twice in it: the plain engine sampled
(temperature 1) and greedy, the compiled step sampled with an empty Inductor cache, with
the cache that run left and with another empty one, and with Inductor's deterministic
mode (no kernel choice by timing on the device). Per variant: rows equal to the group's
first run token for token, rows equal between the two runs in its own process, a checksum
of the weights (the same seed must build the same model), the step's speed; and the
sampler alone, ``sample_next`` called ten times on the same flat logits (a random model's
next-token distribution is nearly flat, so any difference in its CDF moves the token), and
``cumsum`` of those probabilities ten times, for 64 rows and for one (torch documents a
floating-point ``cumsum`` on CUDA as nondeterministic; its source scans a single row with
cub, several rows with a fixed tree each): how many calls differ from the first.

Session 9 (NVIDIA H200) found 0 of 64 sampled rows equal between two runs of the plain
engine in one process, with equal weights; this separates the model's forward from the
sampler.

    python tests/bench/repeatability.py [--layers 16] [--batch 64] [--new 128] [--where]

``--where`` (one process): each piece of the forward alone, ten times on the same input,
HF's own forward, and the engine greedy with and without CUDA graphs, with
``--deterministic`` and under torch's deterministic algorithms, with where the rows first
differ. ``--attention``: decode attention alone, on each SDPA backend and the other ways
tried (repeats, speed, and error against float32 math).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SAMPLER_CHECKS = (
    "sampler",
    "cumsum",
    "sampler, one row",
    "cumsum, one row",
    "cumsum, one row as two",
)


def _calls_differing(make: Any) -> int:
    """Of nine more calls of ``make``, how many return other than its first call did."""
    import torch

    first = make()
    return sum(not torch.equal(make(), first) for _ in range(9))


def _sampler_repeats(vocab: int, batch: int) -> dict[str, int]:
    """Calls of ten that differ from the first: the sampler, and ``cumsum``, on the GPU."""
    import torch

    from pipeline.sampling import sample_next

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = 0.02 * torch.randn(batch, vocab, device="cuda", generator=generator)
    seeds = torch.arange(batch, device="cuda")
    step = torch.tensor(3, device="cuda")
    probs = torch.softmax(logits.float(), dim=-1)
    one = probs[:1].contiguous()
    return {
        "sampler": _calls_differing(lambda: sample_next(logits, seeds, step, 1.0, 1.0)),
        "cumsum": _calls_differing(lambda: probs.cumsum(dim=-1)),
        # One row is a cub scan in torch (ScanUtils.cuh), documented nondeterministic; two
        # or more take a fixed-tree kernel a row.
        "sampler, one row": _calls_differing(
            lambda: sample_next(logits[:1], seeds[:1], step, 1.0, 1.0)
        ),
        "cumsum, one row": _calls_differing(lambda: one.cumsum(dim=-1)),
        "cumsum, one row as two": _calls_differing(lambda: one.expand(2, -1).cumsum(dim=-1)[:1]),
    }


def _child(args: tuple, results: Any) -> None:
    layers, batch, new, compiled, temperature, deterministic = args
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    import torch._inductor.config as inductor_config
    from common import build_model, random_prompts

    from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig

    if deterministic:
        inductor_config.deterministic = True
    loaded = build_model(layers)
    vocab = loaded.model.config.vocab_size
    prompts = random_prompts(batch, 100, 200, vocab, seed=batch)
    requests = [DecodeRequest(p, seed=i) for i, p in enumerate(prompts)]
    sampling = SamplingConfig(max_new_tokens=new, temperature=temperature, ignore_eos=True)
    engine = DecodeEngine(loaded, capture=False, compiled=compiled)
    torch.cuda.synchronize()
    start = time.perf_counter()
    first = engine.run(requests, sampling)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    again = engine.run(requests, sampling)
    torch.cuda.synchronize()
    again_s = time.perf_counter() - start
    results.put(
        {
            "tokens": [r.answer_ids for r in first],
            "same in process": sum(
                a.answer_ids == b.answer_ids for a, b in zip(first, again, strict=True)
            ),
            "weights sum": sum(float(p.double().sum()) for p in loaded.model.parameters()),
            "first call s": first_s,
            "ms/step": 1000 * again_s / new,
            "inductor deterministic": getattr(inductor_config, "deterministic", "absent"),
            **_sampler_repeats(vocab, batch),
        }
    )


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """The first answer position where two token lists differ (None: equal)."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def _divergence(first: list[Any], again: list[Any]) -> str:
    """Rows equal of all, and where the others first differ (the smallest and the median
    answer position): position 0 is the prefill's token, later ones a decode step's."""
    where = [
        _first_difference(a.answer_ids, b.answer_ids) for a, b in zip(first, again, strict=True)
    ]
    differing = sorted(w for w in where if w is not None)
    text = f"{len(where) - len(differing)}/{len(where)} equal"
    if differing:
        text += f", first difference at {differing[0]} (median {differing[len(differing) // 2]})"
    return text


def _where_child(args: tuple, results: Any) -> None:
    """Which piece of the forward repeats, in one process: each op alone ten times on the
    same input, HF's own forward, our prefill, and the engine greedy (with and without CUDA
    graphs, and under torch's deterministic algorithms, which also fill fresh memory with
    NaN, so a read of memory never written shows)."""
    layers, batch, new = args
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import warnings

    import torch
    import torch.nn.functional as F
    from common import build_model, random_prompts

    from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig

    loaded = build_model(layers)
    model = loaded.model
    config = model.config
    vocab = config.vocab_size
    prompts = random_prompts(batch, 100, 200, vocab, seed=batch)
    requests = [DecodeRequest(p, seed=i) for i, p in enumerate(prompts)]
    greedy = SamplingConfig(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    report: dict[str, str] = {}
    gen = torch.Generator(device="cuda").manual_seed(1)

    def repeats(name: str, make) -> None:
        with torch.inference_mode():
            report[name] = f"{_calls_differing(make)} of 9 differ"

    dim, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = dim // heads
    x = torch.randn(batch, dim, device="cuda", generator=gen).bfloat16()
    weight = model.model.layers[0].mlp.gate_proj.weight
    repeats("matmul [B, d] x gate_proj", lambda: F.linear(x, weight))
    repeats("lm_head [B, d]", lambda: model.lm_head(x))
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", generator=gen).bfloat16()
    k = torch.randn(batch, kv, 320, head_dim, device="cuda", generator=gen).bfloat16()
    v = torch.randn(batch, kv, 320, head_dim, device="cuda", generator=gen).bfloat16()
    lengths = torch.randint(100, 320, (batch,), device="cuda", generator=gen)
    mask = (torch.arange(320, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    repeats(
        "SDPA decode, mask, GQA",
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
    )
    qp = torch.randn(8, heads, 200, head_dim, device="cuda", generator=gen).bfloat16()
    kp = torch.randn(8, kv, 200, head_dim, device="cuda", generator=gen).bfloat16()
    causal = torch.ones(200, 200, dtype=torch.bool, device="cuda").tril()[None, None]
    repeats(
        "SDPA prefill, mask, GQA",
        lambda: F.scaled_dot_product_attention(qp, kp, kp, attn_mask=causal, enable_gqa=True),
    )
    ids = torch.tensor([p[:100] for p in prompts[:8]], device="cuda")
    repeats("HF forward, 8 x 100 tokens", lambda: model(ids).logits)
    repeats(
        "HF generate greedy, 8 x 32 new",
        lambda: model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32),
    )

    engine = DecodeEngine(loaded, capture=False)
    eager = DecodeEngine(loaded, capture=False, cuda_graphs=False)
    deterministic = DecodeEngine(loaded, capture=False, deterministic=True)
    for name, chosen in (
        ("engine greedy, graphed", engine),
        ("engine greedy, eager", eager),
        ("engine greedy, graphed, --deterministic", deterministic),
    ):
        first = chosen.run(requests, greedy)
        report[name] = _divergence(first, chosen.run(requests, greedy))
    one = SamplingConfig(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    first = engine.run(requests, one)
    report["engine, prefill token only"] = _divergence(first, engine.run(requests, one))
    torch.use_deterministic_algorithms(True, warn_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strict = DecodeEngine(loaded, capture=False, cuda_graphs=False)
        logits_of = strict.runner._logits
        nan_calls: list[bool] = []

        def checked_logits(last: torch.Tensor) -> torch.Tensor:
            logits = logits_of(last)
            nan_calls.append(bool(torch.isnan(logits).any()))
            return logits

        strict.runner._logits = checked_logits  # type: ignore[method-assign]
        first = strict.run(requests, greedy)
        report["engine greedy, eager, deterministic algorithms"] = _divergence(
            first, strict.run(requests, greedy)
        )
    torch.use_deterministic_algorithms(False)
    nondeterministic = {
        str(w.message).split(".")[0] for w in caught if "determin" in str(w.message)
    }
    report["ops torch calls nondeterministic"] = "; ".join(sorted(nondeterministic)) or "none"
    report["forwards with NaN logits, deterministic fill"] = f"{sum(nan_calls)} of {len(nan_calls)}"
    results.put(report)


def _attention_child(args: tuple, results: Any) -> None:
    """Decode attention (one query a row, a padding mask, the 8B shape's grouped heads),
    several ways: SDPA as torch picks and on each backend, the group's query heads as one
    key/value head's queries (no repeated cache), and two plain matmuls. For each: how many
    of nine repeats differ from the first, microseconds a call, and the largest difference
    from float32 math attention."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, kv, dim = 32, 8, 128
    groups = heads // kv
    gen = torch.Generator(device="cuda").manual_seed(0)
    report: dict[str, str] = {}

    def grouped_matmul(q, k, v, mask, fp32_scores: bool) -> torch.Tensor:
        b, _, _, d = q.shape
        grouped = q.reshape(b * kv, groups, d)
        keys = k.reshape(b * kv, -1, d).transpose(1, 2)
        if fp32_scores:
            scores = torch.bmm(grouped, keys, out_dtype=torch.float32)
        else:
            scores = torch.bmm(grouped, keys).float()
        scores = scores.view(b, kv, groups, -1) * d**-0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, -1).to(v.dtype).view(b * kv, groups, -1)
        return torch.bmm(weights, v.reshape(b * kv, -1, d)).view(b, heads, 1, d)

    def groups_as_queries(q, k, v, mask) -> torch.Tensor:
        b, _, _, d = q.shape
        out = F.scaled_dot_product_attention(q.reshape(b, kv, groups, d), k, v, attn_mask=mask)
        return out.reshape(q.shape)

    for batch, keys in ((16, 320), (64, 320), (256, 1152)):
        q = torch.randn(batch, heads, 1, dim, device="cuda", generator=gen).bfloat16()
        k = torch.randn(batch, kv, keys, dim, device="cuda", generator=gen).bfloat16()
        v = torch.randn(batch, kv, keys, dim, device="cuda", generator=gen).bfloat16()
        lengths = torch.randint(keys // 3, keys, (batch,), device="cuda", generator=gen)
        mask = (torch.arange(keys, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
        kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        with sdpa_kernel([SDPBackend.MATH]):
            reference = F.scaled_dot_product_attention(
                q.float(), kr.float(), vr.float(), attn_mask=mask
            )
        sdpa = F.scaled_dot_product_attention
        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False, enable_gqa=True)
        picked = SDPBackend(choice).name if choice >= 0 else str(choice)
        ways: list[tuple[str, Any, Any]] = [
            (f"SDPA default ({picked})", None, partial(sdpa, q, k, v, mask, enable_gqa=True)),
            (
                "SDPA cuDNN",
                SDPBackend.CUDNN_ATTENTION,
                partial(sdpa, q, k, v, mask, enable_gqa=True),
            ),
            (
                "SDPA efficient, heads repeated",
                SDPBackend.EFFICIENT_ATTENTION,
                partial(sdpa, q, kr, vr, mask),
            ),
            ("SDPA math", SDPBackend.MATH, partial(sdpa, q, k, v, mask, enable_gqa=True)),
        ]
        for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            call = partial(groups_as_queries, q, k, v, mask)
            ways.append((f"groups as queries, {backend.name}", backend, call))
        ways.append(("matmul, bf16 scores", None, partial(grouped_matmul, q, k, v, mask, False)))
        ways.append(("matmul, fp32 scores", None, partial(grouped_matmul, q, k, v, mask, True)))
        for way, backend, call in ways:
            name = f"B={batch:3d} keys={keys:4d} {way}"
            context = sdpa_kernel([backend]) if backend else nullcontext()
            try:
                with context, torch.inference_mode():
                    differ = _calls_differing(call)
                    error = float((call().float() - reference).abs().max())
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(50):
                        call()
                    torch.cuda.synchronize()
                    micro = 1e6 * (time.perf_counter() - start) / 50
                report[name] = f"{differ} of 9 differ  {micro:7.1f} us  max |diff| {error:.1e}"
            except (RuntimeError, TypeError) as exc:
                report[name] = f"not available ({str(exc).splitlines()[0][:60]})"
    results.put(report)


def _in_fresh_process(ctx: Any, args: tuple, env: dict[str, str], target: Any = _child) -> dict:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # a spawned child reads its environment at start
    try:
        results = ctx.Queue()
        child = ctx.Process(target=target, args=(args, results))
        child.start()
        value = results.get(timeout=600)
        child.join()
        return value
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument(
        "--where", action="store_true", help="only which piece of the forward repeats"
    )
    parser.add_argument(
        "--attention", action="store_true", help="only decode attention on each SDPA backend"
    )
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    if args.attention:
        for name, value in _in_fresh_process(ctx, (), {}, _attention_child).items():
            print(f"{name:56s} {value}", flush=True)
        return
    if args.where:
        env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        plan = (args.layers, args.batch, args.new)
        for name, value in _in_fresh_process(ctx, plan, env, _where_child).items():
            print(f"{name:48s} {value}", flush=True)
        return
    caches = Path(tempfile.mkdtemp(prefix="inductor-caches-"))
    # name, compiled, temperature, Inductor's deterministic mode, a cache dir per process
    groups = [
        ("plain, sampled", False, 1.0, False, ["a", "a"]),
        ("plain, greedy", False, 0.0, False, ["a", "a"]),
        ("compiled, sampled", True, 1.0, False, ["1", "1", "2"]),
        ("compiled, greedy", True, 0.0, False, ["1", "2"]),
        ("compiled, deterministic mode", True, 1.0, True, ["3", "3"]),
    ]
    for name, compiled, temperature, deterministic, dirs in groups:
        reference = None
        seen: set[str] = set()
        for cache in dirs:
            state = "warm" if cache in seen else "empty"
            seen.add(cache)
            plan = (args.layers, args.batch, args.new, compiled, temperature, deterministic)
            run = _in_fresh_process(ctx, plan, {"TORCHINDUCTOR_CACHE_DIR": str(caches / cache)})
            reference = reference or run["tokens"]
            same = sum(a == b for a, b in zip(run["tokens"], reference, strict=True))
            print(
                f"{name:28s} cache {cache} ({state:5s})  rows equal to the group's first run "
                f"{same}/{len(reference)}, to its own second run {run['same in process']}  "
                f"weights {run['weights sum']:.6e}  first call {run['first call s']:.1f} s  "
                f"{run['ms/step']:.2f} ms/step  inductor deterministic "
                f"{run['inductor deterministic']}  of 9 repeats differing: "
                + ", ".join(f"{key} {run[key]}" for key in SAMPLER_CHECKS),
                flush=True,
            )


if __name__ == "__main__":
    main()
