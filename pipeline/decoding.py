"""One-off decoding with the engine (answers for monitor, steer, screen, the neutral
baseline and the local trait author) and the one shape of a stored response row.

The engine itself (batching, steering hooks, live projections) is ``pipeline.engine``; this
module only sets it up the same way every time: chat prompt ids in, answers out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.engine import DecodeResult, TokenCallback, Watch
    from pipeline.models import LoadedModel
    from vectors.steering import SteeringSpec


def decode(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    steering: Sequence[SteeringSpec] = (),
    watch: Sequence[Watch] = (),
    on_tokens: TokenCallback | None = None,
    check_every: int | None = None,
) -> list[DecodeResult]:
    """Each prompt's answer (prompt ids in, results in the same order), one seed a prompt;
    no activations captured. ``watch``/``on_tokens`` stream per-token projections live."""
    from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig

    engine = DecodeEngine(loaded, capture=False)
    requests = [DecodeRequest(p, seed) for p, seed in zip(prompts, seeds, strict=True)]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    extra: dict[str, Any] = {} if check_every is None else {"check_every": check_every}
    return engine.run(
        requests, sampling, steering=steering, watch=watch, on_tokens=on_tokens, **extra
    )


def decode_one(
    loaded: LoadedModel,
    prompt: Sequence[int],
    seed: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    steering: Sequence[SteeringSpec] = (),
    watch: Sequence[Watch] = (),
) -> DecodeResult:
    """One prompt's answer (``decode`` of a batch of one)."""
    return decode(
        loaded,
        [prompt],
        [seed],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        steering=steering,
        watch=watch,
    )[0]


def answer_text(loaded: LoadedModel, answer_ids: Sequence[int]) -> str:
    return loaded.tokenizer.decode(list(answer_ids), skip_special_tokens=True)


def response_row(
    *,
    job: int,
    trait: str,
    side: str,
    split: str,
    key: tuple[int, int, int],
    question_text: str,
    system_prompt: str,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    answer: str,
    finish_reason: str,
    model: str,
) -> dict[str, Any]:
    """A response as ``Store.add_responses`` takes it: keyed by (question, instruction,
    sample) within its job, so pos and neg pair up by key and a rerun resumes."""
    question, instruction, sample = key
    return {
        "job": job,
        "trait": trait,
        "side": side,
        "split": split,
        "question": question,
        "instruction": instruction,
        "sample": sample,
        "question_text": question_text,
        "system_prompt": system_prompt,
        "prompt_ids": list(prompt_ids),
        "answer_ids": list(answer_ids),
        "answer": answer,
        "finish_reason": finish_reason,
        "model": model,
    }
