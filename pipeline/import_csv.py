"""Import the original persona-vectors project's generation CSVs (one per side) as two
generation jobs with their trait and coherence judgments.

The original pairs pos and neg rows by CSV row order. Here every row gets a key instead, the
same way in both files, so a missing or reordered row cannot shift every pair after it:
``question`` is the row's question's index among the trait's questions (else 1000 + the order
in which that unknown question first appears in the file), ``instruction`` is the integer after
the last "_" of ``question_id`` (else 0), and ``sample`` counts earlier rows of the file with
the same (question, instruction).

Both files are read, checked and tokenised before anything is written; the writes for both
sides then commit together or not at all.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db import PersonaError, Store, TraitDefinition
from db.store import utc_now
from pipeline.models import resolve_model

SIDES = ("pos", "neg")
SPLIT = "extract"
TEXT_COLUMNS = ("question", "prompt", "answer", "question_id")
UNKNOWN_QUESTION_BASE = 1000
NO_SCORE = "no score in the CSV"
FINISH_REASON = "imported"
BACKEND = "import"

RowKey = tuple[int, int, int]  # (question, instruction, sample)


@dataclass(frozen=True)
class ImportResult:
    pos_job: int
    neg_job: int
    pos_rows: int
    neg_rows: int
    unscored: int  # scores (trait or coherence) left empty in the CSVs


@dataclass(frozen=True)
class _CsvRow:
    key: RowKey
    question_text: str
    prompt: str
    answer: str
    trait_score: float | None
    coherence: float | None


@dataclass
class _CsvSide:
    side: str
    path: Path
    rows: list[_CsvRow]


def import_csv(
    store: Store,
    trait: str,
    pos_csv: str | Path,
    neg_csv: str | Path,
    *,
    model: str,
    judge: str = "imported",
) -> ImportResult:
    """Import a pos and a neg CSV of the original project for ``trait``; ``model`` names the
    model that wrote the answers (its tokenizer gives the token ids)."""
    definition = store.get_trait(trait)  # unknown trait: one-line error, nothing written
    if not judge or not judge.strip():
        raise PersonaError("the judge name is empty; pass a name such as imported")
    model_id = resolve_model(model).model_id
    sides = [
        _read_side(side, Path(path), definition)
        for side, path in zip(SIDES, (pos_csv, neg_csv), strict=True)
    ]
    tokenizer = _tokenizer(model)
    tokens = [
        (
            _tokenise(tokenizer, [r.prompt for r in parsed.rows]),
            _tokenise(tokenizer, [r.answer for r in parsed.rows]),
        )
        for parsed in sides
    ]

    jobs: dict[str, int] = {}
    unscored = 0
    with store.transaction():
        for parsed, (prompt_ids, answer_ids) in zip(sides, tokens, strict=True):
            jobs[parsed.side] = _write_side(
                store, trait, parsed, prompt_ids, answer_ids, model_id, judge
            )
            unscored += sum((r.trait_score is None) + (r.coherence is None) for r in parsed.rows)
    return ImportResult(
        pos_job=jobs["pos"],
        neg_job=jobs["neg"],
        pos_rows=len(sides[0].rows),
        neg_rows=len(sides[1].rows),
        unscored=unscored,
    )


# ---- reading and checking ---------------------------------------------------------------
def _read_side(side: str, path: Path, trait: TraitDefinition) -> _CsvSide:
    frame = _read_frame(side, path, trait.name)
    n = len(frame)
    texts = {column: _column_text(frame[column].tolist()) for column in TEXT_COLUMNS}
    if any(None in values for values in texts.values()):
        texts = _recover_text(side, path, frame, texts)
    trait_scores = [
        _score(v, path, i + 1, trait.name) for i, v in enumerate(frame[trait.name].tolist())
    ]
    coherence = [
        _score(v, path, i + 1, "coherence") for i, v in enumerate(frame["coherence"].tolist())
    ]

    unknown: dict[str, int] = {}
    seen: Counter[tuple[int, int]] = Counter()
    rows = []
    for i in range(n):
        text = texts["question"][i]
        if text in trait.questions:
            question = trait.questions.index(text)
        else:
            question = UNKNOWN_QUESTION_BASE + unknown.setdefault(text, len(unknown))
        instruction = _instruction(texts["question_id"][i])
        sample = seen[(question, instruction)]
        seen[(question, instruction)] += 1
        rows.append(
            _CsvRow(
                key=(question, instruction, sample),
                question_text=text,
                prompt=texts["prompt"][i],
                answer=texts["answer"][i],
                trait_score=trait_scores[i],
                coherence=coherence[i],
            )
        )
    return _CsvSide(side=side, path=path, rows=rows)


def _read_frame(side: str, path: Path, trait_name: str) -> Any:
    import pandas as pd

    if not path.exists():
        raise PersonaError(f"{side} CSV {path} does not exist; check the path")
    if not path.is_file():
        raise PersonaError(f"{side} CSV {path} is not a file; pass the path of the CSV itself")
    try:
        # Text stays text ("007" is not 7); empty and NA-like cells read as NaN.
        frame = pd.read_csv(path, dtype=str, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise PersonaError(
            f"{side} CSV {path} is empty; pass the CSV the original project wrote"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise PersonaError(
            f"cannot read {side} CSV {path} ({_one_line(exc)}); check it is a UTF-8 CSV "
            "written by the original project"
        ) from None
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas takes the first column(s) for the row index when the first data row has
        # more cells than the header, shifting every cell to the wrong column.
        raise PersonaError(
            f"{side} CSV {path}: data row 1 has more cells than the header has columns; "
            "remove the extra cells (a stray trailing comma?) or name their column"
        )
    required = [*TEXT_COLUMNS, trait_name, "coherence"]
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise PersonaError(
            f"{side} CSV {path} lacks column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}; it needs the columns {', '.join(required)}"
        )
    if frame.empty:
        raise PersonaError(
            f"{side} CSV {path} has no rows, only a header; pass the CSV with the answers"
        )
    return frame


def _column_text(values: list[Any]) -> list[str | None]:
    """Cell texts, None where pandas read NaN."""
    return [v if isinstance(v, str) else None for v in values]


def _recover_text(
    side: str, path: Path, frame: Any, texts: dict[str, list[str | None]]
) -> dict[str, list[str]]:
    """keep_default_na turns an empty cell, and also an answer that is exactly "None", "NA",
    "null"..., into NaN; read those text cells again verbatim."""
    import pandas as pd

    raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    if len(raw) != len(frame):  # the same parser on the same file: never expected
        raise PersonaError(f"cannot read {side} CSV {path} consistently; check the file")
    return {
        column: [
            value if value is not None else str(raw_value)
            for value, raw_value in zip(values, raw[column].tolist(), strict=True)
        ]
        for column, values in texts.items()
    }


def _score(value: Any, path: Path, row: int, column: str) -> float | None:
    if not isinstance(value, str):
        return None  # NaN: an empty or NA cell
    text = value.strip()
    if not text:
        return None
    try:
        score = float(text)
    except ValueError:
        raise PersonaError(
            f"{path} data row {row}, column '{column}': {text[:40]!r} is not a number; fix "
            "the score or empty the cell to import the row unscored"
        ) from None
    if math.isnan(score):
        return None
    if not 0 <= score <= 100:
        raise PersonaError(
            f"{path} data row {row}, column '{column}': score {text[:40]} is outside 0-100; fix "
            "the score or empty the cell to import the row unscored"
        )
    return score


def _instruction(question_id: str) -> int:
    if "_" not in question_id:
        return 0
    try:
        number = int(question_id.rsplit("_", 1)[1])
    except ValueError:
        return 0
    # SQLite stores signed 64-bit integers; a longer number is no instruction index, so it
    # counts as none, the same way in both files.
    return number if -(2**63) <= number < 2**63 else 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


# ---- tokenising and writing ------------------------------------------------------------
def _tokenizer(model: str) -> Any:
    from pipeline.generate import _local_tokenizer

    try:
        return _local_tokenizer(model, required=True)
    except (OSError, ValueError) as exc:
        raise PersonaError(f"cannot load the tokenizer of {model}: {_one_line(exc)}") from None


def _tokenise(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text on its own, without special tokens added: a prompt and its answer are never
    joined into one string, so a merge across their boundary cannot change either's ids."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _write_side(
    store: Store,
    trait: str,
    parsed: _CsvSide,
    prompt_ids: list[list[int]],
    answer_ids: list[list[int]],
    model_id: str,
    judge: str,
) -> int:
    params = {
        "side": parsed.side,
        "split": SPLIT,
        "model": model_id,
        "imported_from": str(parsed.path),
        "backend": BACKEND,
    }
    job_id = store.create_job("generate", trait, params).id
    store.add_responses(
        {
            "job": job_id,
            "trait": trait,
            "side": parsed.side,
            "split": SPLIT,
            "question": row.key[0],
            "instruction": row.key[1],
            "sample": row.key[2],
            "question_text": row.question_text,
            "system_prompt": "",  # the CSV keeps only the rendered prompt: stored as it is
            "prompt_text": row.prompt,
            "prompt_ids": prompt,
            "answer_ids": answer,
            "answer": row.answer,
            "finish_reason": FINISH_REASON,
            "model": model_id,
        }
        for row, prompt, answer in zip(parsed.rows, prompt_ids, answer_ids, strict=True)
    )
    ids = {r.key: r.id for r in store.responses(job=job_id)}
    evidence = {"source": "csv", "file": parsed.path.name}
    store.add_judgments(
        {
            "response": ids[row.key],
            "metric": metric,
            "judge": judge,
            "score": score,
            "evidence": evidence,
            "error": NO_SCORE if score is None else None,
        }
        for row in parsed.rows
        for metric, score in (("trait", row.trait_score), ("coherence", row.coherence))
    )
    now = utc_now()
    n = len(parsed.rows)
    store.update_job(
        job_id,
        status="done",
        done=n,
        total=n,
        started=now,
        ended=now,
        message=f"imported {n} responses from {parsed.path.name}",
    )
    return job_id
