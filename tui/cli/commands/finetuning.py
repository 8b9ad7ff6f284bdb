"""``persona shift``: how far fine-tuning moved each checkpoint along a trait's vector, per
layer, and whether that shift tracks the checkpoints' judged trait expression."""

from __future__ import annotations

import argparse

from rich.table import Table
from rich.text import Text

from pipeline.shift_report import MODEL_COLUMNS, ShiftReport
from tui.cli.arguments import (
    VECTOR_KINDS,
    add_step_option,
    given,
    real_number,
    seed_int,
    whole_number,
)
from tui.cli.context import db_path, open_store
from tui.cli.output import err, out, run_jobs_with_progress
from tui.cli.parser import add_command

SHIFT = "pipeline.shift:ShiftParams"
RIGHT = {"justify": "right"}
# ShiftParams fields the command line sets as they are (models and base are mapped by hand).
SHIFT_OPTIONS = (
    "n_per_question",
    "judge",
    "judge_base_url",
    "vector",
    "max_new_tokens",
    "temperature",
    "seed",
    "device",
)


def cmd_shift(args: argparse.Namespace) -> int:
    from pipeline.shift import ShiftParams, create_shift_job

    params = ShiftParams(
        models=tuple(args.model or ()), base=args.base, **given(args, *SHIFT_OPTIONS)
    )
    with open_store(args) as store:
        job_id = create_shift_job(store, args.trait, params)
    run_jobs_with_progress(db_path(args), [(job_id, f"job {job_id} shift {args.trait}")])
    with open_store(args) as store:
        report = ShiftReport.from_job(store.get_job(job_id))
    print_shift(report)
    return 0


def print_shift(report: ShiftReport) -> None:
    """The models with their judged means, then per layer each checkpoint's projected shift
    (last prompt token and answer average) and Pearson's r across models."""
    models = Table(title=f"{report.trait}: models answering the eval questions (no system prompt)")
    for column in MODEL_COLUMNS:
        models.add_column(column, **({"overflow": "fold"} if column == "model" else RIGHT))
    for cells in report.model_rows():
        models.add_row(*(Text(c) for c in cells))
    out.print(models)

    strongest = report.strongest_layer
    layers = Table(title=report.layer_title())
    for column in report.layer_columns():
        layers.add_column(column, **RIGHT)
    for layer, cells in enumerate(report.layer_rows()):
        style = "bold green" if layer == strongest else None
        layers.add_row(*(Text(c) for c in cells), style=style)
    out.print(layers)
    if strongest is None:
        err.print(Text(f"note: {report.finding()}", style="yellow"))
    else:
        out.print(Text(report.finding()))


def register(commands: argparse._SubParsersAction) -> None:
    sh = add_command(
        commands,
        "shift",
        cmd_shift,
        "project fine-tuned checkpoints' activation shift (vs their base) on the trait's "
        "vector per layer, and correlate it with their judged trait (resumable job)",
    )
    sh.add_argument("trait")
    sh.add_argument(
        "--model",
        action="append",
        help="a fine-tuned checkpoint (folder or cached id); repeat for several",
    )
    sh.add_argument("--base", required=True, help="the model they were fine-tuned from")
    add_step_option(
        sh,
        "--n-per-question",
        SHIFT,
        type=whole_number,
        metavar="N",
        help="answers per eval question",
    )
    add_step_option(sh, "--judge", SHIFT, help="KIND:MODEL, as for `persona judge`")
    add_step_option(
        sh,
        "--judge-base-url",
        SHIFT,
        metavar="URL",
        help="an OpenAI- or Anthropic-compatible server",
    )
    add_step_option(sh, "--vector", SHIFT, metavar="KIND", help=f"one of {', '.join(VECTOR_KINDS)}")
    add_step_option(
        sh, "--max-new-tokens", SHIFT, type=whole_number, metavar="N", help="tokens an answer"
    )
    add_step_option(
        sh, "--temperature", SHIFT, type=real_number, metavar="T", help="sampling temperature"
    )
    add_step_option(sh, "--seed", SHIFT, type=seed_int, help="the same per-row seeds for all")
    add_step_option(sh, "--device", SHIFT, help="cpu, cuda or cuda:N (default: cuda when present)")
