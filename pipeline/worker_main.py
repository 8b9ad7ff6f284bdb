"""The detached worker's entry point: ``python -m pipeline.worker_main DB JOB_ID`` runs one
job to its end, headless. The dashboard starts it in a new session (``pipeline.job_processes``),
its stdout in the job's log file: a progress line every 10 seconds, and the ending. The
command line's ``persona worker JOB_ID`` runs the same function."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from db import Store
from pipeline.errors import USER_ERRORS
from pipeline.jobs import ProgressUpdate, run_job

LOG_EVERY_S = 10.0


def _say(job_id: int, text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} job {job_id}: {text}", flush=True)


def run_worker(db_path: Path, job_id: int) -> None:
    """Run one job, writing when it started, its progress (at most every LOG_EVERY_S) and
    how it ended to stdout."""
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

    _say(job_id, f"worker {os.getpid()} started")
    run_job(db_path, job_id, on_progress=log_line)
    with Store(db_path) as store:
        job = store.get_job(job_id)
    _say(job_id, f"{job.status} {job.message}")


def worker_command(db_path: Path, job_id: int) -> list[str]:
    """The argument list that starts a detached worker (never a shell string)."""
    return [sys.executable, "-m", "pipeline.worker_main", str(db_path), str(job_id)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.worker_main")
    parser.add_argument("db", type=Path)
    parser.add_argument("job_id", type=int)
    args = parser.parse_args(argv)
    try:
        run_worker(args.db, args.job_id)
    except USER_ERRORS as exc:  # the job row already says why; the log gets one line
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
