"""The bad-input catalogue (docs/errors.md), checked end to end through the real command line:
every bad input exits 2 with ONE ``error: ...`` line on stderr, no traceback, and leaves the
database (and the tensor files beside it) as it was. The last tests keep the catalogue honest:
every test it names must exist, and every test here must be in it."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_model import build_tiny_model

from db import PersonaError, Store
from db.schema import SCHEMA_VERSION
from tui.cli import main

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "docs" / "errors.md"
TRAIT = "paternalism"


# ---- helpers ------------------------------------------------------------------------------
def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_error(result: tuple[int, str, str], expected: str) -> str:
    """Exit 2, and stderr is exactly one line starting with ``error:`` holding ``expected``."""
    code, _out, err = result
    assert code == 2, err
    assert err.startswith("error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert expected in err, err
    return err


def snapshot(db: Path, ignore: tuple[str, ...] = ()) -> tuple[dict[str, str], dict[str, str]]:
    """A digest of every table's schema and rows, and of every file in the database's data
    folder: what a failed command must leave as it found it. ``ignore`` names tables a
    failed command may add to without losing anything (a log of filter runs)."""
    conn = sqlite3.connect(db)
    try:
        tables = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
        rows = {
            name: hashlib.sha256(
                repr(
                    (sql, conn.execute(f"SELECT * FROM {name} ORDER BY rowid").fetchall())
                ).encode()
            ).hexdigest()
            for name, sql in tables.fetchall()
            if name not in ignore
        }
    finally:
        conn.close()
    data = db.parent / f"{db.stem}.data"
    files = {
        str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data.rglob("*"))
        if p.is_file()
    }
    return rows, files


def table_rows(db: Path, table: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        conn.close()


def clone(source: Path, folder: Path) -> Path:
    """A copy of a database and its data folder (vector and activation files)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "persona.db"
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    data = source.parent / f"{source.stem}.data"
    if data.exists():
        shutil.copytree(data, folder / "persona.data")
    return target


@pytest.fixture()
def fresh_db(db_path: Path) -> Path:
    """A new database holding the bundled library only."""
    Store(db_path).close()
    return db_path


@pytest.fixture(scope="module")
def extracted_db(tmp_path_factory: pytest.TempPathFactory, generated: Path) -> Path:
    """A private copy of the generated database, with vectors of the tiny model."""
    from pipeline.extract import extract

    db = clone(generated, tmp_path_factory.mktemp("errors-extracted"))
    with Store(db) as store:
        extract(store, TRAIT)
    return db


@pytest.fixture()
def vectors_db(extracted_db: Path, tmp_path: Path) -> Path:
    """A copy per test, so a test may damage its files."""
    return clone(extracted_db, tmp_path / "copy")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model of another shape (2 layers, hidden 32) than the vectors' one."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-other"), layers=2, hidden=32)


def expect_unchanged(
    capsys: pytest.CaptureFixture[str],
    db: Path,
    argv: list[str],
    expected: str,
    ignore: tuple[str, ...] = (),
) -> str:
    before = snapshot(db, ignore)
    err = assert_error(cli(capsys, "--db", db, *argv), expected)
    assert snapshot(db, ignore) == before
    return err


# ---- trait files --------------------------------------------------------------------------
def _studio_file(folder: Path, change: Callable[[dict], None] | None = None) -> Path:
    from db.traits import bundled_traits

    data = next(t for t in bundled_traits() if t.name == TRAIT).to_dict()
    data["name"] = "mine"
    if change is not None:
        change(data)
    path = folder / "mine.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"name": "x", "instruction": [', "is not valid JSON: line 1 column 31: Expecting value"),
        ("{'name': 'x'}", "is not valid JSON: line 1 column 2: Expecting property name"),
        ("", "is not valid JSON: line 1 column 1: Expecting value"),
    ],
    ids=["cut-short", "single-quotes", "empty"],
)
def test_malformed_trait_json(
    capsys, fresh_db: Path, tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    expect_unchanged(capsys, fresh_db, ["traits", "import", path], f"trait file {path} {expected}")


def test_truncated_trait_file(capsys, fresh_db: Path, tmp_path: Path) -> None:
    """A real trait file cut in half, as a failed copy leaves it."""
    path = _studio_file(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    expect_unchanged(capsys, fresh_db, ["traits", "import", path], "is not valid JSON: line 1")


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda p: p.write_bytes(b'{"name": "caf\xe9"}'), "is not UTF-8 text"),
        (lambda p: p.write_text("[1, 2]"), "not a studio trait file (no 'name')"),
        (
            lambda p: p.write_text('{"name": "x", "instruction": "be nice"}'),
            '\'instruction\' must be a list of {"pos", "neg"} objects',
        ),
        (
            lambda p: p.write_text('{"name": "x", "instruction": [{"pos": "a"}]}'),
            "instruction 1 must be an object with 'pos' and 'neg'",
        ),
        (
            lambda p: p.write_text(
                '{"name": "x", "instruction": [], "questions": [7], "eval_prompt": ""}'
            ),
            "'question 1' must be a string, not int",
        ),
        (
            lambda p: p.write_text('{"name": "x", "description": "\\ud800"}'),
            "'description' holds an unpaired surrogate escape (such as \\ud800); write the "
            "character itself or a complete surrogate pair",
        ),
        (
            lambda p: p.write_text('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}"),
            "nests lists or objects too deeply to read; a trait file is one object",
        ),
        (
            lambda p: p.write_text('{"name": "x", "n": ' + "9" * 5000 + "}"),
            "holds a number too long to read; a trait file holds strings, so remove the number",
        ),
        (lambda p: None, "does not exist; check the path"),
    ],
    ids=[
        "not-utf8",
        "not-an-object",
        "instruction-not-list",
        "pair-no-neg",
        "question-int",
        "surrogate",
        "deep",
        "long-number",
        "gone",
    ],
)
def test_unreadable_trait_file(capsys, fresh_db: Path, tmp_path: Path, write, expected) -> None:
    path = tmp_path / "t.json"
    write(path)
    expect_unchanged(capsys, fresh_db, ["traits", "import", path], expected)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d.update(instruction=d["instruction"][:3]),
            "trait 'mine' is invalid: expected 5 instruction pairs, found 3",
        ),
        (
            lambda d: d.update(questions=d["questions"][:39]),
            "expected 40 questions (20 extract + 20 eval), found 39",
        ),
        (
            lambda d: d.update(questions=d["questions"] + ["One more?"]),
            "expected 40 questions (20 extract + 20 eval), found 41",
        ),
        (
            lambda d: d["instruction"][1].update(neg="  "),
            "instruction pair 2 has an empty 'neg' instruction",
        ),
        (lambda d: d["questions"].__setitem__(4, ""), "question 5 is empty"),
        (
            lambda d: d["questions"].__setitem__(39, d["questions"][0].upper()),
            "question 40 duplicates question 1",
        ),
        (lambda d: d.update(name="Bad Name"), "name 'Bad Name' must be lowercase letters"),
    ],
    ids=["3-pairs", "39-questions", "41-questions", "empty-neg", "empty-q", "dup-q", "name"],
)
def test_trait_breaks_a_rule(capsys, fresh_db: Path, tmp_path: Path, change, expected) -> None:
    path = _studio_file(tmp_path, change)
    expect_unchanged(capsys, fresh_db, ["traits", "import", path], expected)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p.replace("{question}", "the question"), "eval prompt has no {question} slot"),
        (lambda p: p.replace("{answer}", "[answer]"), "eval prompt has no {answer} slot"),
        (
            lambda p: p + " Consider {trait}.",
            "eval prompt has unknown slots {trait}; only {question} and {answer}",
        ),
        (lambda p: " ", "eval prompt is empty"),
    ],
    ids=["no-question", "no-answer", "unknown-slot", "empty"],
)
def test_judge_prompt_slots(capsys, fresh_db: Path, tmp_path: Path, edit, expected) -> None:
    path = _studio_file(tmp_path, lambda d: d.update(eval_prompt=edit(d["eval_prompt"])))
    expect_unchanged(capsys, fresh_db, ["traits", "import", path], expected)


