"""Job rows as the steps see them: progress written about once a second (done/total, rate,
ETA, GPU memory, heartbeat), cancellation read back, the job lock, and the runner behind
``persona worker JOB_ID``.

The lock: a running job's row names its worker (pid and host) and carries a heartbeat that a
background thread refreshes every few seconds, also while a model loads. A job is held while
that worker is alive on this host and beating (from another host: while it beats); otherwise
the lock is stale and the next worker takes it over."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from db import PersonaError, Store
from db.store import Job, utc_now

FLUSH_SECONDS = 1.0
HEARTBEAT_SECONDS = 5.0
# A heartbeat older than this means the worker is gone or hung: its lock may be taken over.
STALE_SECONDS = 30.0


class JobLockedError(PersonaError):
    """Another live worker holds the job."""


class JobTakenOver(Exception):
    """Another worker took this job over (our heartbeat had gone stale); stop writing."""


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

    def __init__(self, job_id: int | None = None) -> None:
        super().__init__(job_id)
        self.job_id = job_id  # the cancelled job, where several run as one


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

    def _write(self, **fields: Any) -> None:
        """Write the job row while it still names this worker (see ``claim_job``)."""
        if not self.store.update_job(self.job_id, only_if=owner(), **fields):
            raise JobTakenOver(f"job {self.job_id} was taken over by another worker")

    def start(self) -> None:
        self._write(
            status="running",
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
        by_gpu = gpu_memory_gb()
        # The busiest GPU's peak; with several in use, each GPU's as well.
        stats["gpu_mem_gb"] = max(by_gpu.values()) if by_gpu else None
        if len(by_gpu) > 1:
            stats["gpu_mem_gb_by_gpu"] = by_gpu
        stats.update(self.extra)
        return stats

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < FLUSH_SECONDS:
            return
        self._last_flush = now
        stats = self.stats()
        self._write(done=self.done, stats=stats, heartbeat=utc_now(), message=self.message)
        if self.on_progress is not None:
            self.on_progress(
                ProgressUpdate(self.job_id, self.done, self.total, stats, self.message)
            )

    def check_cancelled(self) -> None:
        job = self.store.get_job(self.job_id)
        if job.status == "cancelled":
            raise JobCancelled(self.job_id)
        if job.pid is not None and {"pid": job.pid, "host": job.host} != owner():
            raise JobTakenOver(f"job {self.job_id} was taken over by pid {job.pid}")

    def finish(self, status: str = "done", message: str = "") -> None:
        self.message = message
        self.flush(force=True)
        self._write(status=status, ended=utc_now(), message=message)


def gpu_memory_gb() -> dict[str, float]:
    """The peak memory torch allocated on each GPU this process used (GiB, by index as a
    string: job stats are JSON); empty without CUDA, or where torch is not loaded already
    (importing it would cost a judging job seconds)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    peaks = {}
    for index in range(torch.cuda.device_count()):
        # Read from the allocator's counters: a GPU this process never used stays untouched.
        peak = torch.cuda.max_memory_allocated(index)
        if peak:
            peaks[str(index)] = round(peak / 2**30, 2)
    return peaks


# ---- parameters ---------------------------------------------------------------------------
class JobParams:
    """A step's parameters (a frozen dataclass) as stored in its job row's JSON. JSON has no
    tuples: ``to_dict`` writes them as lists, so a stored row compares equal, and
    ``from_dict`` reads lists back as tuples, ignoring keys another version wrote. Fields in
    ``NOT_IDENTITY`` change no output: a rerun differing only in them resumes the same job."""

    NOT_IDENTITY: frozenset[str] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**{k: v for k, v in values.items() if k in known})

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_IDENTITY}


# ---- the job lock -------------------------------------------------------------------------
@functools.cache
def this_host() -> str:
    # Read once: a hostname changed mid-job must not look like another worker.
    return socket.gethostname()


def owner() -> dict[str, Any]:
    """This process as a job row names its worker."""
    return {"pid": os.getpid(), "host": this_host()}


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def heartbeat_age(heartbeat: str | None) -> float | None:
    if not heartbeat:
        return None
    return (datetime.now(UTC) - datetime.fromisoformat(heartbeat)).total_seconds()


