"""Several generation jobs through one engine on one device (``persona run``'s four jobs,
``generate --side both``): one queue of all their rows, each job's rows and activations the
same as the job run alone, each job ended by itself, cancel and rerun as for one job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from db import PersonaError, Store
from pipeline.engine import DecodeEngine
from pipeline.generate import GenerateParams, find_or_create_job
from pipeline.generation_job import can_share_engine
from pipeline.job_devices import run_generation_jobs
from pipeline.job_processes import cancel
from pipeline.jobs import run_job
from pipeline.local_generation import _JobWriter
from vectors.activations import load_consolidated

PLAN = (("extract", "pos", 1), ("extract", "neg", 1), ("eval", "pos", 1), ("eval", "neg", 1))


def _plan(store: Store, model: Path, **extra) -> list[int]:
    jobs = []
    for split, side, n in PLAN:
        params = GenerateParams(
            side=side, split=split, model=str(model), n_per_question=n, max_new_tokens=8,
            batch_size=6, device="cpu", **extra,
        )  # fmt: skip
        jobs.append(find_or_create_job(store, "paternalism", params))
    return jobs


def _rows_and_activations(store: Store, job_id: int) -> dict:
    job = store.get_job(job_id)
    acts = load_consolidated(Path(job.stats["activations"]))
    index = {rid: i for i, rid in enumerate(acts["response_ids"].tolist())}
    return {
        r.key: (r.answer_ids, {k: acts[k][index[r.id]] for k in ("response_avg", "prompt_last")})
        for r in store.responses(job=job_id)
    }


def test_the_plans_jobs_share_one_queue_and_equal_each_job_alone(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    streams = []
    real = DecodeEngine.stream

    def counted(self, requests, *args, **kwargs):
        streams.append(len(requests))
        return real(self, requests, *args, **kwargs)

    monkeypatch.setattr(DecodeEngine, "stream", counted)
    with Store(tmp_path / "shared.db") as store:
        jobs = _plan(store, tiny_model_dir)
        messages: dict[int, set[str]] = {}

        def progress_for(job_id: int):
            return lambda update: messages.setdefault(job_id, set()).add(update.message)

        run_generation_jobs(store.path, jobs, on_progress=progress_for)
        shared = [store.get_job(j) for j in jobs]
        shared_rows = [_rows_and_activations(store, j) for j in jobs]
    assert streams == [20 + 20 + 20 + 20], "the four jobs did not run as one queue"
    assert [j.status for j in shared] == ["done"] * 4
    for job_id in jobs:
        others = ", ".join(str(j) for j in jobs if j != job_id)
        assert any(f"one queue with job {others})" in m for m in messages[job_id])
    assert [j.done for j in shared] == [20, 20, 20, 20]
    with Store(tmp_path / "alone.db") as store:
        jobs = _plan(store, tiny_model_dir)
        for job_id in jobs:
            run_job(store.path, job_id)
        alone_rows = [_rows_and_activations(store, j) for j in jobs]
    for together, single in zip(shared_rows, alone_rows, strict=True):
        assert together.keys() == single.keys()
        for key, (answer, acts) in together.items():
            assert answer == single[key][0]
            for kind, value in acts.items():
                torch.testing.assert_close(value, single[key][1][kind], rtol=1e-4, atol=1e-5)


def test_jobs_that_differ_in_sampling_run_one_after_another(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    streams = []
    real = DecodeEngine.stream
    monkeypatch.setattr(
        DecodeEngine,
        "stream",
        lambda self, requests, *a, **k: (
            streams.append(len(requests)) or real(self, requests, *a, **k)
        ),
    )
    with Store(tmp_path / "p.db") as store:
        jobs = _plan(store, tiny_model_dir)[:1]
        other = GenerateParams(
            side="neg", model=str(tiny_model_dir), n_per_question=1, max_new_tokens=7,
            batch_size=6, device="cpu",
        )  # fmt: skip
        jobs.append(find_or_create_job(store, "paternalism", other))
        assert not can_share_engine([store.get_job(j).params for j in jobs])
        run_generation_jobs(store.path, jobs)
        assert [store.get_job(j).status for j in jobs] == ["done", "done"]
    assert streams == [20, 20]


def _after_six_rows(monkeypatch: pytest.MonkeyPatch, job_id: int, action) -> Any:
    """Run ``action`` after each write of ``job_id``'s rows once it has six; returns the real
    writer (to put back)."""
    real = _JobWriter.write

    def write_then_act(self) -> None:
        real(self)
        if self.share.job_id == job_id and self.share.progress.done >= 6:
            action()

    monkeypatch.setattr(_JobWriter, "write", write_then_act)
    return real


def test_cancelling_one_job_stops_its_queue_and_a_rerun_resumes_both(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(tmp_path / "c.db") as store:
        jobs = _plan(store, tiny_model_dir)[:2]
        cancelled, other = jobs
        real = _after_six_rows(monkeypatch, cancelled, lambda: cancel(store, cancelled))
        run_generation_jobs(store.path, jobs)
        first, second = store.get_job(cancelled), store.get_job(other)
        assert first.status == "cancelled"
        assert second.status == "failed"
        assert second.message == (
            f"stopped: job {cancelled}, which shared its queue, was cancelled; rerun to resume"
        )
        assert first.done < 20 and second.done < 20
        monkeypatch.setattr(_JobWriter, "write", real)
        run_generation_jobs(store.path, jobs)
        for job_id in jobs:
            job = store.get_job(job_id)
            keys = [r.key for r in store.responses(job=job_id)]
            assert (job.status, job.done, len(keys), len(set(keys))) == ("done", 20, 20, 20)


def test_an_error_ends_every_job_of_the_queue(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        yield  # a generator, as the real stream

    monkeypatch.setattr(DecodeEngine, "stream", out_of_memory)
    with Store(tmp_path / "e.db") as store:
        jobs = _plan(store, tiny_model_dir)[:2]
        with pytest.raises(PersonaError, match="--batch-size 6"):
            run_generation_jobs(store.path, jobs)
        for job_id in jobs:
            job = store.get_job(job_id)
            assert job.status == "failed" and "lower --batch-size" in job.message


def test_a_job_taken_over_mid_queue_ends_its_queue_mates_with_the_reason(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job of a shared queue taken over by another worker (its row names another pid, as
    after a resume while this worker was still stopping): this worker leaves that row alone
    and ends the queue-mates failed with why, resumable, where it used to leave them running
    until the reaper called them dead. Cancelling names the queue-mates."""
    import os

    from pipeline.job_processes import cancel_notice

    with Store(tmp_path / "t.db") as store:
        jobs = _plan(store, tiny_model_dir)[:2]
        taken, other = jobs
        # Another live process takes the job.
        _after_six_rows(monkeypatch, taken, lambda: store.update_job(taken, pid=os.getppid()))
        run_generation_jobs(store.path, jobs)
        first, second = store.get_job(taken), store.get_job(other)
        assert (first.status, first.pid) == ("running", os.getppid())  # left alone
        assert second.status == "failed"
        assert second.message == (
            f"stopped: job {taken} was taken over by pid {os.getppid()}, and this job shared "
            "its queue; rerun to resume"
        )
        store.update_job(taken, status="running", pid=4321)
        store.update_job(other, status="running", pid=4321)
        assert cancel_notice(taken, cancel(store, taken)) == (
            f"job {taken}: cancel requested; it stops after its current batch; job {other}, "
            "in the same worker, stops with it (resume it to finish)"
        )
        assert cancel(store, other) == []  # the first is cancelled already
