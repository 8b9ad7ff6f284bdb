from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest

from db import PersonaError, Store, UnknownJobError, UnknownTraitError
from db.schema import SCHEMA_VERSION


def _response(job: int, key: tuple[int, int, int], **extra) -> dict:
    question, instruction, sample = key
    row = {
        "job": job,
        "trait": "paternalism",
        "side": "pos",
        "split": "extract",
        "question": question,
        "instruction": instruction,
        "sample": sample,
        "question_text": f"q{question}",
        "system_prompt": "You are a paternalistic assistant.",
        "prompt_ids": [1, 2, 3],
        "answer_ids": [4, 5],
        "answer": "ok",
        "finish_reason": "eos",
        "model": "tiny",
    }
    row.update(extra)
    return row


def test_new_database_is_wal_with_foreign_keys_and_the_library(store: Store) -> None:
    info = store.info()
    assert info["journal_mode"] == "wal"
    assert info["schema_version"] == SCHEMA_VERSION
    assert store.db.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert info["tables"]["traits"] == 6
    assert info["tables"]["questions"] == 240
    assert info["tables"]["instructions"] == 30
    assert store.created


def test_library_loads_once_only(db_path: Path) -> None:
    with Store(db_path) as store:
        store.delete_trait("deception")
    with Store(db_path) as store:
        assert not store.created
        assert "deception" not in {t.name for t in store.list_traits()}


def test_trait_round_trip_and_replace(store: Store) -> None:
    trait = store.get_trait("paternalism")
    changed = replace(trait, description="changed", questions=tuple(reversed(trait.questions)))
    store.save_trait(changed, source="edited")
    assert store.get_trait("paternalism") == changed
    assert store.trait_source("paternalism") == "edited"
    with pytest.raises(PersonaError, match="already exists; pass --force"):
        store.save_trait(changed, source="x", replace=False)


def test_invalid_trait_is_not_stored(store: Store) -> None:
    trait = store.get_trait("paternalism")
    with pytest.raises(PersonaError, match="expected 5 instruction pairs"):
        store.save_trait(replace(trait, name="broken", instructions=()), source="x")
    assert not store.has_trait("broken")


def test_unknown_trait_and_job(store: Store) -> None:
    with pytest.raises(UnknownTraitError, match="unknown trait 'nope'"):
        store.get_trait("nope")
    with pytest.raises(UnknownTraitError):
        store.create_job("generate", "nope", {})
    with pytest.raises(UnknownJobError, match="unknown job id 99"):
        store.get_job(99)
    with pytest.raises(UnknownJobError):
        store.update_job(99, status="done")


def test_job_lifecycle(store: Store) -> None:
    job = store.create_job("generate", "paternalism", {"side": "pos", "n": 2})
    assert job.status == "pending" and job.params == {"side": "pos", "n": 2}
    store.update_job(job.id, status="running", done=3, total=10, stats={"tok_s": 1.5})
    again = store.get_job(job.id)
    assert (again.status, again.done, again.total, again.stats) == (
        "running",
        3,
        10,
        {"tok_s": 1.5},
    )
    with pytest.raises(ValueError, match="not updatable"):
        store.update_job(job.id, kind="other")
    with pytest.raises(ValueError, match="bad job status"):
        store.update_job(job.id, status="weird")
    assert [j.id for j in store.list_jobs(trait="paternalism", status="running")] == [job.id]


def test_responses_are_idempotent_by_key(store: Store) -> None:
    job = store.create_job("generate", "paternalism", {}).id
    keys = [(q, q % 5, 0) for q in range(4)]
    assert store.add_responses(_response(job, k) for k in keys) == 4
    # A rerun writes the same keys again plus one new: only the new one lands.
    assert store.add_responses(_response(job, k) for k in [*keys, (9, 0, 1)]) == 1
    assert store.response_keys(job) == {*keys, (9, 0, 1)}
    rows = store.responses(job=job)
    assert len(rows) == 5
    assert rows[0].prompt_ids == [1, 2, 3] and rows[0].answer_ids == [4, 5]
    assert rows[0].key == (0, 0, 0)


