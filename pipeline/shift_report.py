"""What a trait's fine-tuning shift job found, shaped for reading: the models with their judged
means, per layer each checkpoint's projected shift (last prompt token and answer average) with
Pearson's r across models, the layer whose r is largest in size, and the sentence that closes
the report. ``persona shift`` prints it and the dashboard's shift view shows it; both build
their tables from these cells, so the numbers read the same in both.

No torch here: the dashboard reads a finished job's stats (``table``, ``correlation``, written
by ``pipeline.shift``) at start-up speed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from db import Job, Store

READOUTS = ("prompt_last", "response_avg")
READOUT_LABELS = {"prompt_last": "last", "response_avg": "avg"}
MODEL_COLUMNS = ("#", "model", "answers", "trait", "coherence")
# A job that has no table yet, in words ("done" without one: a job of an older version).
JOB_STATE = {
    "pending": "is waiting for its worker",
    "running": "is running",
    "failed": "failed",
    "cancelled": "was cancelled",
    "done": "ended without a table",
}


def number(value: float | None, form: str) -> str:
    """``value`` in ``form``, or "-" where there is none (an unjudged model, no r)."""
    return "-" if value is None else format(value, form)


def no_shift_job(trait: str) -> str:
    return (
        f"no shift job for this trait yet: run persona shift {trait} --model CHECKPOINT --base BASE"
    )


@dataclass(frozen=True)
class ShiftReport:
    """A finished shift job's results; ``table`` and ``correlation`` as the job stores them
    (one row per model, the base first; readout -> r per layer)."""

    trait: str
    vector: str
    table: list[dict[str, Any]]
    correlation: dict[str, list[float | None]]
    job_id: int | None = None

    @classmethod
    def from_job(cls, job: Job) -> ShiftReport:
        params = job.params or {}
        return cls(
            trait=job.trait or "",
            vector=str(params.get("vector", "response_avg_diff")),
            table=job.stats["table"],
            correlation=job.stats["correlation"],
            job_id=job.id,
        )

    @property
    def base(self) -> str:
        return next((row["model"] for row in self.table if row["base"]), "")

    @property
    def checkpoints(self) -> list[int]:
        """The table's indices of the fine-tuned checkpoints (every row but the base)."""
        return [index for index, row in enumerate(self.table) if not row["base"]]

    @property
    def n_layers(self) -> int:
        return len(self.table[0]["prompt_last"]) if self.table else 0

    @property
    def judged(self) -> int:
        return sum(row["trait"] is not None for row in self.table)

    @property
    def strongest_layer(self) -> int | None:
        """The layer whose r (last prompt token, the paper's readout) is largest in size;
        None when no layer has one."""
        rs = self.correlation.get("prompt_last") or []
        known = [(abs(r), layer) for layer, r in enumerate(rs) if r is not None]
        return max(known)[1] if known else None

    def model_rows(self, name: Callable[[str], str] = str) -> list[tuple[str, ...]]:
        """Cells under MODEL_COLUMNS, one row per model; ``name`` shortens a model's name."""
        rows = []
        for index, row in enumerate(self.table):
            label = name(row["model"]) + (" (base)" if row["base"] else "")
            trait, coherence = number(row["trait"], ".1f"), number(row["coherence"], ".1f")
            rows.append((str(index), label, str(row["n"]), trait, coherence))
        return rows

    def layer_title(self) -> str:
        return (
            f"projected shift (checkpoint - base) on {self.vector}, h . v / |v| per layer; "
            "last = last prompt token, avg = answer average"
        )

    def layer_columns(self) -> list[str]:
        """ "layer", then per checkpoint "#K last" and "#K avg", then "r last" and "r avg"."""
        labels = READOUT_LABELS.values()
        per_model = [f"#{index} {label}" for index in self.checkpoints for label in labels]
        return ["layer", *per_model, *(f"r {label}" for label in labels)]

    def layer_rows(self) -> list[tuple[str, ...]]:
        """Cells under ``layer_columns``, one row per layer (0, the embeddings, first)."""
        rows = []
        for layer in range(self.n_layers):
            cells = [str(layer)]
            for index in self.checkpoints:
                cells += [f"{self.table[index][readout][layer]:+.3f}" for readout in READOUTS]
            cells += [number(self.correlation[readout][layer], "+.2f") for readout in READOUTS]
            rows.append(tuple(cells))
        return rows

    def finding(self) -> str:
        """The closing sentence: the strongest layer and its r, or why there is no r."""
        strongest = self.strongest_layer
        if strongest is None:
            return (
                "no correlation: it needs 3 judged models with different scores (the base "
                f"counts; {self.judged} judged here); add checkpoints with --model"
            )
        r_last, r_avg = (self.correlation[readout][strongest] for readout in READOUTS)
        return (
            f"projected shift vs judged trait across {self.judged} models (the base at 0): "
            f"strongest at layer {strongest}, r = {r_last:+.2f} (last prompt token), "
            f"{number(r_avg, '+.2f')} (answer average)"
        )


@dataclass(frozen=True)
class ShiftOverview:
    """A trait's shift results for the dashboard: the newest finished job's report (None
    when no job has finished) and a line on a newer job still under way or failed, or on
    there being none ("" when the newest job is the one shown)."""

    report: ShiftReport | None
    status: str


def latest_shift(store: Store, trait: str) -> ShiftOverview:
    jobs = store.list_jobs(trait=trait, kind="shift")
    if not jobs:
        return ShiftOverview(None, no_shift_job(trait))
    finished = [job for job in jobs if "table" in (job.stats or {})]
    report = ShiftReport.from_job(finished[-1]) if finished else None
    newest = jobs[-1]
    if report is not None and newest.id == report.job_id:
        return ShiftOverview(report, "")
    state = f"shift job {newest.id} {JOB_STATE.get(newest.status, newest.status)}"
    if newest.total and newest.status in ("pending", "running"):
        state += f" ({100 * newest.done // newest.total}%)"
    if newest.status == "failed" and newest.message:
        state += f": {newest.message.splitlines()[0]}"
    if report is not None:
        state += f"; shown: job {report.job_id}, the newest finished"
    else:
        state += "; its table appears when it is done"
    return ShiftOverview(report, state)
