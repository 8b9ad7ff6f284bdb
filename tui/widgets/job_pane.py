"""The progress pane of one job: bar, done/total, rate with a sparkline of its history, ETA,
GPU memory, cost, errors and the last lines of its log."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar, Sparkline, Static

from db import Job


def job_summary(job: Job) -> Text:
    stats = job.stats or {}
    unit = stats.get("unit", "items")
    parts = [f"job {job.id} · {job.kind} · {job.trait or ''} · {job.status}"]
    line = Text(" ".join(parts), style="bold")
    details = []
    if job.total:
        details.append(f"{job.done}/{job.total} {unit}")
    tok = stats.get("new_tokens_per_s")
    rate = stats.get(f"{unit}_per_s")
    if tok:
        details.append(f"{tok:,.0f} tok/s")
    elif rate:
        details.append(f"{rate:,.2f} {unit}/s")
    eta = stats.get("eta_s")
    if eta and job.status == "running":
        details.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    if stats.get("gpu_mem_gb") is not None:
        details.append(f"GPU {stats['gpu_mem_gb']:.1f} GiB")
    if stats.get("cost"):
        details.append(f"${stats['cost']:.4f}")
    if stats.get("errors"):
        details.append(f"{int(stats['errors'])} errors")
    if job.heartbeat:
        details.append(f"heartbeat {job.heartbeat[11:19]}")
    line.append("\n" + " · ".join(details), style="")
    if job.message:
        line.append("\n" + job.message, style="italic")
    return line


class JobPane(Vertical):
    """Shows one job; ``show`` is called by the screen with each poll's data."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: dict[int, deque[float]] = {}
        self.job_id: int | None = None

    def compose(self) -> ComposeResult:
        yield Static("no job selected", id="job-summary", markup=False)
        yield ProgressBar(total=100, show_eta=False, id="job-bar")
        yield Label("rate", classes="pane-label")
        yield Sparkline([], id="job-rate")
        yield Static("", id="job-log", markup=False)

    def record(self, job: Job) -> None:
        """Keep a short history of each job's rate for the sparkline."""
        stats = job.stats or {}
        unit = stats.get("unit", "items")
        rate = stats.get("new_tokens_per_s") or stats.get(f"{unit}_per_s") or 0.0
        history = self.history.setdefault(job.id, deque(maxlen=60))
        if job.status == "running":
            history.append(float(rate))

    def show(self, job: Job | None, log_lines: list[str]) -> None:
        if job is None:
            self.query_one("#job-summary", Static).update("no job selected")
            return
        self.job_id = job.id
        self.query_one("#job-summary", Static).update(job_summary(job))
        bar = self.query_one("#job-bar", ProgressBar)
        bar.update(total=max(job.total, 1), progress=job.done)
        self.query_one("#job-rate", Sparkline).data = list(self.history.get(job.id, [])) or [0.0]
        self.query_one("#job-log", Static).update(Text("\n".join(log_lines), style="dim"))
