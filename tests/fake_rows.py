"""Generation rows without a model, for tests and benchmarks of the steps after generation
(judging, the dashboard, crash and fault harnesses)."""

from __future__ import annotations

from collections.abc import Callable

from db import Store


def seed_generation(
    store: Store,
    n: int,
    *,
    trait: str = "paternalism",
    side: str = "pos",
    answer: Callable[[int], str] = lambda i: f"answer {i}",
) -> int:
    """A generation job of ``n`` answers on the extract split, keyed (i % 20, i % 5, i // 20);
    returns the job id."""
    job = store.create_job("generate", trait, {"side": side, "split": "extract"}).id
    store.add_responses(
        {
            "job": job,
            "trait": trait,
            "side": side,
            "split": "extract",
            "question": i % 20,
            "instruction": i % 5,
            "sample": i // 20,
            "question_text": f"Question {i % 20}?",
            "system_prompt": "s",
            "prompt_ids": [1],
            "answer_ids": [2],
            "answer": answer(i),
            "finish_reason": "eos",
            "model": "m",
        }
        for i in range(n)
    )
    return job
