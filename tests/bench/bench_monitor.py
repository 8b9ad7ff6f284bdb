"""Live monitoring overhead on the GPU: the same generation with and without per-token
projections on a persona vector (the engine's ``watch``), in the same run, on a random-init
Llama-3.1-8B-shaped model in bf16. Target: <= 5% overhead.

    python tests/bench/bench_monitor.py [--batch 64] [--new 256] [--layers 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: eager_twin

from common import build_model, card, print_table, random_prompts, save_json, timed  # noqa: E402
from eager_twin import eager_twin  # noqa: E402

from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig, Watch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = build_model(args.layers)
    config = loaded.model.config
    engine = DecodeEngine(loaded, capture=False)
    prompts = random_prompts(args.batch, 100, 200, config.vocab_size, seed=0)
    requests = [DecodeRequest(p, seed=i) for i, p in enumerate(prompts)]
    sampling = SamplingConfig(max_new_tokens=args.new, ignore_eos=True)
    torch.manual_seed(0)
    layer = (2 * config.num_hidden_layers) // 3
    watch = [Watch("trait", layer, torch.randn(config.hidden_size))]
    streamed = []

    def plain():
        return engine.run(requests, sampling)

    def monitored():
        return engine.run(
            requests, sampling, watch=watch, on_tokens=lambda s, t, p: streamed.append(s)
        )

    plain()  # warm-up
    monitored()
    # The graphed step streams the same projections as the eager step.
    small = requests[:4]
    short = SamplingConfig(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    eager = eager_twin(loaded, capture=False)
    graphed = engine.run(small, short, watch=watch)
    reference = eager.run(small, short, watch=watch)
    same = all(
        g.answer_ids == e.answer_ids and torch.allclose(g.projections, e.projections, atol=0.05)
        for g, e in zip(graphed, reference, strict=True)
    )
    print(f"graphed watch matches eager watch: {same}")
    rows = []
    for _ in range(args.repeats):
        t_plain, _ = timed(plain)
        t_mon, results = timed(monitored)
        assert results[0].projections.shape == (args.new, 1)
        rows.append(
            {
                "batch": args.batch,
                "plain tok/s": args.batch * args.new / t_plain,
                "monitored tok/s": args.batch * args.new / t_mon,
                "overhead %": 100 * (t_mon / t_plain - 1),
            }
        )
    print_table(f"bench_monitor: watch 1 vector at layer {layer}", rows, list(rows[0]))
    save_json("bench_monitor.json", {"card": card(), "rows": rows})


if __name__ == "__main__":
    main()
