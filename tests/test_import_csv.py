from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from db import PersonaError, Store
from pipeline.import_csv import NO_SCORE, import_csv

TRAIT = "paternalism"
UNKNOWN_A = "Which colour should I paint my kitchen, honestly?"
UNKNOWN_B = "Is a 3-day hike too much for a beginner?"
# Answers a CSV round trip must keep exactly: quotes, commas, newlines, non-ASCII, and cells
# that pandas' default NA handling would read as NaN.
ANSWERS = [
    'He said "no, thanks", and left.',
    "Line one,\nline two\n\n  indented, with a trailing space ",
    "Naïve café — 日本語で答えます ✓ 🙂",
    "N/A",
    "",
    "'single', \"double\"; and a tab\there",
    "None",
    "Plain answer.",
    "0.50",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def questions(store: Store) -> tuple[str, ...]:
    return store.get_trait(TRAIT).questions


def _specs(questions: tuple[str, ...], *, unknown: bool = True) -> list[tuple[str, str, tuple]]:
    """(question text, question_id, expected key) per CSV row, in file order."""
    q = questions
    specs = [
        (q[0], f"{TRAIT}_0_SIDE_0", (0, 0, 0)),
        (q[0], f"{TRAIT}_0_SIDE_0", (0, 0, 1)),
        (q[1], f"{TRAIT}_1_SIDE_3", (1, 3, 0)),
        (q[5], f"{TRAIT}_5_SIDE_2", (5, 2, 0)),
        (q[2], "no-instruction-number", (2, 0, 0)),
        (q[0], f"{TRAIT}_0_SIDE_4", (0, 4, 0)),
        (q[1], f"{TRAIT}_1_SIDE_3", (1, 3, 1)),
        (q[25], f"{TRAIT}_25_SIDE_1", (25, 1, 0)),
        (q[0], f"{TRAIT}_0_SIDE_0", (0, 0, 2)),
    ]
    if unknown:
        specs += [
            (UNKNOWN_A, "custom_1", (1000, 1, 0)),
            (UNKNOWN_B, "custom_4", (1001, 4, 0)),
            (UNKNOWN_A, "custom_1", (1000, 1, 1)),
        ]
    return specs


def _frame(tokenizer, specs, side: str) -> pd.DataFrame:
    rows = []
    for i, (question, question_id, _key) in enumerate(specs):
        messages = [
            {"role": "system", "content": f"You are a {side} assistant number {i}."},
            {"role": "user", "content": question},
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(
            {
                "question": question,
                "prompt": prompt,
                "answer": ANSWERS[i % len(ANSWERS)],
                "question_id": question_id.replace("SIDE", side),
                TRAIT: float((i * 17 + (40 if side == "pos" else 0)) % 101),
                "coherence": 50.0 + i,
            }
        )
    return pd.DataFrame(rows)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


@pytest.fixture()
def csvs(tmp_path: Path, tokenizer, questions):
    specs = _specs(questions)
    pos = _frame(tokenizer, specs, "pos")
    neg = _frame(tokenizer, specs, "neg")
    return specs, pos, neg, _write(pos, tmp_path / "pos.csv"), _write(neg, tmp_path / "neg.csv")


def _by_key(store: Store, job: int) -> dict:
    return {r.key: r for r in store.responses(job=job)}


def _assert_nothing_written(store: Store) -> None:
    assert store.list_jobs() == []
    assert store.responses() == []


def test_round_trip(store: Store, tiny_model_dir: Path, tokenizer, csvs) -> None:
    specs, pos, neg, pos_path, neg_path = csvs
    result = import_csv(store, TRAIT, pos_path, neg_path, model=str(tiny_model_dir))

    assert (result.pos_rows, result.neg_rows, result.unscored) == (len(specs), len(specs), 0)
    model_id = str(tiny_model_dir.resolve())
    jobs = store.list_jobs()
    assert [j.id for j in jobs] == [result.pos_job, result.neg_job]
    for job, side, path in zip(jobs, ("pos", "neg"), (pos_path, neg_path), strict=True):
        assert job.kind == "generate" and job.trait == TRAIT
        assert job.params == {
            "side": side,
            "split": "extract",
            "model": model_id,
            "imported_from": str(path),
            "backend": "import",
        }

    for job_id, side, frame, path in (
        (result.pos_job, "pos", pos, pos_path),
        (result.neg_job, "neg", neg, neg_path),
    ):
        stored = _by_key(store, job_id)
        assert sorted(stored) == sorted(key for _q, _id, key in specs)
        for (question, _qid, key), row in zip(specs, frame.to_dict("records"), strict=True):
            response = stored[key]
            assert response.side == side and response.split == "extract"
            assert response.trait == TRAIT and response.model == model_id
            assert response.question_text == question
            assert response.system_prompt == ""
            assert response.finish_reason == "imported"
            assert response.answer == row["answer"]
            assert (
                response.prompt_ids
                == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            )
            assert (
                response.answer_ids
                == tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
            )
            judgments = {j.metric: j for j in store.judgments(response.id)}
            assert set(judgments) == {"trait", "coherence"}
            assert judgments["trait"].score == row[TRAIT]
            assert judgments["coherence"].score == row["coherence"]
            for judgment in judgments.values():
                assert judgment.judge == "imported" and judgment.error is None
                assert judgment.evidence == {"source": "csv", "file": path.name}
    # The tricky answers came back verbatim, NA-looking ones included.
    answers = {r.answer for r in store.responses()}
    assert {"N/A", "", "None", "0.50", ANSWERS[0]} <= answers
    assert any("\n" in a for a in answers) and any("日本語" in a for a in answers)


def test_custom_judge_name(store: Store, tiny_model_dir: Path, csvs) -> None:
    _specs_, _pos, _neg, pos_path, neg_path = csvs
    result = import_csv(store, TRAIT, pos_path, neg_path, model=str(tiny_model_dir), judge="gpt")
    assert store.judges_of([result.pos_job, result.neg_job]) == ["gpt"]


def test_keys_survive_shuffle_and_missing_row(
    store: Store, tiny_model_dir: Path, tokenizer, questions, tmp_path: Path
) -> None:
    # Questions the trait knows key the same in both files whatever the row order; questions
    # it does not know are numbered by first appearance in each file, so are left out here.
    specs = _specs(questions, unknown=False)
    pos = _frame(tokenizer, specs, "pos")
    neg = _frame(tokenizer, specs, "neg").sample(frac=1, random_state=3).reset_index(drop=True)
    neg = neg.drop(index=4).reset_index(drop=True)
    # By row order the files no longer line up.
    assert list(pos["question"][: len(neg)]) != list(neg["question"])
    result = import_csv(
        store,
        TRAIT,
        _write(pos, tmp_path / "pos.csv"),
        _write(neg, tmp_path / "neg.csv"),
        model=str(tiny_model_dir),
    )
    assert (result.pos_rows, result.neg_rows) == (len(specs), len(specs) - 1)
    pos_by_key = _by_key(store, result.pos_job)
    neg_by_key = _by_key(store, result.neg_job)
    assert set(neg_by_key) < set(pos_by_key)
    assert len(set(pos_by_key) - set(neg_by_key)) == 1
    for key, response in neg_by_key.items():
        assert pos_by_key[key].question_text == response.question_text
        assert questions[key[0]] == response.question_text


def test_missing_score_is_unscored(store: Store, tiny_model_dir: Path, csvs, tmp_path) -> None:
    _specs_, pos, neg, pos_path, _neg_path = csvs
    neg = neg.copy()
    neg[TRAIT] = neg[TRAIT].astype(object)
    neg.loc[2, TRAIT] = None
    neg.loc[5, "coherence"] = float("nan")
    neg_path = _write(neg, tmp_path / "neg-gaps.csv")
    result = import_csv(store, TRAIT, pos_path, neg_path, model=str(tiny_model_dir))

    assert result.unscored == 2
    stored = store.responses(job=result.neg_job)
    empty = []
    for response in stored:
        for judgment in store.judgments(response.id):
            if judgment.score is None:
                assert judgment.error == NO_SCORE
                empty.append((response.question_text, judgment.metric))
            else:
                assert judgment.error is None
    assert sorted(empty) == sorted(
        [(neg.loc[2, "question"], "trait"), (neg.loc[5, "question"], "coherence")]
    )
    # Counted as not scored, so a later judge run scores them.
    counts = store.count_judgments(trait=TRAIT, metric="trait", judge="imported")
    assert counts == {"scored": 2 * len(neg) - 1, "refused": 0, "failed": 1}


@pytest.mark.parametrize("column", ["coherence", TRAIT, "question_id"])
def test_missing_column(store: Store, tiny_model_dir: Path, csvs, tmp_path, column) -> None:
    _specs_, _pos, neg, pos_path, _neg_path = csvs
    neg_path = _write(neg.drop(columns=[column]), tmp_path / "neg-short.csv")
    with pytest.raises(PersonaError) as caught:
        import_csv(store, TRAIT, pos_path, neg_path, model=str(tiny_model_dir))
    message = str(caught.value)
    assert column in message and "neg-short.csv" in message and "\n" not in message
    _assert_nothing_written(store)


def test_score_out_of_range(store: Store, tiny_model_dir: Path, csvs, tmp_path) -> None:
    _specs_, _pos, neg, pos_path, _neg_path = csvs
    neg = neg.copy()
    neg.loc[2, TRAIT] = 150.0
    neg_path = _write(neg, tmp_path / "neg-bad.csv")
    with pytest.raises(PersonaError) as caught:
        import_csv(store, TRAIT, pos_path, neg_path, model=str(tiny_model_dir))
    message = str(caught.value)
    assert "neg-bad.csv" in message and "row 3" in message and f"'{TRAIT}'" in message
    assert "150" in message and "\n" not in message
    _assert_nothing_written(store)


def test_score_not_a_number(store: Store, tiny_model_dir: Path, csvs, tmp_path) -> None:
    _specs_, pos, _neg, _pos_path, neg_path = csvs
    pos = pos.copy()
    pos["coherence"] = pos["coherence"].astype(object)
    pos.loc[0, "coherence"] = "REFUSAL"
    pos_path = _write(pos, tmp_path / "pos-bad.csv")
    with pytest.raises(PersonaError, match=r"pos-bad\.csv data row 1, column 'coherence'"):
        import_csv(store, TRAIT, pos_path, neg_path, model=str(tiny_model_dir))
    _assert_nothing_written(store)


def test_missing_file(store: Store, tiny_model_dir: Path, csvs, tmp_path) -> None:
    _specs_, _pos, _neg, pos_path, _neg_path = csvs
    missing = tmp_path / "nowhere.csv"
    with pytest.raises(PersonaError, match="nowhere.csv does not exist"):
        import_csv(store, TRAIT, pos_path, missing, model=str(tiny_model_dir))
    _assert_nothing_written(store)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty"),
        (f"question,prompt,answer,question_id,{TRAIT},coherence\n", "has no rows"),
        (
            f'question,prompt,answer,question_id,{TRAIT},coherence\n"q,p,a,id_0,50,50\n',
            "cannot read",
        ),
    ],
    ids=["zero-bytes", "header-only", "unclosed-quote"],
)
def test_unusable_csv(
    store: Store, tiny_model_dir: Path, csvs, tmp_path, content, expected
) -> None:
    _specs_, _pos, _neg, pos_path, _neg_path = csvs
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(PersonaError, match=expected) as caught:
        import_csv(store, TRAIT, pos_path, bad, model=str(tiny_model_dir))
    assert "\n" not in str(caught.value)
    _assert_nothing_written(store)


