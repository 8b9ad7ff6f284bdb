"""``persona worker JOB`` (one job to its end, headless; what the dashboard starts detached)
and ``persona jobs list|cancel``."""

from __future__ import annotations

import argparse
import os

from rich.table import Table
from rich.text import Text

from tui.cli.arguments import row_id
from tui.cli.context import db_path, open_store
from tui.cli.output import out
from tui.cli.parser import add_command

WORKER_LOG_EVERY_S = 10.0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one job to its end, headless; the dashboard starts this detached, its output in
    the job's log file: a progress line every 10 seconds, and the ending."""
    import time

    from pipeline.jobs import ProgressUpdate, run_job

    last = [0.0]

    def log_line(update: ProgressUpdate) -> None:
        now = time.monotonic()
        if now - last[0] < WORKER_LOG_EVERY_S:
            return
        last[0] = now
        unit = update.stats.get("unit", "")
        rate = update.stats.get("new_tokens_per_s") or update.stats.get(f"{unit}_per_s")
        rate_text = f", {rate:,.1f}/s" if rate else ""
        stamp = time.strftime("%H:%M:%S")
        print(
            f"{stamp} job {args.job_id}: {update.done}/{update.total} {unit}{rate_text}"
            f"{' · ' + update.message if update.message else ''}",
            flush=True,
        )

    print(
        f"{time.strftime('%H:%M:%S')} job {args.job_id}: worker {os.getpid()} started", flush=True
    )
    run_job(db_path(args), args.job_id, on_progress=log_line)
    with open_store(args) as store:
        job = store.get_job(args.job_id)
    print(f"{time.strftime('%H:%M:%S')} job {args.job_id}: {job.status} {job.message}", flush=True)
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from pipeline.workers import current_jobs

    with open_store(args) as store:
        jobs = current_jobs(store, trait=args.trait)
    table = Table(title=f"{len(jobs)} jobs")
    for column in ("id", "kind", "trait", "status", "done", "message"):
        table.add_column(column, no_wrap=column != "message")
    for job in jobs:
        table.add_row(
            *(Text(str(c)) for c in (job.id, job.kind, job.trait or "", job.status)),
            Text(f"{job.done}/{job.total}"),
            Text(job.message),
        )
    out.print(table)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from pipeline.workers import cancel

    with open_store(args) as store:
        cancel(store, args.job_id)
    out.print(f"job {args.job_id} will stop after its current batch")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    worker = add_command(
        commands, "worker", cmd_worker, "run one job by id (used by the dashboard)"
    )
    worker.add_argument("job_id", type=row_id)

    jobs = commands.add_parser("jobs", help="list and cancel jobs")
    job_cmds = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    jl = add_command(job_cmds, "list", cmd_jobs_list, "list jobs with status and progress")
    jl.add_argument("--trait")
    jc = add_command(job_cmds, "cancel", cmd_jobs_cancel, "ask a running job to stop")
    jc.add_argument("job_id", type=row_id)