def lock_holder(job: Job) -> str | None:
    """Who holds a job, as words ("pid 123 on host"), or None when it is free: never started,
    ended, or its worker is gone (a dead pid, or a heartbeat older than STALE_SECONDS: a hung
    worker or a reused pid)."""
    if job.status != "running" or job.pid is None:
        return None
    age = heartbeat_age(job.heartbeat)
    if age is None or age >= STALE_SECONDS:
        return None
    host = job.host or this_host()
    if host == this_host() and not pid_alive(job.pid):
        return None
    return f"pid {job.pid} on {host}, heartbeat {max(age, 0):.0f} s ago"


def claim_job(store: Store, job_id: int) -> None:
    """Take a job's lock for this process or raise ``JobLockedError``; ``JobCancelled`` for
    a job cancelled while it waited to start (it ends without running). The check and the
    write are one IMMEDIATE transaction, so two workers never both see the job free."""
    with store.transaction():
        job = store.get_job(job_id)
        # Cancelled after ``start_worker`` queued it, before any worker began it.
        cancelled = job.status == "cancelled" and job.ended is None and job.started is None
        if cancelled:
            store.update_job(job_id, ended=utc_now(), message="cancelled before it started")
        else:
            holder = lock_holder(job)
            if holder and {"pid": job.pid, "host": job.host} != owner():
                raise JobLockedError(
                    f"job {job_id} is already running ({holder}); wait for it, or stop it "
                    f"with `persona jobs cancel {job_id}`"
                )
            store.update_job(job_id, status="running", heartbeat=utc_now(), **owner())
    if cancelled:
        raise JobCancelled()


class Heartbeat:
    """Refreshes the job's heartbeat from a thread (its own connection) while the step runs,
    so a long model load or batch never looks like a dead worker."""

    def __init__(self, db_path: str | Path, job_id: int) -> None:
        self.db_path = db_path
        self.job_id = job_id
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        with Store(self.db_path) as store:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    if not store.update_job(self.job_id, only_if=owner(), heartbeat=utc_now()):
                        self.lost = True
                        return
                except Exception:  # a locked or busy database: try again next beat
                    continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---- running a job by id ------------------------------------------------------------------
JobRunner = Callable[..., Any]


# Imported only when a job of that kind runs: a judging job never pays for torch.
_RUNNERS = {
    "author": "pipeline.author:run_author_job",
    "extract": "pipeline.extract:run_extract_job",
    "generate": "pipeline.generation_job:run_generation_job",
    "judge": "pipeline.judging:run_judge_job",
    "shift": "pipeline.shift:run_shift_job",
    "sweep": "pipeline.sweep:run_sweep_job",
}


def _runner(kind: str) -> JobRunner | None:
    import importlib

    target = _RUNNERS.get(kind)
    if target is None:
        return None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def end_job(
    store: Store, job_id: int, status: str, message: str, only_if: dict[str, Any] | None = None
) -> None:
    """Write a job's end, only while the row is still ours (a worker that lost it leaves it
    alone), or, with ``only_if``, while the row still has those values."""
    from pipeline.api_clients import redact_keys

    ended = {"status": status, "ended": utc_now(), "message": redact_keys(message)[:500]}
    store.update_job(job_id, only_if=owner() if only_if is None else only_if, **ended)


def failure_message(exc: BaseException) -> str:
    """What a failed job's row says: our own errors as written, Ctrl-C as "interrupted",
    anything else as its repr."""
    if isinstance(exc, PersonaError):
        return str(exc)
    return "interrupted" if isinstance(exc, KeyboardInterrupt) else repr(exc)


def run_job(db_path: str | Path, job_id: int, on_progress: ProgressCallback | None = None) -> None:
    """Run (or resume) one job to its end; ``persona worker`` and the CLI both come here. A
    finished job runs again cheaply: each step does only what is missing or failed."""
    with Store(db_path) as store:
        job = store.get_job(job_id)
        runner = _runner(job.kind)
        if runner is None:
            raise PersonaError(f"job {job_id} has kind '{job.kind}', which no step runs")
        try:
            claim_job(store, job_id)
        except JobCancelled:
            return
        try:
            with Heartbeat(db_path, job_id):
                runner(store, job_id, on_progress=on_progress)
        except JobTakenOver:
            return  # the row is the new worker's now: leave it as it is
        except JobCancelled:
            end_job(store, job_id, "cancelled", "cancelled")
        except BaseException as exc:
            end_job(store, job_id, "failed", failure_message(exc))
            raise
