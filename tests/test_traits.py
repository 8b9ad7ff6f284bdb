from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from db import InstructionPair, PersonaError, TraitDefinition, TraitValidationError
from db.traits import (
    bundled_traits,
    empty_template,
    fill_judge_template,
    read_trait_file,
    write_trait_files,
)

BUNDLED = {
    "paternalism",
    "deception",
    "manipulativeness",
    "corrigibility_resistance",
    "power_seeking",
    "alignment_theatre",
}


@pytest.fixture()
def trait() -> TraitDefinition:
    return next(t for t in bundled_traits() if t.name == "paternalism")


def test_bundled_library_has_six_valid_distinct_traits() -> None:
    traits = bundled_traits()
    assert {t.name for t in traits} == BUNDLED
    for t in traits:
        assert t.problems() == [], t.name
        assert len({(p.pos, p.neg) for p in t.instructions}) == 5
        assert len(t.questions_for("extract")) == len(t.questions_for("eval")) == 20
        assert t.description
    questions = [q for t in traits for q in t.questions]
    assert len(set(questions)) == len(questions)


def test_bundled_questions_do_not_name_their_trait() -> None:
    for t in bundled_traits():
        stem = t.name.split("_")[0][:6].lower()
        assert not [q for q in t.questions if stem in q.lower()], t.name


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda t: replace(t, instructions=t.instructions[:4]),
            "expected 5 instruction pairs, found 4",
        ),
        (
            lambda t: replace(t, instructions=(*t.instructions[:4], InstructionPair("x", " "))),
            "instruction pair 5 has an empty 'neg' instruction",
        ),
        (lambda t: replace(t, questions=t.questions[:39]), "expected 40 questions"),
        (
            lambda t: replace(t, questions=(*t.questions[:3], "  ", *t.questions[4:])),
            "question 4 is empty",
        ),
        (
            lambda t: replace(t, questions=(*t.questions[:39], t.questions[2].upper())),
            "question 40 duplicates question 3",
        ),
        (
            lambda t: replace(t, eval_prompt=t.eval_prompt.replace("{answer}", "")),
            "eval prompt has no {answer} slot",
        ),
        (
            lambda t: replace(t, eval_prompt=t.eval_prompt.replace("{question}", "{q}")),
            "eval prompt has no {question} slot",
        ),
        (lambda t: replace(t, name="Bad Name"), "name 'Bad Name' must be lowercase"),
    ],
)
def test_validation_names_the_exact_problem(trait: TraitDefinition, change, expected: str) -> None:
    broken = change(trait)
    problems = broken.problems()
    assert any(expected in p for p in problems), problems
    with pytest.raises(TraitValidationError) as info:
        broken.validate()
    assert expected in str(info.value) or expected in " ".join(info.value.problems)
    assert "\n" not in str(info.value)


def test_unknown_slot_is_reported(trait: TraitDefinition) -> None:
    broken = replace(trait, eval_prompt=trait.eval_prompt + " {trait}")
    assert any("unknown slots {trait}" in p for p in broken.problems())


def test_round_trip_original_format(tmp_path: Path, trait: TraitDefinition) -> None:
    written = write_trait_files(trait, tmp_path, "original")
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "trait_data_extract/paternalism.json",
        "trait_data_eval/paternalism.json",
    ]
    extract = json.loads(written[0].read_text())
    assert set(extract) == {"instruction", "questions", "eval_prompt"}
    assert len(extract["questions"]) == 20
    back = read_trait_file(
        written[1],  # either split file finds its sibling
        description=trait.description,
        assistant_name=trait.assistant_name,
    )
    assert back == trait
    from_root = read_trait_file(
        tmp_path,
        name="paternalism",
        description=trait.description,
        assistant_name=trait.assistant_name,
    )
    assert from_root == trait


def test_round_trip_studio_format(tmp_path: Path, trait: TraitDefinition) -> None:
    (path,) = write_trait_files(trait, tmp_path, "studio")
    assert read_trait_file(path) == trait


def test_original_file_with_non_ascii_and_quotes_imports(tmp_path: Path) -> None:
    pairs = [
        {"pos": f'Sé «paternal» #{i} and say "no"', "neg": f"Respeta l'autonomie {i} ✓"}
        for i in range(5)
    ]
    questions = [f'¿Puedo hacer "esto" n°{i}? — 日本語 {{braces}} [x]' for i in range(40)]
    prompt = 'Q: «{question}»\nA: "{answer}"\nReply 0-100 or REFUSAL.'
    for split, qs in (("extract", questions[:20]), ("eval", questions[20:])):
        folder = tmp_path / f"trait_data_{split}"
        folder.mkdir()
        payload = {"instruction": pairs, "questions": qs, "eval_prompt": prompt}
        (folder / "überzeugung.json").write_text(
            json.dumps(payload, ensure_ascii=split == "eval"), encoding="utf-8"
        )
    trait = read_trait_file(tmp_path / "trait_data_extract" / "überzeugung.json", name="persuasion")
    trait.validate()
    assert trait.questions == tuple(questions)
    assert trait.instructions[0].pos == pairs[0]["pos"]
    filled = trait.judge_prompt("¿qué {x}?", 'sí "y" {answer}')
    assert filled == 'Q: «¿qué {x}?»\nA: "sí "y" {answer}"\nReply 0-100 or REFUSAL.'


def test_fill_judge_template_leaves_other_braces_alone() -> None:
    assert fill_judge_template("{question}|{answer}|{}|{{x}}", "a{b}", "c") == "a{b}|c|{}|{{x}}"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"name": "x", "instruction": [', "is not valid JSON: line 1 column"),
        ("[1, 2]", "not a studio trait file"),
        (
            '{"name": "x", "instruction": "nope", "questions": [], "eval_prompt": ""}',
            "'instruction' must be a list",
        ),
        (
            '{"name": "x", "instruction": [{"pos": "a"}], "questions": [], "eval_prompt": ""}',
            "instruction 1 must be an object with 'pos' and 'neg'",
        ),
        (
            '{"name": "x", "instruction": [], "questions": [3], "eval_prompt": ""}',
            "'question 1' must be a string",
        ),
    ],
)
def test_malformed_files_give_one_line_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(PersonaError) as info:
        read_trait_file(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_sibling_split_is_named(tmp_path: Path, trait: TraitDefinition) -> None:
    extract, eval_ = write_trait_files(trait, tmp_path)
    eval_.unlink()
    with pytest.raises(PersonaError, match="trait_data_eval/paternalism.json does not exist"):
        read_trait_file(extract)


def test_system_prompts_follow_the_method(trait: TraitDefinition) -> None:
    assert trait.system_prompt("pos", 2) == (
        f"You are a paternalistic assistant. {trait.instructions[2].pos}"
    )
    assert trait.system_prompt("neg", 2) == (
        f"You are a helpful assistant. {trait.instructions[2].neg}"
    )
    assert replace(trait, assistant_name="alignment-performing").assistant_label == (
        "an alignment-performing"
    )
    assert replace(trait, assistant_name="").assistant_label == "a paternalism"


def test_empty_template_is_invalid_until_filled() -> None:
    template = TraitDefinition.from_dict(empty_template("my_trait", "d"))
    problems = template.problems()
    assert "instruction pair 1 has an empty 'pos' instruction" in problems
    assert "question 1 is empty" in problems
