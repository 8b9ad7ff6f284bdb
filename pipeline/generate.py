"""Step 2 of the method: answers to the trait's questions under each pos or neg instruction.

One response row per (question, instruction, sample), with the exact prompt and answer token
ids. Resumable: a per-row seed derived from (job seed, question, instruction, sample) makes a
row the same whenever and in whatever batch it is generated, and rows already stored are
skipped, so a killed job rerun with the same command finishes with the rows it would have had.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db import PersonaError, Store, TraitDefinition
from db.traits import N_PAIRS, N_QUESTIONS_PER_SPLIT, SPLITS
from pipeline.jobs import JobParams, JobProgress
from pipeline.sampling import row_seed
from pipeline.sharding import parse_gpus

RowKey = tuple[int, int, int]  # (question, instruction, sample)
# Refused before anything is allocated: a job's rows (its plan is held in memory) and the
# answer length (the cache is sized for it); the model's own context is checked on load.
MAX_ROWS_PER_JOB = 100_000
MAX_NEW_TOKENS = 32_768
BACKENDS = ("local", "openai")


@dataclass(frozen=True)
class GenerateParams(JobParams):
    NOT_IDENTITY = frozenset(
        {"batch_size", "device", "gpus", "max_concurrent", "compile", "deterministic"}
    )

    side: str
    split: str = "extract"
    model: str = "smollm2"
    n_per_question: int = 10
    all_instructions: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1000
    seed: int = 0
    batch_size: int | None = None
    assistant_name: str | None = None
    capture: bool = True
    backend: str = "local"
    base_url: str | None = None
    tokenizer: str | None = None
    max_concurrent: int = 16
    device: str | None = None
    ignore_eos: bool = False
    gpus: str | None = None  # pipeline.sharding.parse_gpus
    # The local engine's decode step with its layers torch.compile'd (pipeline.engine).
    compile: bool = False
    # Its attention on a GPU on a kernel whose results repeat run to run (pipeline.engine).
    deterministic: bool = False

    def validate(self) -> GenerateParams:
        checks = [
            (self.side in ("pos", "neg"), f"--side must be pos or neg, not '{self.side}'"),
            (self.split in SPLITS, f"--split must be extract or eval, not '{self.split}'"),
            (
                self.n_per_question >= 1,
                f"--n-per-question must be at least 1 (got {self.n_per_question})",
            ),
            (self.temperature >= 0, f"--temperature must be >= 0 (got {self.temperature})"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p})"),
            (
                self.max_new_tokens >= 1,
                f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})",
            ),
            (
                self.max_new_tokens <= MAX_NEW_TOKENS,
                f"--max-new-tokens {self.max_new_tokens} is more than {MAX_NEW_TOKENS:,} "
                "tokens an answer; give a smaller number",
            ),
            (
                self.planned_rows() <= MAX_ROWS_PER_JOB,
                f"--n-per-question {self.n_per_question} plans {self.planned_rows():,} answers, "
                f"more than {MAX_ROWS_PER_JOB:,} a job; give a smaller number",
            ),
            (
                self.batch_size is None or self.batch_size >= 1,
                f"--batch-size must be at least 1 (got {self.batch_size})",
            ),
            (
                self.max_concurrent >= 1,
                f"--max-concurrent must be at least 1 (got {self.max_concurrent})",
            ),
            (self.backend in BACKENDS, f"--backend must be local or openai, not '{self.backend}'"),
            (
                self.assistant_name is None or bool(re.search(r"[^\W\d_]", self.assistant_name)),
                f"--assistant-name {self.assistant_name!r} has no letter; give the adjective of "
                "'You are a/an ... assistant', e.g. paternalistic",
            ),
            (
                self.tokenizer is None or bool(self.tokenizer.strip()),
                "--tokenizer is empty; pass a local model folder, smollm2, or leave it out",
            ),
            (
                self.backend != "openai" or bool(self.base_url),
                "--backend openai needs --base-url (e.g. http://localhost:8000/v1)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PersonaError(message)
        parse_gpus(self.gpus)
        return self

    def planned_rows(self) -> int:
        per_question = self.n_per_question * (N_PAIRS if self.all_instructions else 1)
        return N_QUESTIONS_PER_SPLIT * per_question


def _context_length(folder: Path) -> int | None:
    """The model's context (``max_position_embeddings``) from its config.json, unloaded."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    context = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    return int(context) if isinstance(context, int) else None


def plan_rows(split: str, n_per_question: int, all_instructions: bool) -> list[RowKey]:
    """The rows a job must produce. By default each question gets n samples with the 5
    instructions rotated across them (starting at a question-dependent offset, so n=1 still
    uses every instruction); ``all_instructions`` gives n samples for every pair."""
    offset = 0 if split == "extract" else N_QUESTIONS_PER_SPLIT
    keys: list[RowKey] = []
    for local in range(N_QUESTIONS_PER_SPLIT):
        question = offset + local
        if all_instructions:
            keys.extend(
                (question, instruction, sample)
                for instruction in range(N_PAIRS)
                for sample in range(n_per_question)
            )
        else:
            keys.extend(
                (question, (question + sample) % N_PAIRS, sample)
                for sample in range(n_per_question)
            )
    return keys


