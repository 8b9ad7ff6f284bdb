"""Dataclass messages workers post to the app; workers never touch widgets."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from db import Job, TraitDefinition, TraitSummary
from pipeline.gpu_status import GpuReport


@dataclass
class TraitsLoaded(Message):
    """The trait library as read from SQLite by a polling worker."""

    summaries: list[TraitSummary]
    pairs: dict[str, int]  # effective pairs at the last recorded filter, by trait


@dataclass
class TraitLoaded(Message):
    """One trait's full definition, for the detail pane."""

    trait: TraitDefinition


@dataclass
class WorkerError(Message):
    """A worker failed; the app shows it in the error modal (the one place that does)."""

    title: str
    message: str


@dataclass
class JobsLoaded(Message):
    """All jobs, the selected one's id and the tail of its worker's log file."""

    jobs: list[Job]
    selected: int | None
    log: list[str]
    log_file: str = ""
    gpus: GpuReport | None = None
