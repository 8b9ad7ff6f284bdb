"""``persona run``: the whole method for one trait, a progress bar per step, then the pair
counts and the per-layer report (and the dashboard with --tui)."""

from __future__ import annotations

import argparse

from tui.cli import output
from tui.cli.arguments import (
    add_compile,
    add_deterministic,
    add_filter_values,
    add_gpus,
    positive_int,
    seed_int,
)
from tui.cli.context import db_path, require_terminal
from tui.cli.parser import add_command


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run import RunParams, run_trait

    if args.tui:
        require_terminal()  # before the whole run, not after it

    params = RunParams(
        trait=args.trait,
        description=args.description,
        author=args.author,
        model=args.model,
        judge=args.judge,
        judge_base_url=args.judge_base_url,
        n_per_question=args.n_per_question,
        n_eval=args.n_eval,
        all_instructions=args.all_instructions,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        threshold=args.threshold,
        coherence=args.coherence,
        device=args.device,
        gpus=args.gpus,
        compile=args.compile,
        deterministic=args.deterministic,
    )
    with output.progress_bar() as bar:

        def on_step(label: str, job_id: int):
            task = bar.add_task(f"job {job_id} {label}", total=None, rate="")
            return output.bar_updater(bar, task)

        result = run_trait(db_path(args), params, on_step=on_step)
    output.print_pair_counts(result.extraction.pairs)
    output.print_report(result.report)
    if args.tui:
        from tui.app import PersonaApp

        require_terminal()
        app = PersonaApp(db_path=db_path(args), trait=args.trait)
        app.thresholds = (args.threshold, args.coherence)  # Review opens with the run's rule
        app.run()
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    from pipeline.judging import DEFAULT_JUDGE

    run = add_command(
        commands,
        "run",
        cmd_run,
        "the whole method: author if new, generate, judge, filter, extract, report",
    )
    run.add_argument("trait")
    run.add_argument("--description", help="needed when the trait is new")
    run.add_argument("--author", help="KIND:MODEL that writes a new trait")
    run.add_argument("--model", default="smollm2")
    run.add_argument(
        "--judge",
        default=DEFAULT_JUDGE,
        help="KIND:MODEL; local:smollm2 runs offline but is a smoke test only "
        "(local:smollm2@bfloat16: in bf16, faster on a CPU with bf16 instructions)",
    )
    run.add_argument("--judge-base-url")
    run.add_argument("--n-per-question", type=positive_int, default=10, help="extract split")
    run.add_argument("--n-eval", type=positive_int, default=5, help="answers per eval question")
    run.add_argument("--all-instructions", action="store_true")
    run.add_argument("--max-new-tokens", type=positive_int, default=1000)
    run.add_argument("--seed", type=seed_int, default=0)
    run.add_argument(
        "--batch-size", type=positive_int, help="rows decoded at once (default: from free memory)"
    )
    # Checked here: the run would otherwise generate and judge for hours before extract
    # found a threshold outside 0-100.
    add_filter_values(run)
    run.add_argument("--device")
    add_gpus(run)
    add_compile(run)
    add_deterministic(run)
    run.add_argument("--tui", action="store_true", help="open the dashboard at the end")