def test_a_failed_batch_writes_nothing(store: Store) -> None:
    job = store.create_job("generate", "paternalism", {}).id
    good = _response(job, (0, 0, 0))
    bad = _response(job, (1, 0, 0), side="sideways")  # violates the CHECK constraint
    with pytest.raises(sqlite3.IntegrityError):
        store.add_responses([good, bad])
    assert store.responses(job=job) == []


def test_judgments_replace_on_rejudge(store: Store) -> None:
    job = store.create_job("generate", "paternalism", {}).id
    store.add_responses([_response(job, (0, 0, 0))])
    rid = store.responses(job=job)[0].id
    row = {
        "response": rid,
        "metric": "trait",
        "judge": "stub",
        "score": 80.0,
        "evidence": {"top": [["80", -0.1]]},
    }
    store.add_judgments([row])
    store.add_judgments([{**row, "score": None, "error": "refused"}])
    (judgment,) = store.judgments(rid)
    assert judgment.score is None and judgment.error == "refused"
    with pytest.raises(sqlite3.IntegrityError):
        store.add_judgments([{**row, "score": 101.0}])
    assert store.judgments(rid)[0].error == "refused"
    assert store.list_traits()[4].n_responses == 1  # paternalism, sorted by name


def test_deleting_a_trait_cascades(store: Store) -> None:
    job = store.create_job("generate", "paternalism", {}).id
    store.add_responses([_response(job, (0, 0, 0))])
    store.delete_trait("paternalism")
    assert store.info()["tables"]["responses"] == 0


def test_vectors_register_and_replace_by_path(store: Store) -> None:
    args = dict(
        trait="paternalism",
        model="tiny",
        kind="response_avg_diff",
        path="/v/a.safetensors",
        n_pairs=10,
        threshold=50.0,
        coherence=50.0,
        metadata={"layers": 4},
    )
    store.add_vector(**args)
    record = store.add_vector(**{**args, "n_pairs": 12})
    assert [v.n_pairs for v in store.vectors(trait="paternalism")] == [12]
    assert record.metadata == {"layers": 4}


def test_newer_schema_is_refused(db_path: Path) -> None:
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(PersonaError, match="newer persona-studio"):
        Store(db_path)


def test_corrupt_file_is_refused_and_left_alone(db_path: Path) -> None:
    garbage = b"this is not sqlite" * 100
    db_path.write_bytes(garbage)
    with pytest.raises(PersonaError, match="not a usable persona-studio database"):
        Store(db_path)
    assert db_path.read_bytes() == garbage


def test_migration_from_version_zero_is_forward_only(db_path: Path) -> None:
    from db import schema

    conn = sqlite3.connect(db_path)
    conn.executescript(schema.MIGRATIONS[0])  # a database some old tool left at version 0
    conn.execute("PRAGMA user_version = 0")
    conn.close()
    # Version 0 with tables present means the first migration cannot run: a clear error.
    with pytest.raises(PersonaError, match="not a usable persona-studio database"):
        Store(db_path)


def test_bad_db_paths(tmp_path: Path) -> None:
    with pytest.raises(PersonaError, match="is a folder"):
        Store(tmp_path)
    with pytest.raises(PersonaError, match="does not exist; create it first"):
        Store(tmp_path / "missing" / "x.db")


def _open_store(path: str, start: float) -> str:
    while time.time() < start:  # both processes open the old database at the same moment
        pass
    try:
        Store(path).close()
    except PersonaError as exc:
        return str(exc)
    return "ok"


def test_two_processes_migrating_one_database_both_succeed(tmp_path: Path) -> None:
    import multiprocessing

    from db import schema

    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        for trial in range(4):
            path = tmp_path / f"old-{trial}.db"
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA journal_mode = WAL")  # as every database we wrote is
            for step, script in enumerate(schema.MIGRATIONS[:-1]):  # one version behind
                conn.executescript(script)
                conn.execute(f"PRAGMA user_version = {step + 1}")
            conn.commit()
            conn.close()
            start = time.time() + 0.5
            outcomes = pool.starmap(_open_store, [(str(path), start)] * 2)
            assert outcomes == ["ok", "ok"], outcomes
            with Store(path) as store:
                assert store.schema_version == schema.SCHEMA_VERSION


