"""Where a decode step's GPU time goes: the engine's eager step under ``torch.profiler`` on
the 8B shape, per batch size, as a table of the kernels with the most GPU time a step, and
the graphed step's wall time a step beside the eager kernels' sum (the gap is launch and
idle time the graph does not remove).

    python tests/bench/profile_step.py [--batches 16,64,256] [--new 64] [--prompt 100,200]
        [--arch llama]   (a family's 7-12B shape, as ``bench_generate.py --arch``)
        [--compiled]     (the compiled step's kernels: ``--compile``)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_arch_model, card, random_prompts, timed  # noqa: E402

from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig  # noqa: E402


def kernels(engine: DecodeEngine, requests: list[DecodeRequest], new: int) -> dict:
    """Kernel name -> (GPU microseconds, launches) over one ``engine.run``."""
    sampling = SamplingConfig(max_new_tokens=new, temperature=1.0, ignore_eos=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.run(requests, sampling)
        torch.cuda.synchronize()
    return {
        e.key: (e.self_device_time_total, e.count)
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA
    }


def step_table(long: dict, short: dict, steps: int, top: int) -> tuple[float, list[str]]:
    """Per decode step: the long run's kernels less the short run's (the same prefill), so
    the prefill drops out. (GPU ms a step, the ``top`` kernels' lines)."""
    per_step = {}
    for key, (us, count) in long.items():
        base_us, base_count = short.get(key, (0.0, 0))
        per_step[key] = ((us - base_us) / steps / 1000, (count - base_count) / steps)
    total = sum(ms for ms, _ in per_step.values())
    lines = []
    for key, (ms, count) in sorted(per_step.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{ms:8.3f} ms {100 * ms / total:5.1f}% x{count:<6.1f} {key[:90]}")
    return total, lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--new", type=int, default=80, help="a multiple of 16, > 16")
    parser.add_argument("--prompt", default="100,200")
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--compiled", action="store_true", help="the compiled step")
    args = parser.parse_args()
    low, high = (int(x) for x in args.prompt.split(","))
    loaded = build_arch_model(args.arch)
    vocab = loaded.model.config.vocab_size
    step = "compiled" if args.compiled else "plain"
    print(
        f"card: {card()}; {args.arch} shape, bf16, {step} step; prompts {low}-{high}; "
        f"{args.new} new tokens"
    )
    eager = DecodeEngine(loaded, capture=True, cuda_graphs=False, compiled=args.compiled)
    graphed = DecodeEngine(loaded, capture=True, cuda_graphs=True, compiled=args.compiled)
    # The eager engine's attention as the graphed step's (eager, it would keep the rounded
    # SDPA step: ``DecodeEngine``).
    eager.runner.valid_keys_only = graphed.runner.reads_valid_keys_only(loaded.device)
    sampling = SamplingConfig(max_new_tokens=args.new, temperature=1.0, ignore_eos=True)
    short = SamplingConfig(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = random_prompts(batch, low, high, vocab, seed=batch)
        requests = [DecodeRequest(p, seed=i) for i, p in enumerate(prompts)]
        graphed.run(requests, sampling)  # warm
        seconds, _ = timed(lambda: graphed.run(requests, sampling))  # noqa: B023
        short_s, _ = timed(lambda: graphed.run(requests, short))  # noqa: B023
        eager.run(requests, short)
        # The loop checks for finished rows every 16 steps: both runs stop at a check.
        steps = args.new - 16
        gpu_ms, lines = step_table(
            kernels(eager, requests, args.new), kernels(eager, requests, 16), steps, args.top
        )
        print(
            f"\nbatch {batch}: graphed step {1000 * (seconds - short_s) / steps:.2f} ms wall; "
            f"eager step's kernels {gpu_ms:.2f} ms  [{card()}]"
        )
        print("\n".join(lines))


if __name__ == "__main__":
    main()