def find_or_create_job(store: Store, trait: str, params: GenerateParams) -> int:
    """The unfinished-or-finished job with the same identity, else a new one; rerunning a
    command therefore resumes its job instead of starting over."""
    params.validate()
    store.get_trait(trait)  # unknown trait: one-line error before anything is written
    if params.backend == "local":
        from pipeline.models import resolve_model

        resolved = resolve_model(params.model)  # a bad --model fails here, before a job row
        context = _context_length(resolved.path)
        if context and params.max_new_tokens >= context:
            raise PersonaError(
                f"--max-new-tokens {params.max_new_tokens} is past {params.model}'s context of "
                f"{context} tokens (prompt included); give a smaller number"
            )
    if params.tokenizer:
        from pipeline.models import resolve_model

        resolve_model(params.tokenizer)  # as a bad --tokenizer: before a job row
    for job in store.list_jobs(trait=trait, kind="generate"):
        if GenerateParams.from_dict(job.params).identity() == params.identity():
            if job.params != params.to_dict():
                store.update_job(job.id, params=params.to_dict())
            return job.id
    return store.create_job("generate", trait, params.to_dict()).id


def trait_with_assistant_name(trait: TraitDefinition, params: GenerateParams) -> TraitDefinition:
    if params.assistant_name:
        return dataclasses.replace(trait, assistant_name=params.assistant_name)
    return trait


def _row(
    job_id: int,
    trait: TraitDefinition,
    params: GenerateParams,
    key: RowKey,
    system: str,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    answer: str,
    finish: str,
    model: str,
) -> dict[str, Any]:
    from pipeline.decoding import response_row

    return response_row(
        job=job_id,
        trait=trait.name,
        side=params.side,
        split=params.split,
        key=key,
        question_text=trait.questions[key[0]],
        system_prompt=system,
        prompt_ids=prompt_ids,
        answer_ids=answer_ids,
        answer=answer,
        finish_reason=finish,
        model=model,
    )


@dataclass
class JobShare:
    """One generation job's rows still missing, with what a backend needs to make them (a
    run may put several jobs' shares through one engine)."""

    job_id: int
    params: GenerateParams
    trait: TraitDefinition
    pending: list[RowKey]
    progress: JobProgress


async def generate_openai(store: Store, share: JobShare) -> None:
    """Answers from an OpenAI-compatible server (vLLM, llama.cpp, ...). No activations: the
    extraction step runs its own forward pass. Token ids are stored when a local tokenizer is
    available (``--tokenizer``, or ``--model`` when it resolves locally)."""
    from openai import APIConnectionError, APIStatusError, AsyncOpenAI

    from pipeline.api_clients import api_key

    job_id, params, trait = share.job_id, share.params, share.trait
    pending, progress = share.pending, share.progress
    tokenizer = _local_tokenizer(params.tokenizer or params.model, required=bool(params.tokenizer))
    client = AsyncOpenAI(
        base_url=params.base_url,
        api_key=api_key("OPENAI_API_KEY", params.base_url),
        max_retries=5,
    )
    systems = {i: trait.system_prompt(params.side, i) for i in range(N_PAIRS)}
    limit = asyncio.Semaphore(params.max_concurrent)
    finished: list[dict[str, Any]] = []

    async def one(key: RowKey) -> None:
        question, instruction, _sample = key
        messages = [
            {"role": "system", "content": systems[instruction]},
            {"role": "user", "content": trait.questions[question]},
        ]
        async with limit:
            reply = await client.chat.completions.create(
                model=params.model,
                messages=messages,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=row_seed(params.seed, *key),
            )
        choice = reply.choices[0]
        answer = choice.message.content or ""
        prompt = answer_ids = []
        if tokenizer is not None:
            from pipeline.chat import prompt_ids

            prompt = prompt_ids(tokenizer, systems[instruction], trait.questions[question])
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        finish = "length" if choice.finish_reason == "length" else "eos"
        finished.append(
            _row(
                job_id,
                trait,
                params,
                key,
                systems[instruction],
                prompt,
                answer_ids,
                answer,
                finish,
                params.model,
            )
        )
        if len(finished) >= 32:
            flush()

    def flush() -> None:
        rows = list(finished)
        finished.clear()
        if rows:
            store.add_responses(rows)
            progress.add(len(rows))

    try:
        for start in range(0, len(pending), 256):
            progress.check_cancelled()
            await asyncio.gather(*(one(k) for k in pending[start : start + 256]))
            flush()
    except APIStatusError as exc:
        flush()
        raise PersonaError(
            f"the generation server answered {exc.status_code}: {_first_line(exc.message)}"
        ) from None
    except APIConnectionError as exc:  # after the SDK's own retries
        flush()
        raise PersonaError(
            f"the generation server at {params.base_url} cannot be reached "
            f"({type(exc).__name__}); start it or pass the right --base-url (the job resumes "
            "where it stopped)"
        ) from None
    finally:
        flush()
        await client.close()


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:200] if (text or "").strip() else "no message"


def _local_tokenizer(spec: str, *, required: bool) -> Any:
    from pipeline.models import load_tokenizer

    try:
        return load_tokenizer(spec)[0]
    except PersonaError:
        if required:
            raise
        return None