def test_original_format_layout(capsys, fresh_db: Path, tmp_path: Path) -> None:
    code, _, _ = cli(capsys, "--db", fresh_db, "traits", "export", TRAIT, "--out", tmp_path)
    assert code == 0
    imported = ["traits", "import"]
    expect_unchanged(capsys, fresh_db, [*imported, tmp_path], "is a folder: pass --name to pick")
    expect_unchanged(
        capsys,
        fresh_db,
        [*imported, tmp_path, "--name", "nosuch"],
        "trait_data_extract/nosuch.json does not exist; check the folder and --name",
    )
    eval_file = tmp_path / "trait_data_eval" / f"{TRAIT}.json"
    original = eval_file.read_text()
    changed = json.loads(original)
    changed["eval_prompt"] += " (edited in one file only)"
    eval_file.write_text(json.dumps(changed))
    expect_unchanged(
        capsys,
        fresh_db,
        [*imported, tmp_path, "--name", TRAIT],
        "the extract and eval files disagree on 'eval_prompt'",
    )
    eval_file.write_text(original)
    (tmp_path / "trait_data_eval" / f"{TRAIT}.json").unlink()
    expect_unchanged(
        capsys,
        fresh_db,
        [*imported, tmp_path / "trait_data_extract" / f"{TRAIT}.json", "--name", "copy"],
        f"trait_data_eval/{TRAIT}.json does not exist; the original format needs both split files",
    )


def test_existing_trait_needs_force(capsys, fresh_db: Path, tmp_path: Path) -> None:
    path = _studio_file(tmp_path, lambda d: d.update(name="deception"))
    expect_unchanged(
        capsys,
        fresh_db,
        ["traits", "import", path],
        "trait 'deception' already exists; pass --force to replace it or pick a name",
    )


# ---- CSV import ---------------------------------------------------------------------------
CSV_HEADER = f"question,prompt,answer,question_id,{TRAIT},coherence"


