"""The static runner's fused RMSNorm (one ``F.rms_norm`` kernel a norm) against the norms'
own forwards (transformers' code), same model, same prompts, same engine, same run: whole
``engine.run`` calls (prefill and graph captures included), alternating, best of three.

    python tests/bench/bench_norms.py [--arch llama,qwen3,olmo2,gemma3_text,mistral]
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

from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig  # noqa: E402


def timed_run(engine: DecodeEngine, prompts: list[list[int]], new: int) -> float:
    requests = [DecodeRequest(p, seed=i) for i, p in enumerate(prompts)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.run(requests, SamplingConfig(max_new_tokens=new, ignore_eos=True))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llama,qwen3,olmo2,gemma3_text,mistral")
    args = parser.parse_args()
    cases = [(arch, 64, 128) for arch in args.arch.split(",")]
    cases += [("llama", 16, 128), ("llama", 256, 256)]
    rows = []
    for arch, batch, new in cases:
        loaded = build_arch_model(arch)
        engine = DecodeEngine(loaded, capture=True)
        fused = engine.runner._norms
        prompts = random_prompts(batch, 100, 200, loaded.model.config.vocab_size, seed=batch)
        timed_run(engine, prompts, 16)  # warm-up
        seconds: dict[str, list[float]] = {"plain": [], "fused": []}
        for label in ["plain", "fused"] * 3:
            engine.runner._norms = fused if label == "fused" else []
            seconds[label].append(timed_run(engine, prompts, new))
        plain, best = min(seconds["plain"]), min(seconds["fused"])
        rows.append(
            {
                "arch": arch,
                "batch": batch,
                "new": new,
                "norms a step": len(fused),
                "plain ms/step": 1000 * plain / new,
                "fused ms/step": 1000 * best / new,
                "speedup": plain / best,
            }
        )
        print(rows[-1], flush=True)
        del engine, loaded
        torch.cuda.empty_cache()
    print_table("bench_norms: fused RMSNorm against the HF forwards", rows, list(rows[0]))
    save_json("bench_norms.json", {"card": card(), "rows": rows})


if __name__ == "__main__":
    main()
