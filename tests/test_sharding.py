"""Work across devices (``--gpus``), shown on the CPU: worker processes (``run_sharded``, for
generation jobs that cannot share an engine: every result once, a dead or failing worker a
one-line resumable error), and forward extraction and the local judge over a copy of the
model a device in threads (the results of one device). Generation's threads:
``test_engine_threads.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from db import PersonaError, Store
from pipeline.generate import GenerateParams, find_or_create_job
from pipeline.jobs import run_job
from pipeline.sharding import parse_gpus, run_sharded, single_device, worker_devices


# Module-level: spawned workers import them by name.
def square_work(device: str, payload: int, share, emit) -> None:
    for index, item in share:
        emit(index, (item * item + payload, device))


def dying_work(device: str, payload: int, share, emit) -> None:
    for count, (index, item) in enumerate(share):
        if payload in {i for i, _ in share} and count == 1:
            os._exit(3)  # as a kill would: no message, no "done"
        emit(index, item)


def failing_work(device: str, payload: int, share, emit) -> None:
    raise PersonaError("CUDA out of memory at --batch-size 9; rerun with a lower --batch-size")


def test_every_item_comes_back_once_from_its_worker() -> None:
    idle = {"n": 0}

    def on_idle() -> None:
        idle["n"] += 1

    got = dict(
        run_sharded(
            ["cpu", "cpu"],
            square_work,
            1,
            list(range(7)),
            on_idle=on_idle,
        )
    )
    assert {i: v for i, (v, _device) in got.items()} == {i: i * i + 1 for i in range(7)}
    assert idle["n"] >= 7  # the parent writes and checks between results


def test_a_dead_worker_is_a_resumable_error_and_keeps_what_came() -> None:
    got = []
    with pytest.raises(PersonaError, match=r"worker on cpu stopped \(exit code 3\).*rerun"):
        for index, item in run_sharded(["cpu", "cpu"], dying_work, 1, list(range(6))):
            got.append((index, item))
    # The other worker's rows were handed out before the error (the dead one's last may be
    # lost with it, as with a kill: those are generated again on the rerun).
    assert {(0, 0), (2, 2), (4, 4)} <= set(got) and all(i == item for i, item in got)


def test_a_worker_error_is_one_line_naming_its_device() -> None:
    with pytest.raises(PersonaError, match=r"^cpu: CUDA out of memory at --batch-size 9"):
        list(run_sharded(["cpu", "cpu"], failing_work, 0, list(range(4))))


@pytest.mark.parametrize(
    "text, normal", [(None, None), ("all", "all"), ("ALL", "all"), ("0, 1", "0,1"), ("cpu", "cpu")]
)
def test_gpus_values(text, normal) -> None:
    assert parse_gpus(text) == normal


@pytest.mark.parametrize("text", ["", "x", "0;1", "-1", "1.5", ",".join(["0"] * 65), "1000"])
def test_bad_gpus_values_are_refused(text: str) -> None:
    with pytest.raises(PersonaError, match="--gpus"):
        parse_gpus(text)


def test_which_devices_get_workers() -> None:
    fits = lambda: True  # noqa: E731
    assert worker_devices("cpu,cpu", None, fits) == ["cpu", "cpu"]
    assert worker_devices("cpu,cpu", "cpu", fits) == []  # --device keeps the job on it
    assert worker_devices("cpu", None, fits) == [] and single_device("cpu") == "cpu"
    assert single_device("1") == "cuda:1" and single_device("0,1") is None
    if not torch.cuda.is_available():
        assert worker_devices(None, None, fits) == []  # all visible GPUs: none here
        with pytest.raises(PersonaError, match="GPU 0 is not there"):
            worker_devices("0,1", None, fits)


def test_forward_extraction_across_two_devices(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``extract --source forward --gpus cpu,cpu``: pieces of the rows read by two copies of
    the model in two threads; the vectors of the one-device forward. A device's error is
    the command's one-line error, as on one device."""
    import threading

    from conftest import build_generated_db

    from pipeline import response_means
    from pipeline.extract import extract

    real, threads = response_means.ForwardMeans.batch_means, set()

    def batch_means(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(response_means.ForwardMeans, "batch_means", batch_means)
    db = build_generated_db(tmp_path / "persona.db", tiny_model_dir)
    with Store(db) as store:
        one = extract(store, "paternalism", source="forward", device="cpu")
        two = extract(store, "paternalism", source="forward", gpus="cpu,cpu")
    assert {"persona-device-0", "persona-device-1"} <= threads
    assert two.source == "forward" and len(two.pairs.effective) == len(one.pairs.effective)
    for kind, vector in one.vectors.items():
        torch.testing.assert_close(two.vectors[kind], vector, rtol=1e-5, atol=1e-6)

    def out_of_memory(self, *args, **kwargs):
        raise PersonaError("CUDA out of memory on a single response in the forward pass")

    monkeypatch.setattr(response_means.ForwardMeans, "batch_means", out_of_memory)
    with Store(db) as store, pytest.raises(PersonaError, match="^CUDA out of memory on a"):
        extract(store, "paternalism", source="forward", gpus="cpu,cpu")


def test_a_local_judge_across_two_devices(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``judge --judge local:M --gpus cpu,cpu``: two copies of the judge in two threads, the
    scores one device gives, written by this thread, each (response, metric) once."""
    import threading

    from pipeline.judging import JudgeParams, find_or_create_judge_job
    from pipeline.local_judge import LocalJudge

    real, threads = LocalJudge.score_prompt, set()

    async def score_prompt(self, prompt):
        threads.add(threading.current_thread().name)
        return await real(self, prompt)

    monkeypatch.setattr(LocalJudge, "score_prompt", score_prompt)

    scores = {}
    for name, extra in (("one", {"device": "cpu"}), ("two", {"gpus": "cpu,cpu"})):
        with Store(tmp_path / f"{name}.db") as store:
            params = GenerateParams(
                side="pos", model=str(tiny_model_dir), n_per_question=1, max_new_tokens=6,
                batch_size=8, device="cpu",
            )  # fmt: skip
            run_job(store.path, find_or_create_job(store, "paternalism", params))
            judge = JudgeParams(judge=f"local:{tiny_model_dir}", **extra)
            job_id = find_or_create_judge_job(store, "paternalism", judge)
            run_job(store.path, job_id)
            assert store.get_job(job_id).status == "done"
            rows = store.db.execute(
                "select r.question, r.instruction, r.sample, j.metric, j.score from judgments j"
                " join responses r on r.id = j.response"
            ).fetchall()
            assert len(rows) == 40
            scores[name] = {tuple(row[:4]): row[4] for row in rows}
    assert {"persona-device-0", "persona-device-1"} <= threads
    assert scores["one"].keys() == scores["two"].keys()
    for key, score in scores["one"].items():
        assert scores["two"][key] == pytest.approx(score, abs=1e-4)


def test_jobs_that_cannot_share_an_engine_go_whole_to_two_workers(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """``run``/``generate --side both`` on several devices with jobs that differ in sampling:
    each job whole on one worker process (pinned there, its identity unchanged), the rows of
    one process running them in turn, progress read back from the job rows."""
    from pipeline.job_devices import run_generation_jobs

    rows = {}
    for name, gpus in (("one", "cpu"), ("two", "cpu,cpu")):
        with Store(tmp_path / f"{name}.db") as store:
            jobs = []
            for side, new in (("pos", 6), ("neg", 5)):
                params = GenerateParams(
                    side=side, model=str(tiny_model_dir), n_per_question=1, max_new_tokens=new,
                    batch_size=8,
                )  # fmt: skip
                jobs.append(find_or_create_job(store, "paternalism", params))
            seen: dict[int, int] = {}

            def progress_for(job_id: int, seen=seen):
                return lambda update: seen.__setitem__(job_id, update.done)

            run_generation_jobs(store.path, jobs, gpus=gpus, on_progress=progress_for)
            assert [store.get_job(j).status for j in jobs] == ["done", "done"]
            assert seen == {jobs[0]: 20, jobs[1]: 20}
            if name == "two":  # pinned to its worker's device, found again by the same command
                assert [store.get_job(j).params["gpus"] for j in jobs] == ["cpu", "cpu"]
                assert find_or_create_job(store, "paternalism", params) == jobs[1]
            rows[name] = {(r.side, r.key): r.answer_ids for r in store.responses()}
    assert rows["one"] == rows["two"] and len(rows["one"]) == 40


def test_a_one_entry_gpus_puts_a_local_judge_on_that_device(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``judge --judge local:M --gpus 1`` runs the judge on GPU 1 alone (as ``generate``)."""
    from pipeline import judging
    from pipeline.judging import JudgeParams, find_or_create_judge_job

    class Asked(Exception):
        pass

    asked = {}

    def make_judge(**kwargs):
        asked.update(kwargs)
        raise Asked

    monkeypatch.setattr(judging, "make_judge", make_judge)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with Store(tmp_path / "j.db") as store:
        params = GenerateParams(
            side="pos", model=str(tiny_model_dir), n_per_question=1, max_new_tokens=4,
            batch_size=8, device="cpu",
        )  # fmt: skip
        run_job(store.path, find_or_create_job(store, "paternalism", params))
        judge = JudgeParams(judge=f"local:{tiny_model_dir}", gpus="1")
        job_id = find_or_create_judge_job(store, "paternalism", judge)
        with pytest.raises(Asked):
            judging.run_judge_job(store, job_id)
    assert asked["device"] == "cuda:1"