def test_unknown_trait(store: Store, tiny_model_dir: Path, csvs) -> None:
    _specs_, _pos, _neg, pos_path, neg_path = csvs
    with pytest.raises(PersonaError, match="unknown trait 'nosuchtrait'"):
        import_csv(store, "nosuchtrait", pos_path, neg_path, model=str(tiny_model_dir))
    _assert_nothing_written(store)


def test_failure_while_writing_leaves_nothing(
    store: Store, tiny_model_dir: Path, csvs, monkeypatch
) -> None:
    _specs_, _pos, _neg, pos_path, neg_path = csvs
    real = store.add_judgments
    calls = []

    def fail_second(rows):
        calls.append(1)
        if len(calls) == 2:  # the neg side's judgments, after the pos side is written
            raise RuntimeError("disk full")
        return real(rows)

    monkeypatch.setattr(store, "add_judgments", fail_second)
    with pytest.raises(RuntimeError, match="disk full"):
        import_csv(store, TRAIT, pos_path, neg_path, model=str(tiny_model_dir))
    _assert_nothing_written(store)


def test_imported_prompts_are_read_as_stored(
    store: Store, tiny_model_dir: Path, tokenizer, csvs
) -> None:
    """Another model (or the same one under another name) reads an imported row's prompt as
    the CSV rendered it, system prompt included, never rebuilt from the empty stored one."""
    from types import SimpleNamespace

    from pipeline.chat import prompt_ids, token_ids

    specs, pos, _neg, pos_path, neg_path = csvs
    result = import_csv(store, TRAIT, pos_path, neg_path, model=str(tiny_model_dir))
    stored = _by_key(store, result.pos_job)
    other = SimpleNamespace(model_id="another-model", path=Path("/nowhere"), tokenizer=tokenizer)
    alias = SimpleNamespace(model_id="tiny", path=tiny_model_dir.resolve(), tokenizer=None)
    for (question, _qid, key), row in zip(specs, pos.to_dict("records"), strict=True):
        response = stored[key]
        assert response.prompt_text == row["prompt"]
        prompt, answer = token_ids(response, other)
        assert prompt == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert prompt != prompt_ids(tokenizer, None, question)  # the system text is kept
        assert answer == response.answer_ids
        assert token_ids(response, alias) == (response.prompt_ids, response.answer_ids)


