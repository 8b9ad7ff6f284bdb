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

    python tests/bench/repeatability.py [--layers 16] [--batch 64] [--new 128]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
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

    def differing(make) -> int:
        first = make()
        return sum(not torch.equal(make(), first) for _ in range(9))

    return {
        "sampler": differing(lambda: sample_next(logits, seeds, step, 1.0, 1.0)),
        "cumsum": differing(lambda: probs.cumsum(dim=-1)),
        # One row is a cub scan in torch (ScanUtils.cuh), documented nondeterministic; two
        # or more take a fixed-tree kernel a row.
        "sampler, one row": differing(lambda: sample_next(logits[:1], seeds[:1], step, 1.0, 1.0)),
        "cumsum, one row": differing(lambda: one.cumsum(dim=-1)),
        "cumsum, one row as two": differing(lambda: one.expand(2, -1).cumsum(dim=-1)[:1]),
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


def _in_fresh_process(ctx: Any, args: tuple, env: dict[str, str]) -> dict:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # a spawned child reads its environment at start
    try:
        results = ctx.Queue()
        child = ctx.Process(target=_child, args=(args, results))
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
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
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
