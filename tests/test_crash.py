"""Crash safety: generation and judging workers SIGKILLed at seeded random moments and resumed
each time end with the same database as an uninterrupted run; torn activation files are set
aside and rebuilt; a full disk stops a job with a clear error and loses nothing."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from fake_rows import seed_generation
from stub_openai import StubServer, logprob_completion

import vectors.activations as activations_module
from db import Store
from db.traits import fill_judge_template
from pipeline.generate import GenerateParams, find_or_create_job
from pipeline.job_processes import start_worker
from pipeline.jobs import pid_alive, run_job
from pipeline.judge_scores import COHERENCE_PROMPT
from pipeline.judging import JudgeParams, find_or_create_judge_job
from pipeline.response_means import activations_dir
from tui.cli import main as cli_main
from vectors.activations import CONSOLIDATED, load_consolidated, read_shards

KILLS = 10


def _wait(pid: int, timeout: float) -> bool:
    """Reap the worker if it exits within ``timeout``; True when it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        time.sleep(0.02)
    return False


def _run_to_end(db_path: Path, job_id: int, count=None) -> tuple[float, float]:
    """One uninterrupted worker run; returns (seconds until ``count(store)`` first grew,
    seconds after that) when ``count`` is given."""
    start = time.monotonic()
    first = None
    with Store(db_path) as store:
        pid = start_worker(store, job_id)
        while not _wait(pid, 0.05):
            if first is None and count is not None and count(store) > 0:
                first = time.monotonic()
            assert time.monotonic() - start < 300, "the worker did not finish"
        job = store.get_job(job_id)
    assert job.status == "done", job.message
    end = time.monotonic()
    first = first or end
    return first - start, end - first


def _kill_and_resume(
    db_path: Path, job_id: int, seed: int, count, total: int, timing: tuple[float, float], check
) -> int:
    """SIGKILL the job's worker KILLS times at seeded random moments, calling
    ``check(store)`` after each kill, then let it finish; returns the kills made. Three kills
    fall in the worker's start-up, the others a little after ``count(store)`` passes random
    points of ``total``: mid-batch, mid-write, mid-commit. ``timing`` is the start-up and
    work seconds of an uninterrupted run."""
    rng = random.Random(seed)
    startup, work = timing
    targets = sorted(rng.uniform(0.05, 0.7) * total for _ in range(KILLS - 3))
    plan = [None] * 3 + targets
    rng.shuffle(plan)
    kills = 0
    for target in plan:
        with Store(db_path) as store:
            pid = start_worker(store, job_id)
            if target is None:
                finished = _wait(pid, startup * rng.uniform(0.2, 0.9))
            else:
                finished = False
                while count(store) < target and not finished:
                    finished = _wait(pid, 0.02)
                finished = finished or _wait(pid, rng.uniform(0.0, 0.05 * work))
            if finished:
                assert store.get_job(job_id).status == "done"
                break
        os.kill(pid, signal.SIGKILL)
        assert _wait(pid, 30)
        kills += 1
        with Store(db_path) as store:
            check(store)
    _run_to_end(db_path, job_id)
    return kills


# ---- generation ----------------------------------------------------------------------------
def _generation_params(tiny_model_dir: Path) -> GenerateParams:
    # One slot, so rows land one at a time: with continuous batching two slots finish the
    # 60 rows in well under a second, between two looks of a poller on 2 busy cores.
    return GenerateParams(
        side="pos",
        model=str(tiny_model_dir),
        n_per_question=3,
        max_new_tokens=48,
        batch_size=1,
    )


def _rows_have_activations(store: Store, job_id: int) -> None:
    """Every stored row has its activations on disk (shards are written before rows commit)."""
    folder = activations_dir(store, job_id)
    captured = set(read_shards(folder)[0]) if folder.exists() else set()
    if (folder / CONSOLIDATED).exists():
        captured |= {tuple(k) for k in load_consolidated(folder / CONSOLIDATED)["keys"].tolist()}
    stored = store.response_keys(job_id)
    assert stored <= captured, f"{len(stored - captured)} stored rows lack activations"
    assert not list(folder.glob("*.torn")), "a kill left a torn activation file"


def _activations_by_key(store: Store, job_id: int) -> dict[tuple, dict[str, torch.Tensor]]:
    tensors = load_consolidated(Path(store.get_job(job_id).stats["activations"]))
    by_id = {r.id: r for r in store.responses(job=job_id)}
    assert sorted(tensors["response_ids"].tolist()) == sorted(by_id)
    out = {}
    for row, rid in enumerate(tensors["response_ids"].tolist()):
        response = by_id[rid]
        assert tuple(tensors["keys"][row].tolist()) == response.key
        assert int(tensors["response_tokens"][row]) == len(response.answer_ids)
        out[response.key] = {k: tensors[k][row].float() for k in activations_module.KINDS}
    return out