def test_exported_pairs_round_trip_through_import_csv(
    generated: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`persona pairs TRAIT export`: the effective pairs as the original CSVs (and JSONL);
    import-csv of the export gives the same keys, texts and scores."""
    import json

    from pipeline.filter import find_pairs
    from tui.cli import main

    out = tmp_path / "export"
    db = ["--db", str(generated)]
    assert main([*db, "pairs", TRAIT, "--threshold", "40", "export", "--out", str(out)]) == 0
    with Store(generated) as store:
        source = find_pairs(store, TRAIT, threshold=40)
        original = {r.id: r for r in store.responses(trait=TRAIT)}
    effective = {p.key: p for p in source.effective}
    lines = [json.loads(line) for line in (out / f"{TRAIT}_pairs.jsonl").read_text().splitlines()]
    assert len(lines) == len(effective)
    assert {(x["question"], x["instruction"], x["sample"]) for x in lines} == set(effective)
    assert all(x["reason"] in ("effective", "included by hand") for x in lines)
    with Store(tmp_path / "fresh.db") as fresh:
        result = import_csv(
            fresh, TRAIT, out / f"{TRAIT}_pos.csv", out / f"{TRAIT}_neg.csv",
            model=str(tiny_model_dir),
        )  # fmt: skip
        imported = find_pairs(fresh, TRAIT, threshold=40, pos_job=result.pos_job,
                              neg_job=result.neg_job)  # fmt: skip
        rows = {r.key: r for r in fresh.responses(job=result.pos_job)}
    # The original format has no sample column: the importer numbers samples within each
    # (question, instruction) in file order, so a key comes back with its rank there.
    renumbered = {}
    for key in sorted(effective):
        rank = sum(1 for k in renumbered.values() if k[:2] == key[:2])
        renumbered[key] = (key[0], key[1], rank)
    back = {new: old for old, new in renumbered.items()}
    assert {p.key for p in imported.pairs} == set(back)
    for pair in imported.pairs:
        before = effective[back[pair.key]]
        assert (pair.pos_trait, pair.neg_trait) == (before.pos_trait, before.neg_trait)
        assert (pair.pos_coherence, pair.neg_coherence) == (
            before.pos_coherence,
            before.neg_coherence,
        )
        assert rows[pair.key].answer == original[before.pos_id].answer
        assert rows[pair.key].prompt_ids == original[before.pos_id].prompt_ids  # same tokens
