"""Several processes on one database: the job lock (pid, host, heartbeat), a second worker
refused, stale locks taken over, and the dashboard reading while two workers write.

``PERSONA_SOAK_SECONDS`` lengthens the dashboard test (default 15 s; the issue's "minutes"
is a manual run: PERSONA_SOAK_SECONDS=300 pytest tests/test_concurrency.py -k soak)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fake_rows import seed_generation
from stub_openai import StubServer, logprob_completion

from db import PersonaError, Store
from pipeline import jobs as jobs_module
from pipeline.job_processes import cancel, start_worker
from pipeline.jobs import (
    Heartbeat,
    JobLockedError,
    JobProgress,
    JobTakenOver,
    claim_job,
    lock_holder,
    this_host,
)
from pipeline.judging import JudgeParams, find_or_create_judge_job
from tui.app import PersonaApp
from tui.screens.error import ErrorModal

ROOT = Path(__file__).resolve().parents[1]


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture()
def sleeper():
    """A live process that is not ours to own: a stand-in for another worker."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def _running(store: Store, pid: int, heartbeat: str, host: str | None = None) -> int:
    job = store.create_job("generate", "paternalism", {"side": "pos"})
    store.update_job(job.id, status="running", pid=pid, heartbeat=heartbeat, host=host)
    return job.id


# ---- the lock -----------------------------------------------------------------------------
def test_a_live_beating_worker_holds_its_job(store: Store, sleeper: int) -> None:
    job_id = _running(store, sleeper, _ago(1), this_host())
    assert f"pid {sleeper} on {this_host()}" in lock_holder(store.get_job(job_id))
    with pytest.raises(JobLockedError, match=rf"job {job_id} is already running \(pid {sleeper}"):
        claim_job(store, job_id)
    assert store.get_job(job_id).pid == sleeper  # the refused claim changed nothing


@pytest.mark.parametrize(
    ("case", "heartbeat_age", "host"),
    [
        ("dead pid, fresh heartbeat", 1, None),
        ("live pid, stale heartbeat (hung, or the pid was reused)", 120, None),
        ("another host, stale heartbeat", 120, "elsewhere"),
        ("never beat", None, None),
    ],
)
def test_a_stale_lock_is_taken_over(
    store: Store, sleeper: int, case: str, heartbeat_age, host
) -> None:
    pid = _dead_pid() if case.startswith("dead") else sleeper
    heartbeat = None if heartbeat_age is None else _ago(heartbeat_age)
    job_id = _running(store, pid, heartbeat, host)
    assert lock_holder(store.get_job(job_id)) is None, case
    claim_job(store, job_id)
    job = store.get_job(job_id)
    assert (job.status, job.pid, job.host) == ("running", os.getpid(), this_host())


def test_another_host_is_trusted_while_it_beats(store: Store) -> None:
    # Its pid means nothing here: only the heartbeat tells.
    job_id = _running(store, _dead_pid(), _ago(2), "gpu-node-7")
    assert "on gpu-node-7" in lock_holder(store.get_job(job_id))
    with pytest.raises(JobLockedError):
        claim_job(store, job_id)


def test_the_heartbeat_thread_beats_and_notices_a_takeover(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_module, "HEARTBEAT_SECONDS", 0.05)
    job = store.create_job("generate", "paternalism", {"side": "pos"})
    claim_job(store, job.id)
    first = store.get_job(job.id).heartbeat
    with Heartbeat(store.path, job.id) as beat:
        deadline = time.monotonic() + 10
        while store.get_job(job.id).heartbeat == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.get_job(job.id).heartbeat > first
        store.update_job(job.id, pid=os.getpid() + 1)  # another worker took it over
        while not beat.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        assert beat.lost
    with pytest.raises(JobTakenOver):
        JobProgress(store, job.id, total=1).check_cancelled()


