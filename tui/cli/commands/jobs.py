"""``persona worker JOB`` (one job to its end, headless; what the dashboard starts detached)
and ``persona jobs list|cancel``."""

from __future__ import annotations

import argparse

from rich.table import Table
from rich.text import Text

from tui.cli.arguments import row_id
from tui.cli.context import db_path, open_store
from tui.cli.output import out
from tui.cli.parser import add_command


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one job to its end, headless, as the dashboard's detached worker does."""
    from pipeline.worker_main import run_worker

    run_worker(db_path(args), args.job_id)
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from pipeline.job_processes import current_jobs

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
    from pipeline.job_processes import cancel, cancel_notice

    with open_store(args) as store:
        mates = cancel(store, args.job_id)
    out.print(cancel_notice(args.job_id, mates), markup=False)
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
