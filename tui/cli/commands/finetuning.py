"""``persona shift``: how far fine-tuning moved each checkpoint along a trait's vector, per
layer, and whether that shift tracks the checkpoints' judged trait expression."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table
from rich.text import Text

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
READOUT_LABELS = {"prompt_last": "last", "response_avg": "avg"}


def cmd_shift(args: argparse.Namespace) -> int:
    from pipeline.shift import ShiftParams, create_shift_job

    params = ShiftParams(
        models=tuple(args.model or ()), base=args.base, **given(args, *SHIFT_OPTIONS)
    )
    with open_store(args) as store:
        job_id = create_shift_job(store, args.trait, params)
    run_jobs_with_progress(db_path(args), [(job_id, f"job {job_id} shift {args.trait}")])
    with open_store(args) as store:
        stats = store.get_job(job_id).stats
    print_shift(args.trait, params.vector, stats["table"], stats["correlation"])
    return 0


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def print_shift(
    trait: str,
    vector: str,
    table: list[dict[str, Any]],
    correlation: dict[str, list[float | None]],
) -> None:
    """The models with their judged means, then per layer each checkpoint's projected shift
    (last prompt token and answer average) and Pearson's r across models."""
    models = Table(title=f"{trait}: models answering the eval questions (no system prompt)")
    for column in ("#", "model", "answers", "trait", "coherence"):
        if column == "model":
            models.add_column(column, overflow="fold")
        else:
            models.add_column(column, justify="right")
    for index, row in enumerate(table):
        label = f"{row['model']} (base)" if row["base"] else row["model"]
        cells = (str(index), label, str(row["n"]), _number(row["trait"], ".1f"))
        models.add_row(*(Text(c) for c in (*cells, _number(row["coherence"], ".1f"))))
    out.print(models)

    strongest = _strongest_layer(correlation["prompt_last"])
    layers = Table(
        title=f"projected shift (checkpoint - base) on {vector}, h . v / |v| per layer; "
        "last = last prompt token, avg = answer average"
    )
    layers.add_column("layer", justify="right")
    checkpoints = [i for i, row in enumerate(table) if not row["base"]]
    for index in checkpoints:
        for label in READOUT_LABELS.values():
            layers.add_column(f"#{index} {label}", justify="right")
    for label in READOUT_LABELS.values():
        layers.add_column(f"r {label}", justify="right")
    for layer in range(len(table[0]["prompt_last"])):
        cells = [str(layer)]
        for index in checkpoints:
            cells += [f"{table[index][readout][layer]:+.3f}" for readout in READOUT_LABELS]
        cells += [_number(correlation[readout][layer], "+.2f") for readout in READOUT_LABELS]
        style = "bold green" if layer == strongest else None
        layers.add_row(*(Text(c) for c in cells), style=style)
    out.print(layers)

    judged = sum(row["trait"] is not None for row in table)
    if strongest is None:
        err.print(
            Text(
                f"note: no correlation: it needs 3 judged models with different scores (the "
                f"base counts; {judged} judged here); add checkpoints with --model",
                style="yellow",
            )
        )
        return
    r_last, r_avg = (correlation[readout][strongest] for readout in READOUT_LABELS)
    out.print(
        f"projected shift vs judged trait across {judged} models (the base at 0): strongest "
        f"at layer {strongest}, r = {r_last:+.2f} (last prompt token), "
        f"{_number(r_avg, '+.2f')} (answer average)"
    )


def _strongest_layer(rs: list[float | None]) -> int | None:
    """The layer whose correlation (last prompt token, the paper's readout) is largest in
    size; None when no layer has one."""
    known = [(abs(r), layer) for layer, r in enumerate(rs) if r is not None]
    return max(known)[1] if known else None


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
