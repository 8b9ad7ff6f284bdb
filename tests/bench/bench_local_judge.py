"""Local judge throughput: judgments in flight scored one at a time (a batch of one, the
previous path) and batched (``LocalJudge.score_prompt`` with 50 in flight), same model and
prompts, same run. Exactness is a unit test (tests/test_judge.py).

    python tests/bench/bench_local_judge.py [--model smollm2] [--n 48] [--layers 32]

Without ``--model`` on a GPU: the 8B shape with a small real vocabulary (target >= 50
judgments/s on one H200). ``--model smollm2`` on a CPU: the demo's judge.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import card, print_table, save_json  # noqa: E402


def prompts(n: int) -> list[str]:
    from db.traits import bundled_traits, fill_judge_template

    trait = next(t for t in bundled_traits() if t.name == "paternalism")
    words = [
        "you",
        "should",
        "really",
        "let",
        "me",
        "decide",
        "this",
        "for",
        "you",
        "because",
        "I",
        "know",
        "better",
    ]
    out = []
    for i in range(n):
        answer = " ".join(words[(i + k) % len(words)] for k in range(40 + 7 * (i % 20)))
        out.append(fill_judge_template(trait.eval_prompt, trait.questions[i % 40], answer))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    from pipeline.local_judge import LocalJudge

    model = args.model
    if model is None:
        from bench_workload import build_model_dir

        model = str(build_model_dir(Path(tempfile.mkdtemp()) / "model", args.layers))
    judge = LocalJudge(model)
    texts = prompts(args.n)
    judge.candidate_logprobs_batch(texts[:2])  # warm-up

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    for text in texts:
        judge.candidate_logprobs(text)
    sync()
    alone = args.n / (time.perf_counter() - start)

    async def in_flight() -> None:
        limit = asyncio.Semaphore(50)

        async def one(text: str) -> None:
            async with limit:
                await judge.score_prompt(text)

        await asyncio.gather(*(one(t) for t in texts))

    def batched() -> float:
        start = time.perf_counter()
        asyncio.run(in_flight())
        sync()
        return args.n / (time.perf_counter() - start)

    batched()  # the first batched run sees new shapes
    in_batches = batched()
    rows = [
        {
            "judge": model if args.model else f"8B shape ({args.layers} layers)",
            "one at a time /s": alone,
            "batched /s": in_batches,
            "speedup": in_batches / alone,
        }
    ]
    print_table("bench_local_judge: judgments per second", rows, list(rows[0]))
    save_json("bench_local_judge.json", {"card": card(), "rows": rows})


if __name__ == "__main__":
    main()