def test_generation_killed_ten_times_equals_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    params = _generation_params(tiny_model_dir)
    clean_db, killed_db = tmp_path / "clean.db", tmp_path / "killed.db"
    with Store(clean_db) as store:
        clean_id = find_or_create_job(store, "deception", params)
    timing = _run_to_end(clean_db, clean_id, lambda store: len(store.response_keys(clean_id)))
    with Store(killed_db) as store:
        job_id = find_or_create_job(store, "deception", params)
    kills = _kill_and_resume(
        killed_db,
        job_id,
        seed=8,
        count=lambda store: len(store.response_keys(job_id)),
        total=60,
        timing=timing,
        check=lambda store: _rows_have_activations(store, job_id),
    )
    assert kills == KILLS
    with Store(killed_db) as killed, Store(clean_db) as clean:
        got, want = killed.responses(job=job_id), clean.responses(job=clean_id)
        assert len(got) == len(want) == 60
        assert len({r.key for r in got}) == 60  # no duplicates
        assert {r.key: (r.answer_ids, r.answer) for r in got} == {
            r.key: (r.answer_ids, r.answer) for r in want
        }
        got_acts = _activations_by_key(killed, job_id)
        want_acts = _activations_by_key(clean, clean_id)
        for key, entry in want_acts.items():
            for kind, value in entry.items():
                torch.testing.assert_close(got_acts[key][kind], value, atol=2e-2, rtol=2e-2)
        assert not list(activations_dir(killed, job_id).glob("shard-*"))


# ---- judging ------------------------------------------------------------------------------
def _deterministic_judge(path: str, body: dict):
    """A score that depends only on the prompt, with a refusal now and then."""
    digest = hashlib.sha256(body["messages"][0]["content"].encode()).digest()
    if digest[0] < 20:
        return 200, logprob_completion([("I", math.log(0.9)), ("5", math.log(0.1))]), {}
    value = str(digest[1] % 101)
    return 200, logprob_completion([(value, math.log(0.8)), ("50", math.log(0.2))]), {}


def _judgment_table(store: Store) -> dict[tuple, tuple]:
    rows = store.db.query(
        "SELECT r.question, r.instruction, r.sample, j.metric, j.score, j.error "
        "FROM judgments j JOIN responses r ON r.id = j.response ORDER BY j.id"
    )
    table: dict[tuple, tuple] = {}
    for row in rows:
        key = (row["question"], row["instruction"], row["sample"], row["metric"])
        assert key not in table, f"duplicate judgment {key}"
        table[key] = (row["score"], row["error"])
    return table


def _stored_prompts(store: Store) -> set[str]:
    templates = {"trait": store.get_trait("paternalism").eval_prompt, "coherence": COHERENCE_PROMPT}
    rows = store.db.query(
        "SELECT r.question_text, r.answer, j.metric FROM judgments j "
        "JOIN responses r ON r.id = j.response"
    )
    return {
        fill_judge_template(templates[r["metric"]], r["question_text"], r["answer"]) for r in rows
    }


def test_judging_killed_ten_times_equals_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    clean_db, killed_db = tmp_path / "clean.db", tmp_path / "killed.db"
    with StubServer(_deterministic_judge, latency_s=0.03) as server:
        params = JudgeParams(judge="openai:stub-judge", base_url=server.base_url, max_concurrent=4)
        ids = {}
        for path in (clean_db, killed_db):
            with Store(path) as store:
                seed_generation(store, 100, answer=lambda i: f"Answer {i}: {'yes ' * (i % 7)}")
                ids[path] = find_or_create_judge_job(store, "paternalism", params)
        timing = _run_to_end(clean_db, ids[clean_db], lambda store: store.db["judgments"].count)
        snapshots: list[tuple[int, set[str]]] = []

        def check(store: Store) -> None:
            _judgment_table(store)  # no duplicates
            snapshots.append((len(server.requests), _stored_prompts(store)))

        kills = _kill_and_resume(
            killed_db,
            ids[killed_db],
            seed=4,
            count=lambda store: store.db["judgments"].count,
            total=200,
            timing=timing,
            check=check,
        )
        asked = [r["messages"][0]["content"] for r in server.requests]
    assert kills == KILLS
    assert any(stored for _n, stored in snapshots), "no kill landed after the first writes"
    # A resume never asks again what was stored before the kill.
    for sent_before, stored in snapshots:
        assert not stored & set(asked[sent_before:])
    with Store(killed_db) as killed, Store(clean_db) as clean:
        got, want = _judgment_table(killed), _judgment_table(clean)
        assert len(want) == 200 and got == want
        assert all(error is None for _score, error in got.values())
        job = killed.get_job(ids[killed_db])
        assert (job.status, job.done, job.total) == ("done", 200, 200)


