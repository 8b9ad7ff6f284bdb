"""Running a generation job by id (the runner ``pipeline.jobs`` calls for kind ``generate``):
the rows still missing, by the local model (``pipeline.local_generation``) or an
OpenAI-compatible server (``pipeline.generate``), then the captured activations
consolidated into one file. It sits above both backends: the local one reads the step's
params and row shape from ``pipeline.generate``, so the dispatch cannot live there."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from db import PersonaError, Store
from pipeline.generate import (
    GenerateParams,
    JobShare,
    RowKey,
    generate_openai,
    plan_rows,
    trait_with_assistant_name,
)
from pipeline.jobs import (
    Heartbeat,
    JobCancelled,
    JobProgress,
    JobTakenOver,
    ProgressCallback,
    claim_job,
    end_job,
    failure_message,
)
from pipeline.local_generation import generate_local, generate_local_jobs
from pipeline.response_means import TOKENS_PER_BATCH, ForwardMeans, activations_dir
from vectors import activations


def run_generation_job(
    store: Store, job_id: int, *, on_progress: ProgressCallback | None = None
) -> None:
    share = _start(store, job_id, on_progress)
    if share.pending:
        if share.params.backend == "local":
            generate_local(store, share)
        else:
            asyncio.run(generate_openai(store, share))
    _finish(store, share)


def _start(store: Store, job_id: int, on_progress: ProgressCallback | None) -> JobShare:
    """The job's rows still missing, and its progress started."""
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
    return JobShare(job_id, params, trait, pending, progress)


def _finish(store: Store, share: JobShare) -> None:
    """The captured activations consolidated into one file; the job done."""
    params, progress = share.params, share.progress
    message = ""
    if params.backend == "local" and params.capture:
        progress.check_cancelled()  # still ours: consolidating drops the shards
        path, torn, rebuilt = _consolidate(store, share.job_id, params)
        progress.extra["activations"] = str(path)
        if torn or rebuilt:
            message = (
                f"rebuilt the activations of {rebuilt} responses from their stored tokens "
                f"({len(torn)} unreadable activation files set aside as .torn)"
            )
    progress.finish("done", message)


# What must match for jobs to share one engine (the engine's sampling and batch, the model
# and where it runs); side, split, counts, seed and assistant name may differ.
_SHARED_PARAMS = (
    "model",
    "backend",
    "max_new_tokens",
    "temperature",
    "top_p",
    "ignore_eos",
    "capture",
    "batch_size",
    "device",
    "gpus",
    "compile",
    "deterministic",
)


def can_share_engine(params: Sequence[dict]) -> bool:
    """Whether generation jobs with these params can run as one queue
    (``run_generation_jobs_together``): local, and alike in ``_SHARED_PARAMS``."""
    checked = [GenerateParams.from_dict(p) for p in params]
    first = checked[0]
    return all(p.backend == "local" for p in checked) and all(
        getattr(p, name) == getattr(first, name) for p in checked for name in _SHARED_PARAMS
    )


def run_generation_jobs_together(
    db_path: str | Path,
    job_ids: Sequence[int],
    on_progress: Callable[[int], ProgressCallback | None] = lambda _job: None,
    devices: Sequence[str] = (),
    *,
    named: bool = False,
) -> None:
    """Local generation jobs that ``can_share_engine``, in this process, through one engine
    (or one a device of ``devices``, in threads): one queue of all their missing rows, each
    job's rows written to it as they finish (``named``: the devices came from ``--gpus``). Each
    job is claimed, heart-beaten and ended as ``run_job`` does; an error ends every job not
    yet done (a rerun resumes each), and a job cancelled mid-run stops its batch-mates."""
    with Store(db_path) as store, ExitStack() as beats:
        claimed: list[int] = []
        ended: set[int] = set()
        try:
            for job_id in job_ids:
                try:
                    claim_job(store, job_id)
                except JobCancelled:
                    continue
                beats.enter_context(Heartbeat(db_path, job_id))
                claimed.append(job_id)
            shares = [_start(store, job_id, on_progress(job_id)) for job_id in claimed]
            waiting = [share for share in shares if share.pending]
            if waiting:
                generate_local_jobs(store, waiting, devices, named=named)
            for share in shares:
                _finish(store, share)
                ended.add(share.job_id)
        except JobTakenOver as exc:
            # That job is another worker's now (end_job leaves a row that is not ours alone);
            # its queue-mates stop here and say why, resumable.
            for job_id in claimed:
                if job_id not in ended:
                    stopped = f"stopped: {exc}, and this job shared its queue; rerun to resume"
                    end_job(store, job_id, "failed", stopped)
            return
        except JobCancelled as exc:
            for job_id in claimed:
                if job_id == exc.job_id:
                    end_job(store, job_id, "cancelled", "cancelled")
                elif job_id not in ended:
                    stopped = f"stopped: job {exc.job_id}, which shared its queue, was cancelled"
                    end_job(store, job_id, "failed", f"{stopped}; rerun to resume")
        except BaseException as exc:
            for job_id in claimed:
                if job_id not in ended:
                    end_job(store, job_id, "failed", failure_message(exc))
            raise


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
