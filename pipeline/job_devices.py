"""Several generation jobs of one model at once (``--gpus``). Jobs that can share an engine
(the seed's plan: pos and neg, extract and eval) run as one queue in this process, through
one engine on one device or one a device in threads
(``generation_job.run_generation_jobs_together``, ``pipeline.engine_threads``).

Jobs that cannot (different sampling) go whole to one worker process a device: each worker
runs its share in one process (its model loaded once), as one queue where they can share an
engine, else in order, each job pinned to the worker's device through its ``gpus``
parameter (not part of a job's identity). Jobs write their own rows, as detached workers
do; the parent follows their progress from the database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from db import Job, PersonaError, Store
from pipeline.jobs import ProgressCallback, ProgressUpdate, run_job
from pipeline.sharding import run_sharded

# Seconds between the parent's reads of the job rows, for progress callbacks.
POLL_SECONDS = 0.5


def device_gpus(device: str) -> str:
    """The one-device ``--gpus`` value that pins a job to ``device`` (cuda:1 -> 1)."""
    return "cpu" if device == "cpu" else device.partition(":")[2] or "0"


def run_jobs_on_devices(
    db_path: str | Path,
    job_ids: Sequence[int],
    devices: Sequence[str],
    on_progress: Callable[[int], ProgressCallback | None] = lambda _job: None,
) -> None:
    """Run the jobs, dealt round-robin over the devices (the job list's order is the plan's:
    pos and neg of a split side by side). ``on_progress(job id)`` gives the job's progress
    callback, fed from its row. A job's error is raised once every job has ended."""
    with Store(db_path) as store:
        for index, job_id in enumerate(job_ids):
            job = store.get_job(job_id)
            pinned = {**job.params, "gpus": device_gpus(devices[index % len(devices)])}
            store.update_job(job_id, params=pinned)
    callbacks = {job_id: on_progress(job_id) for job_id in job_ids}
    errors: list[str] = []

    with Store(db_path) as store:  # read for progress while the workers write

        def report() -> None:
            for job_id, callback in callbacks.items():
                if callback is not None:
                    job = store.get_job(job_id)
                    callback(ProgressUpdate(job_id, job.done, job.total, job.stats, job.message))

        for _index, error in run_sharded(
            devices, run_job_share, str(db_path), list(job_ids), on_idle=report
        ):
            if error:
                errors.append(error)
        report()
    if errors:
        raise PersonaError(errors[0])


def run_job_share(device: str, db_path: str, share: Sequence, emit) -> None:
    """A worker's part: its jobs as one queue where they can share an engine, else in
    order; each job's error is reported, not raised, so the jobs after it still run."""
    job_ids = [job_id for _index, job_id in share]
    if len(job_ids) > 1 and _share_engine(_jobs(db_path, job_ids)):
        from pipeline.generation_job import run_generation_jobs_together

        try:
            run_generation_jobs_together(db_path, job_ids)
        except PersonaError as exc:
            for index, job_id in share:
                emit(index, f"job {job_id}: {exc}")
        else:
            for index, _job_id in share:
                emit(index, "")
        return
    for index, job_id in share:
        try:
            run_job(db_path, job_id)
        except PersonaError as exc:
            emit(index, f"job {job_id}: {exc}")
        else:
            emit(index, "")


def run_generation_jobs(
    db_path: str | Path,
    job_ids: Sequence[int],
    *,
    gpus: str | None = None,
    device: str | None = None,
    on_progress: Callable[[int], ProgressCallback | None] = lambda _job: None,
) -> None:
    """Generation jobs of one model: as one queue where they can share an engine
    (``run_generation_jobs_together``), through one engine, or through one a device in
    threads when there are several devices; else on several devices side by side, whole
    jobs to worker processes (``run_jobs_on_devices``), or on one, one after another."""
    from pipeline.models import fits_one_gpu
    from pipeline.sharding import names_devices, parse_gpus, worker_devices

    devices: list[str] = []
    jobs = _jobs(db_path, job_ids) if len(job_ids) > 1 else []
    if jobs:
        params = [job.params for job in jobs]
        models = {p.get("model") for p in params}
        local = all(p.get("backend") == "local" for p in params)
        if len(models) == 1 and local:
            model = next(iter(models))
            devices = worker_devices(parse_gpus(gpus), device, lambda: fits_one_gpu(model))
    if jobs and _share_engine(jobs):
        from pipeline.generation_job import run_generation_jobs_together

        named = names_devices(parse_gpus(gpus))
        run_generation_jobs_together(db_path, job_ids, on_progress, devices, named=named)
        return
    if len(devices) > 1:
        run_jobs_on_devices(db_path, job_ids, devices, on_progress)
        return
    for job_id in job_ids:
        run_job(db_path, job_id, on_progress=on_progress(job_id))


def _jobs(db_path: str | Path, job_ids: Sequence[int]) -> list[Job]:
    with Store(db_path) as store:
        return [store.get_job(job_id) for job_id in job_ids]


def _share_engine(jobs: Sequence[Job]) -> bool:
    from pipeline.generation_job import can_share_engine

    return all(job.kind == "generate" for job in jobs) and can_share_engine(
        [job.params for job in jobs]
    )
