"""Job rows as the steps see them: progress written about once a second (done/total, rate,
ETA, GPU memory, heartbeat), cancellation read back, and the runner behind
``persona worker JOB_ID``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db import PersonaError, Store
from db.store import utc_now

FLUSH_SECONDS = 1.0


@dataclass
class ProgressUpdate:
    job_id: int
    done: int
    total: int
    stats: dict[str, Any] = field(default_factory=dict)
    message: str = ""


ProgressCallback = Callable[[ProgressUpdate], None]


class JobCancelled(Exception):
    """The job's row was set to cancelled; the step stops after its current batch."""


class JobProgress:
    """Counts work for one job and writes it to the job row, throttled."""

    def __init__(
        self,
        store: Store,
        job_id: int,
        total: int,
        done: int = 0,
        *,
        unit: str = "items",
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.total = total
        self.done = done
        self.unit = unit
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.done_at_start = done
        self.counters: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self._last_flush = 0.0
        self.message = ""

    def start(self) -> None:
        self.store.update_job(
            self.job_id,
            status="running",
            pid=os.getpid(),
            started=utc_now(),
            ended=None,
            total=self.total,
            done=self.done,
            heartbeat=utc_now(),
            message="",
        )
        self.flush(force=True)

    def add(self, done: int = 0, **counters: float) -> None:
        self.done += done
        for key, value in counters.items():
            self.counters[key] = self.counters.get(key, 0) + value
        self.flush()

    def stats(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.done - self.done_at_start) / elapsed
        stats: dict[str, Any] = {"elapsed_s": round(elapsed, 2), "unit": self.unit}
        stats[f"{self.unit}_per_s"] = round(rate, 3)
        for key, value in self.counters.items():
            stats[key] = value
            stats[f"{key}_per_s"] = round(value / elapsed, 2)
        remaining = self.total - self.done
        stats["eta_s"] = round(remaining / rate, 1) if rate > 0 else None
        stats["gpu_mem_gb"] = _gpu_memory_gb()
        stats.update(self.extra)
        return stats

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < FLUSH_SECONDS:
            return
        self._last_flush = now
        stats = self.stats()
        self.store.update_job(
            self.job_id, done=self.done, stats=stats, heartbeat=utc_now(), message=self.message
        )
        if self.on_progress is not None:
            self.on_progress(
                ProgressUpdate(self.job_id, self.done, self.total, stats, self.message)
            )

    def check_cancelled(self) -> None:
        if self.store.get_job(self.job_id).status == "cancelled":
            raise JobCancelled()

    def finish(self, status: str = "done", message: str = "") -> None:
        self.message = message
        self.flush(force=True)
        self.store.update_job(self.job_id, status=status, ended=utc_now(), message=message)


def _gpu_memory_gb() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


# ---- running a job by id ------------------------------------------------------------------
JobRunner = Callable[..., Any]


def _runners() -> dict[str, JobRunner]:
    # Imported here: each step pulls in torch or API clients only when its job runs.
    from pipeline.author import run_author_job
    from pipeline.extract import run_extract_job
    from pipeline.generate import run_generation_job
    from pipeline.judging import run_judge_job
    from pipeline.sweep import run_sweep_job

    return {
        "author": run_author_job,
        "extract": run_extract_job,
        "generate": run_generation_job,
        "judge": run_judge_job,
        "sweep": run_sweep_job,
    }


def run_job(db_path: str | Path, job_id: int, on_progress: ProgressCallback | None = None) -> None:
    """Run (or resume) one job to its end; ``persona worker`` and the CLI both come here. A
    finished job runs again cheaply: each step does only what is missing or failed."""
    with Store(db_path) as store:
        job = store.get_job(job_id)
        runner = _runners().get(job.kind)
        if runner is None:
            raise PersonaError(f"job {job_id} has kind '{job.kind}', which no step runs")
        try:
            runner(store, job_id, on_progress=on_progress)
        except JobCancelled:
            store.update_job(job_id, status="cancelled", ended=utc_now(), message="cancelled")
        except PersonaError as exc:
            store.update_job(job_id, status="failed", ended=utc_now(), message=str(exc))
            raise
        except BaseException as exc:
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else repr(exc)
            store.update_job(job_id, status="failed", ended=utc_now(), message=reason[:500])
            raise
