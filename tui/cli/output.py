"""What the command line prints: the two consoles, terminal-safe text, progress bars for
jobs, and the reports that several commands share (pair counts, the per-layer table)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tui.printable import printable  # noqa: F401  (commands import it from here)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def progress_bar() -> Iterator[Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )
    progress.start()
    try:
        yield progress
    except BaseException:
        # A failed step leaves no bar behind, nor the blank line Progress.stop adds off a
        # terminal: the error line printed next is then the only thing on stderr.
        progress.live.transient = True
        progress.live.stop()
        raise
    progress.stop()


def bar_updater(bar, task):
    """A job progress callback that moves one bar: tokens/s for generation, else units/s."""
    from pipeline.jobs import ProgressUpdate

    def show(update: ProgressUpdate) -> None:
        per_s = update.stats.get("new_tokens_per_s")
        unit = update.stats.get("unit", "")
        if per_s:
            rate = f"{per_s:,.0f} tok/s"
        elif update.stats.get(f"{unit}_per_s"):
            rate = f"{update.stats[f'{unit}_per_s']:.1f} {unit}/s"
        else:
            rate = update.message
        bar.update(task, completed=update.done, total=update.total, rate=rate)

    return show


def run_jobs_with_progress(db_path: Path, jobs: list[tuple[int, str]]) -> None:
    from pipeline.jobs import run_job

    with progress_bar() as bar:
        for job_id, label in jobs:
            task = bar.add_task(label, total=None, rate="")

            run_job(db_path, job_id, on_progress=bar_updater(bar, task))


def run_generation_with_progress(
    db_path: Path, jobs: list[tuple[int, str]], *, gpus: str | None, device: str | None
) -> None:
    """Generation jobs with a bar each, side by side on their own GPUs where there are
    several (``pipeline.job_devices``)."""
    from pipeline.job_devices import run_generation_jobs

    with progress_bar() as bar:
        tasks = {job_id: bar.add_task(label, total=None, rate="") for job_id, label in jobs}
        run_generation_jobs(
            db_path,
            [job_id for job_id, _ in jobs],
            gpus=gpus,
            device=device,
            on_progress=lambda job_id: bar_updater(bar, tasks[job_id]),
        )


def print_pair_counts(pairs) -> None:
    counts = pairs.counts()
    out.print(
        f"{len(pairs.effective)} effective pairs of {len(pairs.pairs)} (pos job {pairs.pos_job}, "
        f"neg job {pairs.neg_job}, judge {pairs.judge}, threshold {pairs.threshold:g}, "
        f"coherence {pairs.coherence:g})"
    )
    for reason, n in counts.items():
        if n:
            out.print(f"  {reason:<18}{n:>6}")
    advice = pairs.advice()
    if advice:
        err.print(Text("warning: " + advice, style="yellow"))


def print_report(report) -> None:
    from pipeline.analyze import report_rows

    table = Table(title=f"{report.trait} on {report.model}: per-layer norms and eval separation")
    table.add_column("layer", justify="right")
    for kind in report.norms:
        table.add_column(f"|{kind.split('_diff')[0]}|", justify="right")
    if report.separation is not None:
        table.add_column("AUROC", justify="right")
        table.add_column("d", justify="right")
    for row in report_rows(report):
        cells = [str(row["layer"])] + [f"{row[k]:.3f}" for k in report.norms]
        if report.separation is not None:
            cells += [f"{row['auroc']:.3f}", f"{row['cohens_d']:.2f}"]
        style = "bold green" if row["recommended"] else None
        table.add_row(*(Text(c) for c in cells), style=style)
    out.print(table)
    if report.recommended_layer is not None:
        best = report.separation[report.recommended_layer]
        pos_n, neg_n = report.eval_counts
        how = report.choice.text() if report.choice else f"eval AUROC {best.auroc:.3f}"
        out.print(
            f"recommended layer {report.recommended_layer}: {how}, "
            f"Cohen's d {best.cohens_d:.2f} ({pos_n} pos / {neg_n} neg eval answers)"
        )
    if report.steering is not None:
        from pipeline.analyze import steering_text

        out.print(steering_text(report.steering))
    for name, cos in sorted(report.similarity.items()):
        layer = report.default_layer
        out.print(f"cosine with {name} at layer {layer}: {cos[layer]:+.3f}")
    for note in report.notes:
        err.print(Text("note: " + note, style="yellow"))
