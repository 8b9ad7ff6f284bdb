"""A sweep's generation on the GPU: every setting's steered answers in one queue (the
sweep job's path: one engine, each row steered by its own setting, ``DecodeRequest.steer``)
against a batch of ``--n`` rows a setting with an engine each (the path sweeps took before
session 18, as ``pipeline.decoding.decode`` runs a setting), on the same prompts, in the same
run, on a random-init Llama-3.1-8B-shaped model in bf16.

    python tests/bench/bench_sweep.py [--layers-steered 8,12,16,20,24] [--coefs=-2,-1,1,2]
                                      [--n 5,20] [--new 120] [--layers 32]

The grid is ``persona sweep``'s: the unsteered baseline plus every (layer, coef), ``--n``
eval questions each (prompts of 20-60 tokens, as a question in the chat template), answers of
``--new`` tokens (every row runs to the end: EOS ignored, so both paths decode the same tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_model, card, print_table, random_prompts, save_json, timed  # noqa: E402

from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig  # noqa: E402
from pipeline.local_generation import auto_slots  # noqa: E402
from vectors.steering import SteeringSpec  # noqa: E402


def grid(layers: list[int], coefs: list[float], vector: torch.Tensor) -> list[list[SteeringSpec]]:
    """Each setting's specs: the baseline's none, then one a (layer, coef)."""
    return [[]] + [[SteeringSpec(layer, vector, coef=coef)] for layer in layers for coef in coefs]


def per_setting(loaded, settings, prompts, sampling) -> int:
    """A setting at a time, an engine each (``decode``'s way): the answer tokens made."""
    made = 0
    for specs in settings:
        requests = [DecodeRequest(p, seed=i) for i, p in enumerate(prompts)]
        results = DecodeEngine(loaded, capture=False).run(requests, sampling, steering=specs)
        made += sum(len(r.answer_ids) for r in results)
    return made


def one_queue(loaded, settings, prompts, sampling) -> int:
    """Every setting's rows in one engine's queue, each steered by its own spec."""
    specs = [spec for setting in settings for spec in setting]
    requests = []
    for number, setting in enumerate(settings):
        steer = (number - 1,) if setting else ()
        requests += [DecodeRequest(p, seed=i, steer=steer) for i, p in enumerate(prompts)]
    length = max(len(p) for p in prompts) + sampling.max_new_tokens
    slots = min(len(requests), auto_slots(loaded, length, capture=False))
    engine = DecodeEngine(loaded, capture=False)
    results = engine.run(requests, sampling, slots=slots, steering=specs)
    return sum(len(r.answer_ids) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers-steered", default="8,12,16,20,24")
    parser.add_argument("--coefs", default="-2,-1,1,2")
    parser.add_argument("--n", default="5,20", help="eval questions a setting, comma-separated")
    parser.add_argument("--new", type=int, default=120)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    loaded = build_model(args.layers)
    config = loaded.model.config
    torch.manual_seed(0)
    vector = torch.randn(config.num_hidden_layers + 1, config.hidden_size)
    layers = [int(x) for x in args.layers_steered.split(",")]
    settings = grid(layers, [float(x) for x in args.coefs.split(",")], vector)
    sampling = SamplingConfig(max_new_tokens=args.new, ignore_eos=True)
    warm = random_prompts(2, 20, 60, config.vocab_size, seed=9)
    per_setting(loaded, settings[:2], warm, SamplingConfig(max_new_tokens=8, ignore_eos=True))
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        prompts = random_prompts(n, 20, 60, config.vocab_size, seed=n)
        t_old, made_old = timed(lambda p=prompts: per_setting(loaded, settings, p, sampling))
        t_new, made_new = timed(lambda p=prompts: one_queue(loaded, settings, p, sampling))
        assert made_old == made_new == len(settings) * n * args.new
        rows.append(
            {
                "settings": len(settings),
                "n": n,
                "answers": len(settings) * n,
                "a setting at a time s": t_old,
                "one queue s": t_new,
                "speedup": t_old / t_new,
                "one queue tok/s": made_new / t_new,
            }
        )
        print(rows[-1], flush=True)
    title = f"bench_sweep: {args.new} new tokens an answer, 8B shape, bf16"
    print_table(title, rows, list(rows[0]))
    save_json("bench_sweep.json", {"card": card(), "rows": rows})


if __name__ == "__main__":
    main()
