"""The detached worker's entry point: ``python -m pipeline.worker_main DB JOB_ID [JOB_ID ...]``
runs its jobs to their end, headless: one job as ``run_job`` does, several generation jobs as
the command line's ``generate --side both`` does (``run_generation_jobs``: one model load, one
queue). The dashboard starts it in a new session (``pipeline.job_processes``), its stdout in
the first job's log file: a progress line a job every 10 seconds, and each ending. The
command line's ``persona worker JOB_ID`` runs the same function."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from db import Store
from pipeline.errors import USER_ERRORS
from pipeline.jobs import ProgressUpdate, end_job, failure_message, run_job

LOG_EVERY_S = 10.0


def _say(job_id: int, text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} job {job_id}: {text}", flush=True)


def _progress_lines(job_id: int) -> Callable[[ProgressUpdate], None]:
    """A job's progress as a line to stdout, at most every LOG_EVERY_S."""
    last = [0.0]

    def log_line(update: ProgressUpdate) -> None:
        now = time.monotonic()
        if now - last[0] < LOG_EVERY_S:
            return
        last[0] = now
        unit = update.stats.get("unit", "")
        rate = update.stats.get("new_tokens_per_s") or update.stats.get(f"{unit}_per_s")
        rate_text = f", {rate:,.1f}/s" if rate else ""
        message = f" · {update.message}" if update.message else ""
        _say(job_id, f"{update.done}/{update.total} {unit}{rate_text}{message}")

    return log_line


def run_worker(db_path: Path, job_ids: int | Sequence[int]) -> None:
    """Run the jobs, writing when they started, their progress (at most every LOG_EVERY_S
    a job) and how each ended to stdout. Several jobs run as ``run_generation_jobs`` (the
    command line's way for a generation's two sides), on the devices their ``--gpus`` name."""
    ids = [job_ids] if isinstance(job_ids, int) else list(job_ids)
    lines = {job_id: _progress_lines(job_id) for job_id in ids}
    for job_id in ids:
        _say(job_id, f"worker {os.getpid()} started")
    if len(ids) == 1:
        run_job(db_path, ids[0], on_progress=lines[ids[0]])
    else:
        from pipeline.job_devices import run_generation_jobs

        with Store(db_path) as store:
            params = [store.get_job(job_id).params for job_id in ids]
        # Started together from one form: one --gpus and --device for all (as on the
        # command line); jobs that name different ones keep their own.
        gpus = {p.get("gpus") for p in params}
        device = {p.get("device") for p in params}
        try:
            run_generation_jobs(
                db_path,
                ids,
                gpus=gpus.pop() if len(gpus) == 1 else None,
                device=device.pop() if len(device) == 1 else None,
                on_progress=lines.get,
            )
        except BaseException as exc:
            _fail_unclaimed(db_path, ids, exc)
            raise
    with Store(db_path) as store:
        for job_id in ids:
            job = store.get_job(job_id)
            _say(job_id, f"{job.status} {job.message}")


def _fail_unclaimed(db_path: Path, job_ids: Sequence[int], exc: BaseException) -> None:
    """Jobs this process was started for and never claimed (an error before the claims, such
    as a ``--gpus`` naming a missing GPU, or an earlier job's in a one-after-another run)
    end failed with the error: left ``pending``, no reaper ends them (it looks at running
    rows only). A claimed job's own code has ended it already."""
    reason = f"not started: {failure_message(exc)}; resume it to run it"
    with Store(db_path) as store:
        for job_id in job_ids:
            # Only a row still waiting for this process: another worker may have taken it.
            waiting = {"status": "pending", "pid": os.getpid()}
            end_job(store, job_id, "failed", reason, only_if=waiting)


def worker_command(db_path: Path, job_ids: Sequence[int]) -> list[str]:
    """The argument list that starts a detached worker (never a shell string)."""
    return [sys.executable, "-m", "pipeline.worker_main", str(db_path), *map(str, job_ids)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.worker_main")
    parser.add_argument("db", type=Path)
    parser.add_argument("job_ids", type=int, nargs="+")
    args = parser.parse_args(argv)
    try:
        run_worker(args.db, args.job_ids)
    except USER_ERRORS as exc:  # the job row already says why; the log gets one line
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
