"""Running a generation job by id (the runner ``pipeline.jobs`` calls for kind ``generate``):
the rows still missing, by the local model (``pipeline.local_generation``) or an
OpenAI-compatible server (``pipeline.generate``), then the captured activations
consolidated into one file. It sits above both backends: the local one reads the step's
params and row shape from ``pipeline.generate``, so the dispatch cannot live there."""

from __future__ import annotations

import asyncio

import torch

from db import PersonaError, Store
from pipeline.generate import (
    GenerateParams,
    RowKey,
    generate_openai,
    plan_rows,
    trait_with_assistant_name,
)
from pipeline.jobs import JobProgress, ProgressCallback
from pipeline.local_generation import generate_local
from pipeline.response_means import TOKENS_PER_BATCH, ForwardMeans, activations_dir
from vectors import activations


def run_generation_job(
    store: Store, job_id: int, *, on_progress: ProgressCallback | None = None
) -> None:
    job = store.get_job(job_id)
    params = GenerateParams.from_dict(job.params).validate()
    trait = trait_with_assistant_name(store.get_trait(job.trait), params)
    keys = plan_rows(params.split, params.n_per_question, params.all_instructions)
    stored = store.response_keys(job_id)
    pending = [k for k in keys if k not in stored]
    progress = JobProgress(
        store,
        job_id,
        total=len(keys),
        done=len(keys) - len(pending),
        unit="responses",
        on_progress=on_progress,
    )
    progress.start()
    if pending:
        if params.backend == "local":
            generate_local(store, job_id, params, trait, pending, progress)
        else:
            asyncio.run(generate_openai(store, job_id, params, trait, pending, progress))
    message = ""
    if params.backend == "local" and params.capture:
        progress.check_cancelled()  # still ours: consolidating drops the shards
        path, torn, rebuilt = _consolidate(store, job_id, params)
        progress.extra["activations"] = str(path)
        if torn or rebuilt:
            message = (
                f"rebuilt the activations of {rebuilt} responses from their stored tokens "
                f"({len(torn)} unreadable activation files set aside as .torn)"
            )
    progress.finish("done", message)


def _consolidate(store: Store, job_id: int, params: GenerateParams):
    """One activation file for the job; entries lost to a torn file are rebuilt by a forward
    pass over the stored prompt and answer ids (the same means, up to float rounding)."""
    responses = {r.key: r for r in store.responses(job=job_id)}

    def rebuild(keys: list[RowKey]) -> dict[RowKey, dict[str, torch.Tensor]]:
        from pipeline.models import load_model

        loaded = load_model(params.model, device=params.device)
        made_by = {responses[k].model for k in keys}
        if made_by != {loaded.model_id}:
            raise PersonaError(
                f"cannot rebuild the activations of job {job_id}: its answers were generated "
                f"by {sorted(made_by)}, but --model now loads {loaded.model_id}"
            )
        forward = ForwardMeans(loaded)
        rows = [(responses[k].prompt_ids, responses[k].answer_ids) for k in keys]
        out: dict[RowKey, dict[str, torch.Tensor]] = {}
        for chunk, means in forward.iter_means(rows, TOKENS_PER_BATCH):
            for position, index in enumerate(chunk):
                entry = {kind: means[kind][position].cpu() for kind in activations.KINDS}
                entry["response_tokens"] = torch.tensor(len(rows[index][1]))
                out[keys[index]] = entry
        return out

    try:
        return activations.consolidate(
            activations_dir(store, job_id), {k: r.id for k, r in responses.items()}, rebuild
        )
    except activations.ActivationFileError as exc:
        raise PersonaError(str(exc)) from None
