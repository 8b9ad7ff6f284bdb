"""Where activation capture's time goes in a generation run (a diagnostic, not a target):
prefill, decode steps and result collection, each timed with a device sync around it, for
capture on and off, plain and compiled, on the 8B shape.

    python tests/bench/profile_capture.py [--batches 16,256] [--new 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model, card, random_prompts  # noqa: E402

from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig  # noqa: E402


def timed_phases(engine: DecodeEngine, totals: dict[str, float]) -> None:
    """Wrap the engine's prefill, step and collection so each adds its synced time."""

    def wrap(name: str, function):
        def timed(*args, **kwargs):
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = function(*args, **kwargs)
            torch.cuda.synchronize()
            totals[name] += time.perf_counter() - started
            return out

        return timed

    engine._prefill = wrap("prefill", engine._prefill)
    engine._collect = wrap("collect", engine._collect)
    make_step = engine._make_step
    engine._make_step = lambda *a: wrap("steps", make_step(*a))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="16,256")
    parser.add_argument("--new", type=int, default=256)
    args = parser.parse_args()
    loaded = build_model(32)
    vocab = loaded.model.config.vocab_size
    print(f"card: {card()}; new {args.new}")
    sampling = SamplingConfig(max_new_tokens=args.new, temperature=1.0, ignore_eos=True)
    for compiled in (False, True):
        for capture in (True, False):
            engine = DecodeEngine(loaded, capture=capture, compiled=compiled)
            for batch in [int(b) for b in args.batches.split(",")]:
                prompts = random_prompts(batch, 100, 200, vocab, seed=batch)
                requests = [DecodeRequest(p, seed=i) for i, p in enumerate(prompts)]
                engine.run(requests, sampling)  # warm: compile, allocator
                totals: dict[str, float] = defaultdict(float)
                timed_phases(engine, totals)
                started = time.perf_counter()
                engine.run(requests, sampling)
                torch.cuda.synchronize()
                wall = time.perf_counter() - started
                for name in ("_prefill", "_collect", "_make_step"):
                    engine.__dict__.pop(name)
                parts = "  ".join(f"{k} {1000 * v:8.1f} ms" for k, v in sorted(totals.items()))
                print(
                    f"compiled={compiled!s:5} capture={capture!s:5} batch={batch:4}  "
                    f"wall {1000 * wall:8.1f} ms  {parts}",
                    flush=True,
                )
    # Moving one batch-256 collection's activations to the host: pageable against pinned.
    acts = torch.randn(256, 3, 33, 4096, device="cuda")
    for pinned in (False, True):
        host = torch.empty(acts.shape, pin_memory=pinned)
        torch.cuda.synchronize()
        started = time.perf_counter()
        host.copy_(acts)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        print(f"D2H 415 MB pinned={pinned}: {1000 * seconds:.1f} ms")
    started = time.perf_counter()
    acts.cpu()
    print(f"D2H 415 MB .cpu(): {1000 * (time.perf_counter() - started):.1f} ms")


if __name__ == "__main__":
    main()
