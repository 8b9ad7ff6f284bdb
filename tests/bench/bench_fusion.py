"""The static runner's fusions against the unfused code, same model, prompts and engine,
same run: whole ``engine.run`` calls (prefill and graph captures included), alternating
between the variants, best of three.

- ``plain``: transformers' own norms and projections, every prompt of a fill in one prefill;
- ``norms``: RMSNorm as one ``F.rms_norm`` kernel (``fused_norm_forward``);
- ``+ projections``: q/k/v and gate/up as one matmul a group (``pipeline.fused_projections``);
- ``+ prefill groups``: prompts prefilled in groups of similar length (``prefill_groups``);
- ``+ triton kernels``: on CUDA, each norm and each layer's rotary embedding as one Triton
  kernel (``pipeline.fused_kernels``): all of today's defaults.

    python tests/bench/bench_fusion.py [--arch llama,qwen3,olmo2,mistral] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_arch_model, card, print_table, random_prompts, save_json  # noqa: E402

import pipeline.engine as engine_module  # noqa: E402
from pipeline import fused_kernels  # noqa: E402
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig  # noqa: E402

VARIANTS = ("plain", "norms", "+ projections", "+ prefill groups", "+ triton kernels")


def timed_run(engine: DecodeEngine, prompts: list[list[int]], new: int) -> float:
    requests = [DecodeRequest(p, seed=i) for i, p in enumerate(prompts)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.run(requests, SamplingConfig(max_new_tokens=new, ignore_eos=True))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def use_variant(engine: DecodeEngine, variant: str, norms: list, groups: list) -> None:
    level = VARIANTS.index(variant)
    engine.runner._norms = norms if level >= 1 else []
    engine.runner._groups = groups if level >= 2 else []
    engine_module.PREFILL_TOKENS = DEFAULT_PREFILL_TOKENS if level >= 3 else 1 << 40
    fused_kernels.ENABLED = level >= 4


DEFAULT_PREFILL_TOKENS = engine_module.PREFILL_TOKENS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llama,qwen3,olmo2,mistral")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    cases = [(arch, 64, 128) for arch in args.arch.split(",")]
    cases += [("llama", 16, 128), ("llama", 256, 256)]
    rows = []
    for arch, batch, new in cases:
        loaded = build_arch_model(arch)
        engine = DecodeEngine(loaded, capture=True)
        norms, groups = engine.runner._norms, engine.runner._groups
        prompts = random_prompts(batch, 100, 200, loaded.model.config.vocab_size, seed=batch)
        timed_run(engine, prompts, 16)  # warm-up
        seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for variant in VARIANTS * args.reps:
            use_variant(engine, variant, norms, groups)
            seconds[variant].append(timed_run(engine, prompts, new))
        best = {variant: min(times) for variant, times in seconds.items()}
        fused = sum(len(group.modules) for group in groups)
        row = {"arch": arch, "batch": batch, "new": new, "projections fused": fused}
        row |= {f"{variant} ms/step": 1000 * best[variant] / new for variant in VARIANTS}
        row["all / plain"] = best["plain"] / best[VARIANTS[-1]]
        row["all / norms"] = best["norms"] / best[VARIANTS[-1]]
        row["kernels' gain"] = best[VARIANTS[-2]] / best[VARIANTS[-1]]
        row["tok/s, all"] = batch * new / best[VARIANTS[-1]]
        rows.append(row)
        print(rows[-1], flush=True)
        del engine, loaded
        torch.cuda.empty_cache()
    print_table("bench_fusion: the static runner's fusions, one at a time", rows, list(rows[0]))
    save_json("bench_fusion.json", {"card": card(), "rows": rows})


if __name__ == "__main__":
    main()