# ---- torn files and a full disk ------------------------------------------------------------
def _interrupt_consolidation_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first consolidation dies (as a kill right after the last batch would)."""
    real = activations_module.consolidate
    calls = {"n": 0}

    def consolidate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(activations_module, "consolidate", consolidate)


def test_a_torn_shard_is_set_aside_and_its_rows_rebuilt(
    store: Store, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = GenerateParams(
        side="pos", model=str(tiny_model_dir), n_per_question=1, max_new_tokens=12, batch_size=4
    )
    job_id = find_or_create_job(store, "paternalism", params)
    _interrupt_consolidation_once(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_job(store.path, job_id)
    folder = activations_dir(store, job_id)
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert len(shards) == 5
    # Copied out: the loaded tensors map the files, and the victim is cut below.
    intact = {
        key: {kind: value.clone() for kind, value in entry.items()}
        for key, entry in read_shards(folder)[0].items()
    }
    victim = shards[2]
    victim_keys = {tuple(k) for k in activations_module._load(victim)["keys"].tolist()}
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a torn write

    run_job(store.path, job_id)
    job = store.get_job(job_id)
    assert job.status == "done"
    assert "rebuilt the activations of 4 responses" in job.message
    assert "1 unreadable activation files set aside" in job.message
    assert (folder / (victim.name + ".torn")).exists()
    rebuilt = _activations_by_key(store, job_id)
    for key in victim_keys:  # the forward pass gives the captured means again
        for kind in activations_module.KINDS:
            torch.testing.assert_close(
                rebuilt[key][kind], intact[key][kind].float(), atol=2e-2, rtol=2e-2
            )


def test_a_torn_consolidated_file_is_never_used(
    store: Store, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    params = GenerateParams(
        side="neg", model=str(tiny_model_dir), n_per_question=1, max_new_tokens=8, batch_size=8
    )
    job_id = find_or_create_job(store, "paternalism", params)
    run_job(store.path, job_id)
    path = Path(store.get_job(job_id).stats["activations"])
    before = _activations_by_key(store, job_id)
    path.write_bytes(path.read_bytes()[:-100])
    run_job(store.path, job_id)  # a resume finds nothing to generate, but checks the file
    assert "rebuilt the activations of 20 responses" in store.get_job(job_id).message
    after = _activations_by_key(store, job_id)
    for key, entry in before.items():
        for kind, value in entry.items():
            torch.testing.assert_close(after[key][kind], value, atol=2e-2, rtol=2e-2)


def test_full_disk_while_writing_activations(
    store: Store, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    params = GenerateParams(
        side="pos", model=str(tiny_model_dir), n_per_question=1, max_new_tokens=8, batch_size=4
    )
    job_id = find_or_create_job(store, "paternalism", params)
    real_save = activations_module.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(filename).write_bytes(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(activations_module, "save_file", save_file)
    assert cli_main(["--db", str(store.path), "worker", str(job_id)]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: could not write activation file")
    assert "No space left on device" in stderr and "free disk space and resume" in stderr
    assert len(stderr.splitlines()) == 1
    job = store.get_job(job_id)
    assert job.status == "failed" and "No space left on device" in job.message
    # The two batches written before the failure are kept; the third was not stored.
    assert len(store.response_keys(job_id)) == 8
    folder = activations_dir(store, job_id)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "a temp file was left"

    monkeypatch.setattr(activations_module, "save_file", real_save)
    run_job(store.path, job_id)
    assert store.get_job(job_id).status == "done"
    assert len(_activations_by_key(store, job_id)) == 20


def test_a_file_error_outside_the_disk_is_still_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "acts"
    folder.mkdir()
    (folder / "shard-000000.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(activations_module.ActivationFileError, match="no captured activations"):
        activations_module.consolidate(folder, {(0, 0, 0): 1})
    assert (folder / "shard-000000.safetensors.torn").exists()


def test_client_processes_stop_when_their_worker_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed judging worker must not leave its client processes spending API calls."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    db_path = tmp_path / "persona.db"
    with StubServer(_deterministic_judge, latency_s=0.3) as server:
        with Store(db_path) as store:
            seed_generation(store, 200)
            params = JudgeParams(
                judge="openai:stub", base_url=server.base_url, max_concurrent=4, processes=2
            )
            pid = start_worker(store, find_or_create_judge_job(store, "paternalism", params))
        children: list[int] = []
        deadline = time.monotonic() + 60
        while len(children) < 2 and time.monotonic() < deadline:
            path = Path(f"/proc/{pid}/task/{pid}/children")
            children = [int(c) for c in path.read_text().split()] if path.exists() else []
            time.sleep(0.05)
        assert len(children) == 2, "the worker did not start its client processes"
        while len(server.requests) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        assert _wait(pid, 30)
        deadline = time.monotonic() + 20
        while any(pid_alive(c) for c in children):  # a zombie counts as gone
            assert time.monotonic() < deadline, "client processes outlived their worker"
            time.sleep(0.1)
        asked = len(server.requests)
        time.sleep(1.0)
        assert len(server.requests) == asked  # nothing asked after they stopped
