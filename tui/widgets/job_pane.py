"""The progress pane of one job: bar, done/total, rate with a sparkline of its history, ETA,
GPU memory, cost, errors and the last lines of its worker's log file; and what a job is, in
the words of the jobs table (side, split, scope)."""

from __future__ import annotations

from collections import deque
from pathlib import PurePath
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar, Sparkline, Static

from db import Job


def job_scope(job: Job) -> dict[str, str]:
    """A job's side, split and scope (what it covers) from its parameters, for the table."""
    params: dict[str, Any] = job.params or {}
    side, split = str(params.get("side", "")), str(params.get("split", ""))
    if job.kind == "judge":
        responses = params.get("responses") or []
        if responses:
            what = "responses " + ", ".join(str(r) for r in responses)
        elif params.get("job") is not None:
            what = f"job {params['job']}"
        else:
            what = "every response"
        scope = f"{what} · {params.get('judge', '')}"
    elif job.kind == "generate":
        model = PurePath(str(params.get("model", ""))).name  # a folder or hub id: its last part
        scope = f"{params.get('n_per_question', '?')} per question · {model}"
    elif job.kind == "extract":
        scope = f"T {params.get('threshold', '?')} · C {params.get('coherence', '?')}"
    elif job.kind == "shift":
        # The checkpoints first: the base is the same across a trait's shift jobs.
        checkpoints = ", ".join(PurePath(str(m)).name for m in params.get("models") or [])
        scope = f"{checkpoints or '?'} vs {PurePath(str(params.get('base', '?'))).name}"
        split = "eval"  # the checkpoints answer the eval questions
    elif job.kind == "sweep":
        layers = params.get("layers") or []
        span = f"layers {min(layers)}-{max(layers)}" if layers else "layers ?"
        scope = f"{span} · coefs {','.join(f'{c:g}' for c in params.get('coefs') or [])}"
    else:
        scope = ""
    return {"side": side, "split": split, "scope": scope}


def job_summary(job: Job) -> Text:
    stats = job.stats or {}
    unit = stats.get("unit", "items")
    where = [v for v in job_scope(job).values() if v]
    parts = [" · ".join([f"job {job.id}", job.kind, job.trait or "", *where, job.status])]
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
    by_gpu = stats.get("gpu_mem_gb_by_gpu")
    if by_gpu:
        peaks = ", ".join(f"{index}: {gb:.1f}" for index, gb in by_gpu.items())
        details.append(f"GPU {peaks} GiB")
    elif stats.get("gpu_mem_gb") is not None:
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
        yield Static("", id="job-log-file", markup=False, classes="pane-label")
        yield Static("", id="job-log", markup=False)

    def record(self, job: Job) -> None:
        """Keep a short history of each job's rate for the sparkline."""
        stats = job.stats or {}
        unit = stats.get("unit", "items")
        rate = stats.get("new_tokens_per_s") or stats.get(f"{unit}_per_s") or 0.0
        history = self.history.setdefault(job.id, deque(maxlen=60))
        if job.status == "running":
            history.append(float(rate))

    def show(self, job: Job | None, log_lines: list[str], log_file: str = "") -> None:
        if job is None:
            self.query_one("#job-summary", Static).update("no job selected")
            return
        if not log_file:
            where = "no worker log: the job ran from a command line, where its output went"
        else:
            where = f"worker log {log_file}" + ("" if log_lines else " (empty so far)")
        self.query_one("#job-log-file", Static).update(where)
        self.job_id = job.id
        self.query_one("#job-summary", Static).update(job_summary(job))
        bar = self.query_one("#job-bar", ProgressBar)
        bar.update(total=max(job.total, 1), progress=job.done)
        self.query_one("#job-rate", Sparkline).data = list(self.history.get(job.id, [])) or [0.0]
        self.query_one("#job-log", Static).update(Text("\n".join(log_lines), style="dim"))
