"""Dataclass messages workers post to the app; workers never touch widgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


# ---- the Monitor screen's workers -------------------------------------------------------------
@dataclass
class MonitorReady(Message):
    """What can be chosen before anything is shown: the trait's layers and vector kinds."""

    trait: str
    layer: int  # the default layer (TraitReport.default_layer)
    top: int  # the model's last layer
    kinds: list[str]


@dataclass
class MonitorUnavailable(Message):
    reason: str


@dataclass
class MonitorProgress(Message):
    """A stage of a slow computation in words (the z-scores' neutral baseline)."""

    text: str


@dataclass
class ProjectionsLoaded(Message):
    """Per-token projections at every layer for one or two responses."""

    panels: list[dict[str, Any]]  # {"title", "tokens", "values" [T, L+1], "prompt_len"}
    layer: int
    zscored: bool = False


@dataclass
class TokensStreamed(Message):
    """The live answer's next tokens, each with its projection (done: the answer ended)."""

    run: int  # which generation they belong to: a replaced one's late tokens are dropped
    tokens: list[str]
    values: list[float]
    done: bool


@dataclass
class ComparisonLoaded(Message):
    """The typed prompt answered unsteered, then steered (``pipeline.steer.WatchedAnswer``)."""

    answers: list[Any]