# ---- processes ----------------------------------------------------------------------------
def _judge_reply(path: str, body: dict):
    value = str(len(body["messages"][0]["content"]) % 101)
    return 200, logprob_completion([(value, math.log(0.9)), ("7", math.log(0.1))]), {}


def _wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_second_worker_on_the_same_job_refuses(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    with StubServer(_judge_reply, latency_s=0.2) as server, Store(db_path) as store:
        seed_generation(store, 15)
        params = JudgeParams(judge="openai:stub", base_url=server.base_url, max_concurrent=1)
        job_id = find_or_create_judge_job(store, "paternalism", params)
        first = start_worker(store, job_id)
        _wait_until(lambda: store.db["judgments"].count > 0)
        second = subprocess.run(
            [sys.executable, "-m", "tui.cli", "--db", str(db_path), "worker", str(job_id)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert second.returncode == 2
        message = second.stderr.strip()
        assert message.startswith(f"error: job {job_id} is already running (pid {first} on ")
        assert f"persona jobs cancel {job_id}" in message and len(message.splitlines()) == 1
        job = store.get_job(job_id)
        assert (job.status, job.pid) == ("running", first)  # the refusal touched nothing
        with pytest.raises(Exception, match="already running"):
            start_worker(store, job_id)  # the dashboard's path refuses too
        _wait_until(lambda: store.get_job(job_id).status != "running", timeout=120)
        assert store.get_job(job_id).status == "done"
        assert store.db["judgments"].count == 30
    os.waitpid(first, 0)


async def test_soak_the_dashboard_reads_while_two_workers_write(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    soak_s = float(os.environ.get("PERSONA_SOAK_SECONDS", "15"))
    per_side = int(2000 * max(1.0, soak_s / 15))  # enough work to outlast the soak
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    with StubServer(_judge_reply, latency_s=0.005) as server:
        with Store(db_path) as store:
            jobs = []
            for trait in ("paternalism", "deception"):
                for side in ("pos", "neg"):  # pairs, so the review screen has rows
                    seed_generation(
                        store,
                        per_side,
                        trait=trait,
                        side=side,
                        answer=lambda i, t=trait, s=side: f"{t} {s} answer {i}",
                    )
                params = JudgeParams(
                    judge="openai:stub", base_url=server.base_url, max_concurrent=8
                )
                jobs.append(find_or_create_judge_job(store, trait, params))
            pids = [start_worker(store, job_id) for job_id in jobs]
        app = PersonaApp(db_path, trait="paternalism")
        errors: list[tuple[str, str]] = []
        real_show_error = app.show_error

        def record(title: str, message: str) -> None:
            errors.append((title, message))
            real_show_error(title, message)

        app.show_error = record
        async with app.run_test(size=(120, 36)) as pilot:
            deadline = time.monotonic() + soak_s
            keys = ["2", "3", "j", "j", "4", "1", "j", "2", "3", "k"]
            presses = 0
            slowest = 0.0
            while time.monotonic() < deadline:
                started = time.monotonic()
                await pilot.press(keys[presses % len(keys)])
                presses += 1
                await pilot.pause(0.2)
                slowest = max(slowest, time.monotonic() - started)
                assert not isinstance(app.screen, ErrorModal), errors
            with Store(db_path) as store:
                written = store.db["judgments"].count
                for job_id in jobs:
                    if store.get_job(job_id).status in ("pending", "running"):
                        cancel(store, job_id)
        assert not errors, errors
    for pid in pids:
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with Store(db_path) as store:
        for job_id in jobs:
            job = store.get_job(job_id)
            assert job.status in ("cancelled", "done"), job.message
            assert "locked" not in job.message
        log_text = "".join(
            (store.data_dir / "logs" / f"job-{job_id}.log").read_text() for job_id in jobs
        )
    assert "database is locked" not in log_text and "Traceback" not in log_text
    assert written > 200, f"the workers wrote only {written} judgments in {soak_s} s"
    # The dashboard kept answering keys: never frozen for seconds by the writers.
    assert presses >= 5 and slowest < 5.0, (presses, slowest)


def test_jobs_list_shows_a_dead_workers_job_as_failed(db_path: Path, capsys) -> None:
    """`persona jobs list` reaps as the dashboard does: one reaper for every reader."""
    from tui.cli import main

    with Store(db_path) as store:
        job_id = _running(store, _dead_pid(), _ago(2), this_host())
    assert main(["--db", str(db_path), "jobs", "list"]) == 0
    printed = capsys.readouterr().out
    assert "failed" in printed and "running" not in printed
    with Store(db_path) as store:
        job = store.get_job(job_id)
    assert job.status == "failed" and "worker process died" in job.message


def test_jobs_started_together_are_all_refused_when_one_is_running(db_path: Path) -> None:
    """Two generation jobs for one process (the dashboard's both sides): if either is held by
    a live worker, the start is refused with that job's one-line reason and neither job is
    touched (no status written, no process, no log)."""
    from pipeline.job_processes import log_path
    from pipeline.jobs import utc_now

    with Store(db_path) as store:
        first = store.create_job("generate", "paternalism", {"side": "pos"})
        second = store.create_job("generate", "paternalism", {"side": "neg"})
        # A state start_worker would overwrite (status, message, start and end, pid).
        store.update_job(first.id, status="failed", message="an earlier error", pid=2**22 + 7)
        store.update_job(first.id, started=utc_now(), ended=utc_now())
        before = store.get_job(first.id)
        store.update_job(second.id, status="running", pid=os.getpid(), heartbeat=utc_now())
        with pytest.raises(Exception, match=f"job {second.id} is already running"):
            start_worker(store, [first.id, second.id])
        assert store.get_job(first.id) == before
        assert not log_path(store, first.id).exists() and not log_path(store, second.id).exists()


def test_a_two_job_worker_that_fails_before_its_claims_fails_both_jobs(
    db_path: Path, tiny_model_dir: Path
) -> None:
    """The dashboard's both-sides worker checks its devices before it claims either job: an
    error there (``--gpus`` naming a GPU that is not there) used to leave both rows pending
    for good, as no reaper looks at pending rows. Both now end failed with the error,
    resumable. Jobs that run one after another (they cannot share an engine): the first
    ends with its error, the rest as not started; a row another process holds is left."""
    from pipeline.generate import GenerateParams, find_or_create_job
    from pipeline.worker_main import run_worker

    def pending_jobs(store: Store, split: str, pid: int) -> list[int]:
        jobs = []
        for side in ("pos", "neg"):
            params = GenerateParams(
                side=side, split=split, model=str(tiny_model_dir), n_per_question=1, gpus="7"
            )
            jobs.append(find_or_create_job(store, "paternalism", params))
            store.update_job(jobs[-1], status="pending", pid=pid)  # as start_worker leaves it
        return jobs

    with Store(db_path) as store:
        together = pending_jobs(store, "extract", os.getpid())
    with pytest.raises(Exception, match="--gpus 7") as raised:
        run_worker(db_path, together)
    reason = f"not started: {raised.value}; resume it to run it"
    with Store(db_path) as store:
        for job_id in together:
            job = store.get_job(job_id)
            assert (job.status, job.message) == ("failed", reason) and job.ended is not None
        first = store.create_job("generate", "paternalism", {"side": "pos", "model": "none"})
        store.update_job(first.id, status="pending", pid=os.getpid())
        rest = pending_jobs(store, "eval", os.getpid())
        store.update_job(rest[1], pid=os.getpid() + 1)  # another process's by now
    with pytest.raises(PersonaError):
        run_worker(db_path, [first.id, *rest])  # other params: one after another
    with Store(db_path) as store:
        assert store.get_job(first.id).status == "failed"
        assert not store.get_job(first.id).message.startswith("not started")
        assert store.get_job(rest[0]).message.startswith("not started: ")
        assert store.get_job(rest[1]).status == "pending"