def _csv(path: Path, rows: list[str], header: str = CSV_HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _csv_row(question: int, trait: str = "80", coherence: str = "90") -> str:
    from db.traits import bundled_traits

    text = next(t for t in bundled_traits() if t.name == TRAIT).questions[question]
    return (
        f'"{text}",prompt {question},answer {question},{TRAIT}_{question}_pos_0,{trait},{coherence}'
    )


@pytest.mark.parametrize(
    ("make_neg", "expected"),
    [
        (
            lambda p: _csv(
                p,
                [_csv_row(0).rsplit(",", 1)[0]],
                header=CSV_HEADER.replace(",coherence", ""),
            ),
            "lacks column coherence; it needs the columns question, prompt, answer",
        ),
        (
            lambda p: _csv(p, [_csv_row(0)], header="q,prompt,answer,question_id,x,coherence"),
            f"lacks columns question, {TRAIT}; it needs the columns",
        ),
        (
            lambda p: _csv(p, [_csv_row(0) + ","]),
            "data row 1 has more cells than the header has columns",
        ),
        (
            lambda p: _csv(p, [_csv_row(0), _csv_row(1, trait="high")]),
            f"data row 2, column '{TRAIT}': 'high' is not a number; fix the score or empty "
            "the cell to import the row unscored",
        ),
        (
            lambda p: _csv(p, [_csv_row(0, coherence="150")]),
            "data row 1, column 'coherence': score 150 is outside 0-100",
        ),
        (
            lambda p: _csv(p, [_csv_row(0, trait="inf")]),
            f"data row 1, column '{TRAIT}': score inf is outside 0-100",
        ),
        (lambda p: p.write_text(""), "is empty; pass the CSV the original project wrote"),
        (lambda p: _csv(p, []), "has no rows, only a header; pass the CSV with the answers"),
        (lambda p: _csv(p, ['"unclosed,p,a,id_0,50,50']), "cannot read neg CSV"),
        (lambda p: None, "does not exist; check the path"),
        (lambda p: p.mkdir(), "is not a file; pass the path of the CSV itself"),
    ],
    ids=[
        "no-coherence",
        "two-missing",
        "extra-cell",
        "score-text",
        "score-150",
        "score-inf",
        "empty",
        "header-only",
        "unclosed-quote",
        "gone",
        "folder",
    ],
)
def test_bad_csv(
    capsys, fresh_db: Path, tmp_path: Path, tiny_model_dir: Path, make_neg, expected
) -> None:
    pos = _csv(tmp_path / "pos.csv", [_csv_row(0), _csv_row(1)])
    neg = tmp_path / "neg.csv"
    make_neg(neg)
    argv = ["import-csv", TRAIT, "--pos", pos, "--neg", neg, "--model", tiny_model_dir]
    expect_unchanged(capsys, fresh_db, argv, expected)


def test_csv_nan_scores_import_unscored(
    capsys, fresh_db: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Not an error: an empty or NaN score imports the row unscored (a judge run scores it
    later), and the count is reported."""
    pos = _csv(tmp_path / "pos.csv", [_csv_row(0, trait="nan"), _csv_row(1, coherence="")])
    neg = _csv(tmp_path / "neg.csv", [_csv_row(0, trait="NaN"), _csv_row(1)])
    argv = ["import-csv", TRAIT, "--pos", pos, "--neg", neg, "--model", tiny_model_dir]
    code, out, err = cli(capsys, "--db", fresh_db, *argv)
    assert code == 0, err
    assert "imported 2 pos rows" in out and "3 scores were empty" in out
    scores = [row[4] for row in table_rows(fresh_db, "judgments")]
    assert scores.count(None) == 3


def test_csv_empty_judge_name(capsys, fresh_db: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    pos = _csv(tmp_path / "pos.csv", [_csv_row(0)])
    argv = ["import-csv", TRAIT, "--pos", pos, "--neg", pos, "--model", tiny_model_dir]
    expect_unchanged(
        capsys, fresh_db, [*argv, "--judge", " "], "the judge name is empty; pass a name"
    )


# ---- the database -------------------------------------------------------------------------
def test_newer_schema_version(capsys, fresh_db: Path) -> None:
    conn = sqlite3.connect(fresh_db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = fresh_db.read_bytes()
    assert_error(
        cli(capsys, "--db", fresh_db, "traits", "list"),
        f"was written by a newer persona-studio (schema {SCHEMA_VERSION + 1}, this one knows "
        f"up to {SCHEMA_VERSION}); upgrade persona-studio to open it",
    )
    assert fresh_db.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 64, b"SQLite format 3\x00" + b"\x07" * 5000, b"not a database\n" * 99],
    ids=["random", "bad-header", "text"],
)
def test_corrupt_database_file(capsys, db_path: Path, content: bytes) -> None:
    db_path.write_bytes(content)
    assert_error(
        cli(capsys, "--db", db_path, "traits", "list"),
        f"{db_path} is not a usable persona-studio database (",
    )
    assert db_path.read_bytes() == content


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_database(capsys, extracted_db: Path, tmp_path: Path, keep: float) -> None:
    """A real database cut short, as an interrupted copy leaves it."""
    db = clone(extracted_db, tmp_path)
    data = db.read_bytes()
    db.write_bytes(data[: int(len(data) * keep) // 4096 * 4096])
    before = db.read_bytes()
    assert_error(
        cli(capsys, "--db", db, "jobs", "list"),
        "is not a usable persona-studio database (database disk image is malformed); move it "
        "aside or pass another --db",
    )
    assert db.read_bytes() == before


def test_damaged_page_inside_the_database(capsys, fresh_db: Path) -> None:
    """The header and schema are fine, so the database opens; a data page is garbage. The
    failure comes from a later query, and is still one line."""
    conn = sqlite3.connect(fresh_db)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'questions'").fetchone()
    conn.close()
    with fresh_db.open("r+b") as handle:
        handle.seek((root[0] - 1) * page_size)
        handle.write(b"\xff" * page_size)
    before = fresh_db.read_bytes()
    for argv in (["traits", "show", TRAIT], ["traits", "delete", "deception", "--yes"]):
        assert_error(
            cli(capsys, "--db", fresh_db, *argv),
            f"the database {fresh_db} is damaged (database disk image is malformed); restore a "
            "backup, or move it aside and pass another --db",
        )
    assert fresh_db.read_bytes() == before


def test_bad_db_path(capsys, tmp_path: Path) -> None:
    assert_error(
        cli(capsys, "--db", tmp_path, "traits", "list"),
        f"--db {tmp_path} is a folder; pass a file path such as persona.db",
    )
    assert_error(
        cli(capsys, "--db", tmp_path / "missing" / "p.db", "traits", "list"),
        f"folder {tmp_path / 'missing'} for --db does not exist; create it first",
    )
    assert list(tmp_path.iterdir()) == []


# ---- unknown names and ids ----------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["traits", "show", "nope"],
        ["traits", "export", "nope"],
        ["traits", "delete", "nope"],
        ["generate", "nope", "--side", "pos"],
        ["judge", "nope"],
        ["pairs", "nope"],
        ["pairs", "nope", "include", "0", "0", "0"],
        ["extract", "nope"],
    ],
    ids=lambda argv: "-".join(argv[:2]),
)
def test_unknown_trait(capsys, fresh_db: Path, argv: list[str]) -> None:
    err = expect_unchanged(capsys, fresh_db, argv, "")
    assert err == "error: unknown trait 'nope'; `persona traits list` shows the known ones\n"


@pytest.mark.parametrize(
    "argv",
    [["jobs", "cancel", "999"], ["worker", "999"], ["judge", TRAIT, "--job", "999"]],
    ids=["cancel", "worker", "judge-job"],
)
def test_unknown_job_id(capsys, fresh_db: Path, argv: list[str]) -> None:
    err = expect_unchanged(capsys, fresh_db, argv, "")
    assert err == "error: unknown job id 999; `persona jobs list` shows the known ones\n"


def test_job_id_that_does_not_fit(capsys, vectors_db: Path) -> None:
    expect_unchanged(
        capsys,
        vectors_db,
        ["judge", "deception", "--job", "1"],
        "job 1 is not a generation job of trait 'deception'",
    )
    expect_unchanged(
        capsys, vectors_db, ["jobs", "cancel", "1"], "job 1 is already done; nothing to cancel"
    )


def test_unknown_response_id(capsys, vectors_db: Path) -> None:
    argv = ["monitor", TRAIT, "--response", "99999", "--layer", "1"]
    expect_unchanged(capsys, vectors_db, argv, "unknown response id 99999; check the id")


def test_new_trait_without_description(capsys, fresh_db: Path) -> None:
    expect_unchanged(
        capsys,
        fresh_db,
        ["run", "brand_new"],
        "trait 'brand_new' is new: pass --description so it can be written",
    )


# ---- models -------------------------------------------------------------------------------
def test_model_path_problems(
    capsys, fresh_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    cases = [
        (
            "/no/such/model",
            "model path /no/such/model does not exist; pass smollm2, a local model folder or "
            "a cached hub id",
        ),
        (
            no_config,
            f"model folder {no_config} has no config.json; point --model at a Hugging Face "
            "model folder",
        ),
        (
            "some-org/some-model",
            "model 'some-org/some-model' is not in the local Hugging Face cache and we never "
            "download",
        ),
        (" ", "--model is empty; pass smollm2, a local model folder or a cached hub id"),
        (broken, f"cannot load model from {broken}:"),
    ]
    for model, expected in cases:
        expect_unchanged(capsys, fresh_db, ["models", "info", model], expected)
    # A step that needs a model checks it before it writes a job row.
    argv = ["generate", TRAIT, "--side", "pos", "--model", "/no/such/model"]
    expect_unchanged(capsys, fresh_db, argv, "model path /no/such/model does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu(capsys, fresh_db: Path, tiny_model_dir: Path) -> None:
    expect_unchanged(
        capsys,
        fresh_db,
        ["models", "info", tiny_model_dir, "--device", "cuda"],
        "--device cuda asked for, but torch sees no CUDA GPU",
    )


def test_model_without_a_chat_template(
    capsys, fresh_db: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A base model: generation needs a chat template. The job is left failed, nothing else."""
    model = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    argv = ["generate", TRAIT, "--side", "pos", "--model", model, "--n-per-question", "1"]
    err = assert_error(
        cli(capsys, "--db", fresh_db, *argv),
        "this model's tokenizer has no chat template; use an instruction-tuned (chat) model",
    )
    assert "━" not in err
    assert table_rows(fresh_db, "responses") == []
    with Store(fresh_db) as store:
        assert [j.status for j in store.list_jobs()] == ["failed"]


def test_responses_without_token_ids(capsys, vectors_db: Path) -> None:
    """Answers from a server generated without --tokenizer have no token ids: not an error,
    the forward pass tokenises their stored text with the model it runs."""
    conn = sqlite3.connect(vectors_db)
    with conn:
        conn.execute("UPDATE responses SET prompt_ids = '[]', answer_ids = '[]'")
    conn.close()
    code, out, err = cli(capsys, "--db", vectors_db, "extract", TRAIT, "--source", "forward")
    assert code == 0 and "Traceback" not in err, err
    assert "response_avg_diff" in out


# ---- API keys -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("judge", "variable"),
    [
        ("openai:gpt-4.1-mini", "OPENAI_API_KEY"),
        ("anthropic:claude-haiku-4-5", "ANTHROPIC_API_KEY"),
    ],
)
def test_judge_without_api_key(
    capsys, vectors_db: Path, monkeypatch: pytest.MonkeyPatch, judge: str, variable: str
) -> None:
    monkeypatch.delenv(variable, raising=False)
    kept = {t: table_rows(vectors_db, t) for t in ("responses", "judgments", "vectors")}
    with Store(vectors_db) as store:
        jobs = len(store.list_jobs())
    err = assert_error(
        cli(capsys, "--db", vectors_db, "judge", TRAIT, "--judge", judge),
        f"{variable} is not set; export it (keys are read only from the environment)",
    )
    assert "━" not in err  # no progress bar left behind
    assert {t: table_rows(vectors_db, t) for t in kept} == kept
    # The judge job is recorded as failed, so the same command resumes it once the key is set.
    with Store(vectors_db) as store:
        new_jobs = sorted(store.list_jobs(), key=lambda j: j.id)[jobs:]
    assert [(j.kind, j.status) for j in new_jobs] == [("judge", "failed")]


@pytest.mark.parametrize(
    ("author", "variable"),
    [("anthropic:claude-sonnet-4-5", "ANTHROPIC_API_KEY"), ("openai:gpt-4.1", "OPENAI_API_KEY")],
)
def test_author_without_api_key(
    capsys, fresh_db: Path, monkeypatch: pytest.MonkeyPatch, author: str, variable: str
) -> None:
    monkeypatch.delenv(variable, raising=False)
    argv = ["traits", "new", "sly", "--description", "misleads", "--author", author]
    assert_error(cli(capsys, "--db", fresh_db, *argv), f"{variable} is not set; export it")
    with Store(fresh_db) as store:
        assert not store.has_trait("sly")


def test_bad_author_or_tokenizer_writes_no_job(capsys, fresh_db: Path) -> None:
    """Refused before a job row exists (they used to leave a failed job behind)."""
    for argv, expected in (
        (["traits", "new", "sly", "--description", "misleads", "--author", "bogus:m"],
         "--author kind 'bogus' is unknown; use openai, anthropic or local"),
        (["traits", "new", "sly", "--description", "misleads", "--author", "local:/nope"],
         "model path /nope does not exist"),
        (["generate", TRAIT, "--side", "pos", "--backend", "openai", "--base-url",
          "http://127.0.0.1:9/v1", "--tokenizer", "/nope"], "model path /nope does not exist"),
    ):  # fmt: skip
        expect_unchanged(capsys, fresh_db, argv, expected)


def test_openai_backend_needs_a_base_url(capsys, fresh_db: Path) -> None:
    expect_unchanged(
        capsys,
        fresh_db,
        ["generate", TRAIT, "--side", "pos", "--backend", "openai"],
        "--backend openai needs --base-url (e.g. http://localhost:8000/v1)",
    )


# ---- vector files -------------------------------------------------------------------------
class _Payload:
    """A pickled object whose unpickling would make a folder: the proof it never ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_pt_file_is_refused(capsys, vectors_db: Path, tmp_path: Path) -> None:
    marker = tmp_path / "it-ran"
    path = tmp_path / "evil.pt"
    torch.save({"vector": _Payload(marker)}, path)
    argv = ["vectors", "import", TRAIT, path]
    err = expect_unchanged(capsys, vectors_db, argv, f"{path} holds a pickled Python object (")
    assert "weights_only refused it and ran nothing" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda p: p.write_text("#!/bin/sh\necho hi\n"), "weights_only refused it: Unsupported"),
        (lambda p: p.write_bytes(b""), "(the file is empty)"),
        (
            lambda p: p.write_bytes(_pt_bytes(torch.zeros(4, 64))[:300]),
            "(PytorchStreamReader failed reading zip archive",
        ),
    ],
    ids=["text", "empty", "truncated"],
)
def test_pt_file_that_is_not_a_tensor_file(
    capsys, vectors_db: Path, tmp_path: Path, write, expected: str
) -> None:
    path = tmp_path / "v.pt"
    write(path)
    err = expect_unchanged(capsys, vectors_db, ["vectors", "import", TRAIT, path], expected)
    assert f"{path} is not a tensor file written by torch.save" in err


def _pt_bytes(tensor: torch.Tensor) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (
            torch.zeros(31, 576),
            "has shape [31, 576] but the model needs [4, 64] (3 layers + embeddings, hidden 64); "
            "is it for another model?",
        ),
        (torch.zeros(64), "must hold one [L+1, d] tensor, found [64]"),
        ({"a": torch.zeros(4, 64), "b": torch.zeros(4, 64)}, "must hold one [L+1, d] tensor"),
        (torch.full((4, 64), float("nan")), "holds NaN or infinite values; a vector must be"),
    ],
    ids=["another-model", "1-d", "two-tensors", "nan"],
)
def test_pt_vector_that_does_not_fit(
    capsys, vectors_db: Path, tmp_path: Path, tiny_model_dir: Path, tensor, expected: str
) -> None:
    path = tmp_path / "v.pt"
    torch.save(tensor, path)
    argv = ["vectors", "import", TRAIT, path, "--model", tiny_model_dir]
    expect_unchanged(capsys, vectors_db, argv, expected)


def test_missing_pt_file(capsys, vectors_db: Path, tmp_path: Path) -> None:
    argv = ["vectors", "import", TRAIT, tmp_path / "gone.pt"]
    expect_unchanged(capsys, vectors_db, argv, "gone.pt does not exist; check the path")


def test_vector_for_another_model(capsys, vectors_db: Path, other_model_dir: Path) -> None:
    """A stored vector used with a model of another shape: monitor and steer refuse it."""
    monitor = ["monitor", TRAIT, "--response", "1", "--layer", "1", "--model", other_model_dir]
    expect_unchanged(capsys, vectors_db, monitor, "has shape [4, 64] but the model needs [3, 32]")
    steer = ["steer", TRAIT, "--layer", "1", "--prompt", "hi", "--model", other_model_dir]
    expect_unchanged(capsys, vectors_db, steer, "has shape [4, 64] but")


def test_stored_vector_file_missing(capsys, vectors_db: Path, tmp_path: Path) -> None:
    with Store(vectors_db) as store:
        path = Path(store.vectors(trait=TRAIT)[-1].path)
    path.unlink()
    argv = ["vectors", "export", TRAIT, "--out", tmp_path / "out"]
    expect_unchanged(
        capsys, vectors_db, argv, f"vector file {path} is unreadable (No such file or directory"
    )


def test_trait_without_vectors(capsys, fresh_db: Path) -> None:
    expect_unchanged(
        capsys,
        fresh_db,
        ["vectors", "export", TRAIT],
        f"trait '{TRAIT}' has no vectors; run `persona extract` first",
    )
    for argv in (["vectors", "show", TRAIT], ["sweep", TRAIT, "--layers", "1-2"]):
        expect_unchanged(
            capsys, fresh_db, argv, f"trait '{TRAIT}' has no vectors yet; run `persona extract"
        )
    steer = ["steer", TRAIT, "--layer", "1", "--prompt", "hi"]
    expect_unchanged(
        capsys, fresh_db, steer, f"trait '{TRAIT}' has no response_avg_diff vector; run"
    )


def test_damaged_activation_file(capsys, vectors_db: Path) -> None:
    path = vectors_db.parent / "persona.data" / "activations" / "job-1" / "activations.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    # A new threshold makes extract write new vectors if it gets that far; it must not.
    argv = ["extract", TRAIT, "--threshold", "45"]
    # pair_counts: extract logs the filter's counts before it reads activations
    expect_unchanged(
        capsys, vectors_db, argv, f"activation file {path} is unreadable", ("pair_counts",)
    )


def test_no_effective_pairs(capsys, vectors_db: Path) -> None:
    expect_unchanged(
        capsys,
        vectors_db,
        ["extract", TRAIT, "--threshold", "99"],
        f"no effective pairs for '{TRAIT}' at threshold 99 / coherence 50",
        ("pair_counts",),  # the filter's counts are logged, which is how the message has them
    )


def test_pairs_before_generating_or_judging(capsys, vectors_db: Path) -> None:
    expect_unchanged(
        capsys,
        vectors_db,
        ["pairs", "deception"],
        "trait 'deception' has no pos or neg generation job on the extract split; run "
        "`persona generate deception --side both --split extract` first",
    )
    conn = sqlite3.connect(vectors_db)
    with conn:
        conn.execute("DELETE FROM judgments")
    conn.close()
    expect_unchanged(
        capsys, vectors_db, ["extract", TRAIT], f"are not judged; run `persona judge {TRAIT}` first"
    )


def test_screen_with_another_model(
    capsys, vectors_db: Path, tmp_path: Path, other_model_dir: Path
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n')
    argv = ["screen", TRAIT, "--data", data, "--layer", "1", "--model", other_model_dir]
    expect_unchanged(capsys, vectors_db, argv, "but the model needs [3, 32]")


def test_sweep_with_another_model(
    capsys, vectors_db: Path, other_model_dir: Path, tiny_model_dir: Path
) -> None:
    argv = ["sweep", TRAIT, "--layers", "1", "--n", "1", "--max-new-tokens", "2"]
    argv += ["--model", other_model_dir, "--judge", f"local:{tiny_model_dir}"]
    assert_error(cli(capsys, "--db", vectors_db, *argv), "but the model needs [3, 32]")


def test_vectors_show_after_extract_with_another_model(
    capsys, vectors_db: Path, other_model_dir: Path
) -> None:
    code, _, err = cli(
        capsys,
        "--db",
        vectors_db,
        "extract",
        TRAIT,
        "--model",
        other_model_dir,
        "--source",
        "forward",
    )
    assert code == 0, err
    code, out, err = cli(capsys, "--db", vectors_db, "vectors", "show", TRAIT)
    assert code == 0 and "Traceback" not in err, err


# ---- CLI values ---------------------------------------------------------------------------
GEN = ["generate", TRAIT, "--side", "pos"]
BAD_VALUES = [
    ([*GEN, "--n-per-question", "-1"], "argument --n-per-question: must be at least 1 (got -1)"),
    ([*GEN, "--n-per-question", "0"], "argument --n-per-question: must be at least 1 (got 0)"),
    ([*GEN, "--n-per-question", "ten"], "argument --n-per-question: 'ten' is not a whole number"),
    ([*GEN, "--batch-size", "0"], "argument --batch-size: must be at least 1 (got 0)"),
    ([*GEN, "--max-concurrent", "0"], "argument --max-concurrent: must be at least 1 (got 0)"),
    ([*GEN, "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1 (got 0)"),
    ([*GEN, "--temperature", "-0.5"], "argument --temperature: must be 0 or more (got -0.5)"),
    ([*GEN, "--temperature", "nan"], "argument --temperature: 'nan' is not a finite number"),
    ([*GEN, "--top-p", "0"], "argument --top-p: must be in (0, 1] (got 0)"),
    ([*GEN, "--top-p", "1.5"], "argument --top-p: must be in (0, 1] (got 1.5)"),
    ([*GEN, "--seed", "-1"], "argument --seed: must be between 0 and 9223372036854775807"),
    ([*GEN, "--seed", str(2**64)], "argument --seed: must be between 0 and 9223372036854775807"),
    (["judge", TRAIT, "--max-concurrent", "0"], "argument --max-concurrent: must be at least 1"),
    (["judge", TRAIT, "--timeout", "0"], "argument --timeout: must be above 0 (got 0)"),
    (
        ["judge", TRAIT, "--processes", "2", "--judge", "local:smollm2"],
        "--processes is for API judges; a local judge runs in one process",
    ),
    (["judge", TRAIT, "--samples", "0"], "argument --samples: must be at least 1 (got 0)"),
    (
        ["judge", TRAIT, "--metrics", "honesty"],
        "--metrics takes a comma list of trait and coherence",
    ),
    (["judge", TRAIT, "--judge", "gpt-4"], "--judge 'gpt-4' must be KIND:MODEL"),
    (["pairs", TRAIT, "--threshold", "150"], "argument --threshold: must be between 0 and 100"),
    (["extract", TRAIT, "--threshold", "-1"], "argument --threshold: must be between 0 and 100"),
    (["extract", TRAIT, "--coherence", "101"], "argument --coherence: must be between 0 and 100"),
    (["run", TRAIT, "--threshold", "150"], "argument --threshold: must be between 0 and 100"),
    (["run", TRAIT, "--n-eval", "0"], "argument --n-eval: must be at least 1 (got 0)"),
    (["run", TRAIT, "--n-per-question", "-3"], "argument --n-per-question: must be at least 1"),
    (["traits", "new", "x", "--description", "d", "--thinking", "-1"], "must be 0 or more"),
    (["pairs", TRAIT, "include", "-1", "0", "0"], "argument question: must be 0 or more (got -1)"),
    (["steer", TRAIT, "--layer", "1", "--prompt", "p", "--coef", "two"], "not a comma list"),
    (["steer", TRAIT, "--layer", "1", "--prompt", "p", "--coef="], "argument --coef: is empty"),
    (["monitor", TRAIT, "--response", "1", "--max-new-tokens", "0"], "must be at least 1"),
    (["sweep", TRAIT, "--layers", "1", "--n", "0"], "argument --n: must be at least 1 (got 0)"),
    (["sweep", TRAIT, "--layers", "1", "--n", "21"], "--n must be between 1 and 20 eval questions"),
    (["sweep", TRAIT, "--layers", "1", "--prune-top", "0"], "argument --prune-top: must be at"),
    (["sweep", TRAIT, "--layers", "a-b"], "--layers 'a-b' is not a range like 8-24[:step]"),
    (["sweep", TRAIT, "--layers", ""], "--layers is empty; give a range such as 8-24"),
    (["sweep", TRAIT, "--layers", "1", "--coefs=x"], "--coefs 'x' is not a comma list of numbers"),
    (["screen", TRAIT, "--data", "d.jsonl", "--top", "0"], "argument --top: must be at least 1"),
    ([*GEN[:2], "--side", "up"], "argument --side: invalid choice: 'up'"),
    (GEN[:2], "the following arguments are required: --side"),
    (["generat", TRAIT], "argument COMMAND: invalid choice: 'generat'"),
    ([*GEN, "--n-per-questions", "3"], "unrecognized arguments: --n-per-questions 3"),
]


@pytest.mark.parametrize(
    ("argv", "expected"), BAD_VALUES, ids=[" ".join(a[2:] or a) for a, _ in BAD_VALUES]
)
def test_bad_cli_value(capsys, vectors_db: Path, argv: list[str], expected: str) -> None:
    err = expect_unchanged(capsys, vectors_db, argv, expected)
    if "argument" in expected:
        # argparse's own errors: one line that points at the command's --help, no usage block
        assert "; see `persona " in err and "usage:" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["steer", TRAIT, "--layer", "9", "--prompt", "hi"], "--layer must be in 1..3 for this"),
        (["monitor", TRAIT, "--response", "1", "--layer", "9"], "--layer 9 is outside 0..3"),
        (
            ["sweep", TRAIT, "--layers", "2-9", "--n", "1"],
            "--layers [4, 5, 6, 7, 8, 9] are outside 1..3 for this model",
        ),
    ],
    ids=["steer", "monitor", "sweep"],
)
def test_layer_outside_the_model(capsys, vectors_db: Path, argv: list[str], expected) -> None:
    kept = {t: table_rows(vectors_db, t) for t in ("responses", "judgments", "vectors")}
    assert_error(cli(capsys, "--db", vectors_db, *argv), expected)
    assert {t: table_rows(vectors_db, t) for t in kept} == kept


def test_output_paths(capsys, vectors_db: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    for argv in (["traits", "export", TRAIT], ["vectors", "export", TRAIT]):
        expect_unchanged(
            capsys,
            vectors_db,
            [*argv, "--out", a_file],
            f"argument --out: {a_file} is a file; pass a folder (made if missing)",
        )
    expect_unchanged(
        capsys,
        vectors_db,
        ["traits", "template", "x", "--out", tmp_path / "no" / "x.json"],
        f"argument --out: folder {tmp_path / 'no'} does not exist; create it first",
    )
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n')
    expect_unchanged(
        capsys,
        vectors_db,
        ["screen", TRAIT, "--data", data, "--out", tmp_path],
        f"argument --out: {tmp_path} is a folder; pass a file name",
    )
    assert a_file.read_text() == "keep me"


def test_bad_prices_file_writes_no_job(capsys, vectors_db: Path, tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"gpt-4.1-mini": "cheap"}')
    nested = tmp_path / "nested.json"
    nested.write_text('{"gpt-4.1-mini": {"input": [1]}}')  # was a KeyError traceback
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # was a RecursionError traceback
    for path in (prices, nested, deep, tmp_path / "missing.json"):
        argv = ["judge", TRAIT, "--judge", "openai:gpt-4.1-mini", "--prices", path]
        expect_unchanged(capsys, vectors_db, argv, f"--prices {path} must be a JSON object")


def test_unknown_judge_kind(capsys, vectors_db: Path) -> None:
    kept = table_rows(vectors_db, "judgments")
    assert_error(
        cli(capsys, "--db", vectors_db, "judge", TRAIT, "--judge", "cohere:command"),
        "--judge kind 'cohere' is unknown; use openai, anthropic or local",
    )
    assert table_rows(vectors_db, "judgments") == kept


def test_bad_screening_data_file(capsys, vectors_db: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    cases = [
        ('{"prompt": "a", "response": "b"}\n{oops\n', f"{data} line 2 is not JSON"),
        ('{"prompt": "a"}\n', f"{data} line 1 needs 'prompt' and 'response' strings"),
        ("\n\n", f"{data} holds no samples"),
    ]
    for content, expected in cases:
        data.write_text(content)
        expect_unchanged(capsys, vectors_db, ["screen", TRAIT, "--data", data], expected)
    argv = ["screen", TRAIT, "--data", tmp_path / "gone.jsonl"]
    expect_unchanged(capsys, vectors_db, argv, "gone.jsonl does not exist; pass a JSONL file")


def test_screening_data_not_utf8(capsys, vectors_db: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'\xff\xfe{"prompt": "a", "response": "b"}\n')
    expect_unchanged(capsys, vectors_db, ["screen", TRAIT, "--data", data], "UTF-8")


# ---- the catalogue itself -----------------------------------------------------------------
_REFERENCE = re.compile(r"tests/(\w+\.py)::(\w+)")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def _catalogue_rows() -> list[str]:
    """The body rows of the catalogue's tables (not headers or separators)."""
    rows = []
    lines = CATALOGUE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        if i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: ") and "-" in lines[i + 1]:
            continue  # a header: the next line is its separator
        rows.append(line)
    return rows


def test_every_catalogue_entry_names_an_existing_test() -> None:
    rows = _catalogue_rows()
    assert len(rows) >= 40
    names: dict[str, set[str]] = {}
    for row in rows:
        references = _REFERENCE.findall(row)
        assert references, f"no tests/FILE.py::test_name in: {row}"
        assert row.count("`error: ") >= 1 or "not an error" in row, f"no message in: {row}"
        for file, name in references:
            if file not in names:
                assert (ROOT / "tests" / file).is_file(), f"tests/{file} does not exist"
                names[file] = _test_names(ROOT / "tests" / file)
            assert name in names[file], f"tests/{file}::{name} does not exist"


def test_every_test_here_is_in_the_catalogue() -> None:
    text = CATALOGUE.read_text(encoding="utf-8")
    named = {name for file, name in _REFERENCE.findall(text) if file == "test_errors.py"}
    own = _test_names(Path(__file__)) - {
        "test_every_catalogue_entry_names_an_existing_test",
        "test_every_test_here_is_in_the_catalogue",
    }
    assert sorted(own - named) == []


@pytest.mark.parametrize("devices", [[], ["--gpus", "cpu,cpu"]], ids=["one", "two-threads"])
def test_sweep_out_of_gpu_memory(
    capsys,
    vectors_db: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    devices: list[str],
) -> None:
    """A CUDA out-of-memory while generating steered answers names the --batch-size to
    lower, on one device and in one of two devices' threads; the answers finished before it
    stay stored, and the rerun answers the rest and finishes."""
    import torch

    from pipeline.engine import DecodeEngine

    real_stream = DecodeEngine.stream

    def two_then_oom(self, *args, **kwargs):
        for number, item in enumerate(real_stream(self, *args, **kwargs)):
            yield item
            if number == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(DecodeEngine, "stream", two_then_oom)
    argv = ["sweep", TRAIT, "--layers", "2", "--coefs=1", "--n", "2", "--max-new-tokens", "4"]
    argv += ["--batch-size", "1", "--judge", f"local:{tiny_model_dir}", *devices]
    assert_error(
        cli(capsys, "--db", vectors_db, *argv),
        "CUDA out of memory at --batch-size 1; rerun the same command with a lower "
        "--batch-size (the job resumes where it stopped)",
    )
    with Store(vectors_db) as store:  # the newest sweep: other tests' share the database
        job = max(store.list_jobs(trait=TRAIT, kind="sweep"), key=lambda j: j.id)
        stored = len(store.responses(job=job.id))
        # In threads the other device's engine may or may not have finished rows first.
        assert job.status == "failed" and stored in ({2} if not devices else {2, 3, 4})
    monkeypatch.setattr(DecodeEngine, "stream", real_stream)
    assert cli(capsys, "--db", vectors_db, *argv)[0] == 0
    with Store(vectors_db) as store:
        job = store.get_job(job.id)
        assert job.status == "done" and len(store.responses(job=job.id)) == 4


def test_traits_delete_asks_and_says_what_it_removed(capsys, vectors_db: Path) -> None:
    """Without a terminal to ask on, deleting needs --yes and deletes nothing; with it, the
    rows, the jobs and the trait's files inside the data folder all go, and the output says
    how many."""
    data = vectors_db.parent / "persona.data"
    with Store(vectors_db) as store:
        vector_files = [Path(v.path) for v in store.vectors(trait=TRAIT)]
        jobs = [job.id for job in store.list_jobs(trait=TRAIT)]
        responses = len(store.responses(trait=TRAIT))
    assert vector_files and all(p.exists() for p in vector_files)
    kept = {t: table_rows(vectors_db, t) for t in ("responses", "judgments", "vectors")}
    assert_error(
        cli(capsys, "--db", vectors_db, "traits", "delete", TRAIT), "pass --yes to confirm"
    )
    assert {t: table_rows(vectors_db, t) for t in kept} == kept
    code, out, _err = cli(capsys, "--db", vectors_db, "traits", "delete", TRAIT, "--yes")
    assert code == 0 and f"deleted trait {TRAIT}: {responses} responses" in out
    assert not any(p.exists() for p in vector_files)
    assert not any((data / "activations" / f"job-{j}").exists() for j in jobs)
    with Store(vectors_db) as store:
        assert not store.has_trait(TRAIT) and not store.responses(trait=TRAIT)
        assert not [job for job in store.list_jobs() if job.id in jobs]


def test_the_dashboard_without_a_terminal(tmp_path: Path) -> None:
    """Plain `persona` in a pipe: one line and exit 2 at once, not escape codes forever."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "tui.cli", "--db", str(tmp_path / "p.db")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: the dashboard needs a terminal")
    assert result.stderr.count("\n") == 1


# ---- an adversarial pass (550 inputs, by a separate helper): what it found, fixed ----------
ADVERSARIAL = [
    (["pairs", TRAIT, "include", "99999999999999999999999", "0", "0"], "must be at most"),
    (["monitor", TRAIT, "--response", "99999999999999999999999"], "must be an id from 0 to"),
    (["jobs", "cancel", "99999999999999999999999"], "must be an id from 0 to"),
    (["extract", TRAIT, "--source", "forward", "--device", "nope"], "--device 'nope' is not a"),
    (["vectors", "export", TRAIT, "--out", "/proc/self/x/y"], "cannot make folder /proc/self/x/y"),
    (["sweep", TRAIT, "--layers", "1-99999999999", "--n", "1"], "is not a range like 8-24"),
    (["sweep", TRAIT, "--layers", "0", "--n", "1"], "a steered layer is a block output, 1 or"),
    (["sweep", TRAIT, "--layers", "2", "--coefs=nan"], "needs finite numbers of size at most"),
    (["sweep", TRAIT, "--layers", "1,,2"], "is not a range like 8-24[:step] or a list"),
    (["steer", TRAIT, "--layer", "2", "--coef", "1e308", "--prompt", "hi"], "size at most 10000"),
    (["judge", TRAIT, "--judge", "openai:"], "--judge 'openai:' must be KIND:MODEL"),
    (["judge", TRAIT, "--judge", "OPENAI:gpt"], "--judge kind 'OPENAI' is unknown"),
    (["judge", TRAIT, "--judge", "local:/nonexistent"], "model path /nonexistent does not exist"),
    (["extract", TRAIT, "--pos-job", "2", "--neg-job", "1"], "job 2 generated neg answers, not"),
    (["pairs", TRAIT, "--pos-job", "999", "--neg-job", "2"], "job 999 is not a generation job"),
    (["pairs", TRAIT, "include", "999", "7", "5"], "has no pair (999, 7, 5)"),
    (["traits", "import", "/dev/zero"], "is not a regular file; pass a .json file"),
    (["run", TRAIT, "--judge", "nojudge"], "--judge 'nojudge' must be KIND:MODEL"),
]


@pytest.mark.parametrize(
    ("argv", "expected"), ADVERSARIAL, ids=[" ".join(a[:3]) for a, _ in ADVERSARIAL]
)
def test_adversarial_inputs_found_by_the_pass(
    capsys, vectors_db: Path, argv: list[str], expected: str
) -> None:
    expect_unchanged(capsys, vectors_db, argv, expected)


def test_an_unknown_judge_precision_writes_no_job(capsys, vectors_db: Path) -> None:
    """``local:MODEL@DTYPE`` with a precision that is not one: refused before any job row,
    by judge and by run (which would generate first)."""
    for argv in (
        ["judge", TRAIT, "--judge", "local:smollm2@bf16"],
        ["run", TRAIT, "--judge", "local:smollm2@bf16"],
    ):
        expect_unchanged(
            capsys,
            vectors_db,
            argv,
            "'smollm2@bf16' asks for precision 'bf16', which is unknown; use smollm2@bfloat16",
        )
    expect_unchanged(
        capsys,
        vectors_db,
        ["judge", TRAIT, "--judge", "local:@bfloat16"],
        "'@bfloat16' names no model before the @; e.g. smollm2@bfloat16",
    )


def test_a_vector_file_that_overflows_float32_is_refused(
    capsys, vectors_db: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """float64 values of 1e300 are finite until they are stored as float32."""
    import torch

    path = tmp_path / "huge.pt"
    torch.save(torch.full((4, 64), 1e300, dtype=torch.float64), path)
    argv = ["vectors", "import", TRAIT, str(path), "--model", str(tiny_model_dir)]
    expect_unchanged(capsys, vectors_db, argv, "NaN or infinite")
    sparse = tmp_path / "sparse.pt"
    torch.save(torch.eye(4, 64).to_sparse(), sparse)
    argv = ["vectors", "import", TRAIT, str(sparse), "--model", str(tiny_model_dir)]
    expect_unchanged(capsys, vectors_db, argv, "holds a torch.sparse_coo tensor")


def test_terminal_control_text_is_shown_not_obeyed(capsys, fresh_db: Path, tmp_path: Path) -> None:
    """An ESC from a file or the command line never reaches the terminal raw: traits list,
    traits show and the error line print it as a visible escape."""
    esc = "\x1b]0;pwned\x07\x1b[2J"
    path = _studio_file(tmp_path, lambda d: d.update(description=f"Sneaky {esc} text."))
    assert cli(capsys, "--db", fresh_db, "traits", "import", path)[0] == 0
    for argv in (["traits", "list"], ["traits", "show", "mine"]):
        code, out, _err = cli(capsys, "--db", fresh_db, *argv)
        assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07" in out  # traits show prints it whole
    code, _out, err = cli(capsys, "--db", fresh_db, "traits", "show", f"pat{esc}")
    assert code == 2 and "\x1b" not in err and "\\x1b" in err


def test_template_does_not_overwrite_and_blank_assistant_names_are_refused(
    capsys, fresh_db: Path, tmp_path: Path
) -> None:
    existing = tmp_path / "mine.json"
    existing.write_text("keep me")
    expect_unchanged(
        capsys, fresh_db, ["traits", "template", "x", "--out", existing], "exists; pass --force"
    )
    assert existing.read_text() == "keep me"
    assert (
        cli(capsys, "--db", fresh_db, "traits", "template", "x", "--out", existing, "--force")[0]
        == 0
    )
    assert existing.read_text() != "keep me"
    for blank in ("   ", "_"):
        expect_unchanged(
            capsys,
            fresh_db,
            ["generate", TRAIT, "--side", "pos", "--assistant-name", blank],
            "has no letter; give the adjective",
        )


def test_control_text_in_model_answers_is_shown_not_obeyed(
    capsys, vectors_db: Path, tmp_path: Path
) -> None:
    """Answers and tokens a model (or screened data) holds print as visible escapes in
    `screen`'s table and in the heatmap (Rich drops BEL but passes ESC through)."""
    from tui.widgets.heatmap import heatmap

    esc = "\x1b]0;pwned\x07\x1b[2J"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": f"hello {esc} there"}) + "\n")
    code, out, _err = cli(capsys, "--db", vectors_db, "screen", TRAIT, "--data", data,
                          "--layer", "1")  # fmt: skip
    assert code == 0 and "\x1b" not in out and "\\x1b[2J" in out
    text = heatmap(["ok", esc], [0.5, -0.5], palette="marks")
    assert "\x1b" not in text.plain and "\\x1b]0;pwned\\x07" in text.plain


def test_an_unknown_judge_is_named_not_counted_as_unscored(capsys, vectors_db: Path) -> None:
    expect_unchanged(
        capsys,
        vectors_db,
        ["pairs", TRAIT, "--judge", "nobody"],
        "judge 'nobody' scored none of jobs",
    )


def test_screen_data_nested_too_deeply_or_odd_turns(
    capsys, vectors_db: Path, tmp_path: Path
) -> None:
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    argv = ["screen", TRAIT, "--data", deep]
    expect_unchanged(capsys, vectors_db, argv, "line 1 is nested too deeply to read")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"messages": ["hi", {"role": "assistant", "content": "x"}]}) + "\n")
    argv = ["screen", TRAIT, "--data", odd]
    expect_unchanged(capsys, vectors_db, argv, "line 1 needs 'prompt' and 'response' strings")


def test_screen_samples_past_the_models_context(capsys, vectors_db: Path, tmp_path: Path) -> None:
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "hi", "response": "the answer " * 3000}) + "\n")
    argv = ["screen", TRAIT, "--data", long]
    expect_unchanged(capsys, vectors_db, argv, "sample 1 is")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    from pipeline.screening import screen

    with Store(vectors_db) as store, pytest.raises(PersonaError, match="plus the 5000 tokens"):
        screen(store, TRAIT, short, compare_base=True, max_new_tokens=5000)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["screen", TRAIT, "--data", ""], "argument --data: is empty; pass a file"),
        (["vectors", "export", TRAIT, "--out", ""], "argument --out: is empty; pass a folder"),
        (["screen", TRAIT, "--data", "d.jsonl", "--out", " "], "argument --out: is empty"),
        (["generate", TRAIT, "--side", "pos", "--tokenizer", ""], "--tokenizer is empty"),
    ],
)
def test_empty_values_are_refused_not_defaulted(
    capsys, vectors_db: Path, argv: list[str], expected: str
) -> None:
    """An empty path is not the current folder, an empty tokenizer not the model's own."""
    expect_unchanged(capsys, vectors_db, argv, expected)