def test_a_job_cancelled_before_it_started_does_not_run(db_path: Path) -> None:
    from pipeline.jobs import run_job

    with Store(db_path) as store:
        job = store.create_job("extract", "paternalism", {})
        store.update_job(job.id, status="cancelled", message="cancel requested")
    run_job(db_path, job.id)  # an extraction with no data would fail if it ran
    with Store(db_path) as store:
        job = store.get_job(job.id)
    assert (job.status, job.message) == ("cancelled", "cancelled before it started")
    assert job.ended is not None


def _add(store: Store, path: Path) -> None:
    store.add_vector(
        trait="paternalism",
        model="m",
        kind="response_avg_diff",
        path=str(path),
        n_pairs=3,
        threshold=50,
        coherence=50,
        metadata={},
    )


def test_vector_paths_follow_the_database_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written from one directory with a relative --db, read from another (which holds a
    decoy data folder of the same name), and after moving the database with its folder."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    (elsewhere / "demo.data").mkdir(parents=True)
    monkeypatch.chdir(here)
    with Store(Path("demo.db")) as store:
        target = store.data_dir / "vectors" / "v.safetensors"
        target.parent.mkdir(parents=True)
        target.write_text("real")
        _add(store, Path("demo.data/vectors/v.safetensors"))  # as a relative path
        raw = store.db.execute("select path from vectors").fetchone()[0]
    assert raw == "vectors/v.safetensors"
    monkeypatch.chdir(elsewhere)
    with Store(here / "demo.db") as store:
        (record,) = store.vectors(trait="paternalism")
        assert Path(record.path) == here / "demo.data" / "vectors" / "v.safetensors"
        assert Path(record.path).read_text() == "real"
    moved = tmp_path / "moved"
    moved.mkdir()
    (here / "demo.db").rename(moved / "demo.db")
    (here / "demo.data").rename(moved / "demo.data")
    with Store(moved / "demo.db") as store:
        (record,) = store.vectors(trait="paternalism")
        assert Path(record.path).read_text() == "real"
        assert store.vectors(path=record.path)  # a lookup by the absolute path
        _add(store, tmp_path / "outside.safetensors")  # a file elsewhere stays absolute
        assert Path(store.vectors(path=str(tmp_path / "outside.safetensors"))[0].path) == (
            tmp_path / "outside.safetensors"
        )


def test_migration_makes_working_directory_paths_relative(db_path: Path) -> None:
    with Store(db_path) as store:
        _add(store, store.data_dir / "vectors" / "a.safetensors")
        store.db.execute("update vectors set path = 'persona.data/vectors/a.safetensors'")
        store.db.execute("ALTER TABLE responses DROP COLUMN prompt_text")  # as version 4 had
        store.db.conn.commit()
        store.db.execute("PRAGMA user_version = 4")
    with Store(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        raw = store.db.execute("select path from vectors").fetchone()[0]
        assert raw == "vectors/a.safetensors"
        assert store.vectors()[0].path == str(store.data_dir / "vectors" / "a.safetensors")


def test_a_trait_with_responses_keeps_what_they_were_made_under(store: Store) -> None:
    """Instructions, questions, judge prompt and assistant name cannot change under stored
    answers (replace, import --force and the editor all save here); the description can."""
    trait = store.get_trait("paternalism")
    job = store.create_job("generate", "paternalism", {}).id
    store.add_responses([_response(job, (0, 0, 0))])
    new_questions = (*trait.questions[:-1], "A brand new last question?")
    for change, what in (
        ({"questions": new_questions}, "questions"),
        ({"eval_prompt": trait.eval_prompt + " Be strict."}, "judge prompt"),
    ):
        with pytest.raises(PersonaError, match=f"has 1 responses made under its current {what}"):
            store.save_trait(replace(trait, **change), "edited")
    assert store.get_trait("paternalism") == trait
    store.save_trait(replace(trait, description="Reworded."), "edited")
    assert store.get_trait("paternalism").description == "Reworded."
    store.save_trait(replace(trait, name="paternalism_v2", questions=new_questions), "edited")
    assert store.get_trait("paternalism_v2").questions == new_questions
