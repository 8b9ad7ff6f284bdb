"""Detached job processes: ``python -m pipeline.worker_main DB JOB_ID`` started in a new
session, so a job outlives the dashboard and a dropped SSH connection. Its output goes to a
log file beside the database; the job row carries its pid and heartbeat, from which a dead
worker is told apart from a running one."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from db import PersonaError, Store
from pipeline.jobs import lock_holder
from pipeline.worker_main import worker_command


def log_path(store: Store, job_id: int) -> Path:
    return store.data_dir / "logs" / f"job-{job_id}.log"


def start_worker(store: Store, job_ids: int | Sequence[int], *, rerun_done: bool = True) -> int:
    """Start (or resume) jobs in one detached process; returns its pid. Several ids are
    generation jobs run as one queue (``pipeline.worker_main``); the process writes to the
    first job's log, and each other job's log says where its lines are. ``rerun_done=False``
    (the dashboard's resume key) refuses a job that has finished."""
    ids = [job_ids] if isinstance(job_ids, int) else list(job_ids)
    for job_id in ids:  # every job checked before any is touched
        job = store.get_job(job_id)
        holder = lock_holder(job)
        if holder:
            raise PersonaError(f"job {job_id} is already running ({holder})")
        if job.status == "done" and not rerun_done:
            raise PersonaError(f"job {job_id} is done; there is nothing to resume")
    path = log_path(store, ids[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    for job_id in ids[1:]:
        with log_path(store, job_id).open("a") as other:
            other.write(
                f"job {job_id} runs in one process with job {ids[0]}: its lines are in "
                f"{path.name}\n"
            )
    for job_id in ids:
        store.update_job(job_id, status="pending", message="starting", started=None, ended=None)
    # The database's absolute path: the worker runs in another directory.
    command = worker_command(store.path.resolve(), ids)  # an argument list, never a shell
    with path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the terminal (and the SSH session) closing
            cwd=str(Path(__file__).resolve().parents[1]),
        )
    for job_id in ids:
        store.update_job(job_id, pid=process.pid)
    return process.pid


def start_jobs(store: Store, job_ids: Sequence[int]) -> list[int]:
    """Start jobs made together (a dashboard form): generation jobs in one process, as the
    command line's ``generate --side both`` runs them (one model load, one queue on the
    GPUs they name, where two processes would each load the model on the same GPUs), every
    other job in a process of its own. Returns the pids."""
    generation = [job_id for job_id in job_ids if store.get_job(job_id).kind == "generate"]
    others = [job_id for job_id in job_ids if job_id not in generation]
    groups: list[int | list[int]] = [generation] if len(generation) > 1 else generation
    return [start_worker(store, group) for group in [*groups, *others]]


def cancel(store: Store, job_id: int) -> list[int]:
    """Ask a job to stop; the worker stops after its current batch. Returns the jobs that
    share its worker (a generation's two sides run as one queue): they stop with it, failed
    and resumable."""
    job = store.get_job(job_id)
    if job.status in ("done", "failed", "cancelled"):
        raise PersonaError(f"job {job_id} is already {job.status}; nothing to cancel")
    mates = [
        other.id
        for other in store.list_jobs()
        if other.id != job_id
        and job.pid is not None
        and other.pid == job.pid
        and other.status in ("pending", "running")
    ]
    store.update_job(job_id, status="cancelled", message="cancel requested")
    return mates


def cancel_notice(job_id: int, mates: Sequence[int]) -> str:
    """What a cancel says (the dashboard and ``persona jobs cancel`` alike)."""
    notice = f"job {job_id}: cancel requested; it stops after its current batch"
    if mates:
        listed = ", ".join(map(str, mates))
        notice += f"; job {listed}, in the same worker, stops with it (resume it to finish)"
    return notice


def reap_dead_jobs(store: Store) -> list[int]:
    """Mark running jobs whose worker process is gone as failed, with their last heartbeat;
    resuming them continues where they stopped. Returns the job ids marked."""
    dead = []
    for job in store.list_jobs(status="running"):
        if lock_holder(job):
            continue
        # Only the row as it was read: a worker that beat or a job that ended meanwhile wins.
        if store.update_job(
            job.id,
            only_if={"status": "running", "pid": job.pid, "heartbeat": job.heartbeat},
            status="failed",
            message=f"worker process died; last heartbeat {job.heartbeat or 'never'}; "
            "resume to continue",
        ):
            dead.append(job.id)
    return dead


def current_jobs(store: Store, trait: str | None = None) -> list[Any]:
    """Every reader's view of the jobs (CLI and dashboard alike): dead workers' jobs are
    marked failed first, so no job whose process died shows as running."""
    reap_dead_jobs(store)
    return store.list_jobs(trait=trait)


def tail_log(store: Store, job_id: int, lines: int = 5) -> list[str]:
    path = log_path(store, job_id)
    if not path.exists():
        return []
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 8192))
        text = handle.read().decode("utf-8", "replace")
    # Progress bars redraw with carriage returns: keep each line's last state.
    cleaned = [line.split("\r")[-1] for line in text.splitlines()]
    return [line for line in cleaned if line.strip()][-lines:]
