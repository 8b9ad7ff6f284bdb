"""Property-based fuzzing (issue #8, item 6) of the code that reads outside data: trait JSON
files, a judge's logprobs and text replies, and the original project's CSVs.

Every property is the same contract: any input gives a usable result or the project's clear
error (a one-line ``PersonaError``; ``RetryableReply`` for a judge's reply), never another
exception, and where a result comes back it is checked against an independent reference."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_import_csv import TRAIT, _frame, _specs
from transformers import AutoTokenizer

from db import PersonaError, Store, TraitDefinition, TraitValidationError
from db.traits import EVAL_DIR, EXTRACT_DIR, bundled_traits, read_trait_file
from pipeline.api_clients import RetryableReply
from pipeline.import_csv import import_csv
from pipeline.judge_scores import (
    MIN_LOGPROB_MASS,
    aggregate_logprobs,
    number_token,
    parse_score_text,
)

# Tests that take a function-scoped fixture (tmp_path, store) reuse it across examples on
# purpose: a fresh database per example would cost more than the whole budget.
FIXTURES_OK = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

BASE = next(t for t in bundled_traits() if t.name == TRAIT)


def assert_one_line(message: str) -> None:
    assert message.strip(), "the error message is empty"
    # splitlines also breaks at \r, \x1c, \x85, \u2028...: any of them would split the
    # CLI's one-line error or the TUI's modal.
    assert len(message.splitlines()) == 1, f"the error message spans lines: {message!r}"


# ---- trait JSON -------------------------------------------------------------------------
TRICKY_TEXT = st.sampled_from(
    [
        "",
        "   ",
        "\n",
        "power_seeking\n",  # a valid name plus a newline: `$` matches before it
        "Paternalism",
        "a" * 65,
        "{question}",
        "{answer}",
        "Q: {question} A: {answer} {score}",
        "{",
        "}}{{",
        "\ud800",  # an unpaired surrogate: valid JSON as "\ud800", not storable as UTF-8
        "日本語 ✓",
        "\x00",
        "\u2028",
    ]
)
TEXT = st.one_of(st.text(max_size=20), TRICKY_TEXT)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), TEXT
)  # floats include NaN and +-inf, which json.dumps writes and json.loads reads back
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def edited_text(draw: st.DrawFn, text: str) -> str:
    """A string changed the ways a hand-written trait goes wrong."""
    how = draw(
        st.sampled_from(["no question", "no answer", "unknown slot", "blank", "newline", "other"])
    )
    if how == "no question":
        return text.replace("{question}", "")
    if how == "no answer":
        return text.replace("{answer}", "{Answer}")
    if how == "unknown slot":
        return text + " {trait}"
    if how == "blank":
        return draw(st.sampled_from(["", " ", "\t\n"]))
    if how == "newline":
        return text + "\n"
    return draw(TEXT)


@st.composite
def mutate_once(draw: st.DrawFn, value: Any) -> Any:
    """One change somewhere in a JSON value: descend to a random node, then replace it, drop
    or add a key, cut, extend or duplicate a list, or edit a string. Copies along the path,
    so the value passed in is never changed."""
    if isinstance(value, dict | list) and value and draw(st.booleans()):
        key = draw(st.sampled_from(list(value) if isinstance(value, dict) else range(len(value))))
        value = copy.copy(value)
        value[key] = draw(mutate_once(value[key]))
        return value
    ops = ["replace"]
    if isinstance(value, dict):
        ops += ["drop key", "add key"] if value else ["add key"]
    if isinstance(value, list):
        ops += ["cut", "duplicate", "extend"] if value else ["extend"]
    if isinstance(value, str):
        ops += ["edit"] * 3
    op = draw(st.sampled_from(ops))
    if op == "replace":
        return draw(JSON_VALUES)
    if op == "drop key":
        key = draw(st.sampled_from(list(value)))
        return {k: v for k, v in value.items() if k != key}
    if op == "add key":
        return {**value, draw(TEXT): draw(JSON_VALUES)}
    if op == "cut":
        return value[: draw(st.integers(0, len(value) - 1))]
    if op == "duplicate":  # a wrong count and, for questions, a duplicate
        return [*value, value[draw(st.integers(0, len(value) - 1))]]
    if op == "extend":
        return [*value, *draw(st.lists(JSON_VALUES, min_size=1, max_size=3))]
    return draw(edited_text(value))


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    for _ in range(draw(st.integers(1, 3))):
        value = draw(mutate_once(value))
    return value


@st.composite
def appended(draw: st.DrawFn, value: Any) -> Any:
    """Text added to the end of one to three strings: mostly still a valid trait (slots,
    counts and distinct questions survive), so the valid path is fuzzed too."""
    for _ in range(draw(st.integers(1, 3))):
        path, node = [], value
        while not isinstance(node, str):
            key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
            path.append(key)
            node = node[key]
        value = _replaced(value, path, node + draw(TEXT))
    return value


def _replaced(value: Any, path: list[Any], leaf: str) -> Any:
    if not path:
        return leaf
    value = copy.copy(value)
    value[path[0]] = _replaced(value[path[0]], path[1:], leaf)
    return value


def trait_json(valid: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Arbitrary JSON, the valid value with text appended (twice as likely: the files it
    goes into are often damaged besides), or mutations of it."""
    return st.one_of(JSON_VALUES, appended(valid), appended(valid), mutated(valid))


STUDIO = BASE.to_dict()
ORIGINAL = BASE.to_original()


def assert_really_valid(trait: TraitDefinition) -> None:
    """The rules of a usable trait, checked without the code under test."""
    assert re.fullmatch(r"[a-z][a-z0-9_]{0,63}", trait.name), trait.name
    assert len(trait.instructions) == 5
    for pair in trait.instructions:
        assert pair.pos.strip() and pair.neg.strip()
    assert len(trait.questions) == 40
    assert all(q.strip() for q in trait.questions)
    assert len({" ".join(q.split()).casefold() for q in trait.questions}) == 40
    slots = set(re.findall(r"\{(\w*)\}", trait.eval_prompt))
    assert slots == {"question", "answer"}, slots
    texts = [trait.name, trait.description, trait.assistant_name, trait.eval_prompt]
    texts += [t for p in trait.instructions for t in (p.pos, p.neg)] + list(trait.questions)
    for text in texts:
        text.encode("utf-8")  # what the store writes: a lone surrogate cannot be saved


def check_trait_or_error(read: Callable[[], TraitDefinition]) -> TraitDefinition | None:
    """The contract for every way in: a trait whose validation agrees with the rules, or a
    one-line PersonaError. Any other exception propagates and fails the test."""
    try:
        trait = read()
    except PersonaError as exc:
        assert_one_line(str(exc))
        return None
    assert isinstance(trait, TraitDefinition)
    problems = trait.problems()
    for problem in problems:
        assert_one_line(problem)
    try:
        trait.validate()
    except TraitValidationError as exc:
        assert problems
        assert_one_line(str(exc))
        return None
    assert problems == []
    assert_really_valid(trait)
    return trait


@settings(max_examples=300, deadline=None)
@given(data=trait_json(STUDIO))
def test_from_dict_gives_a_trait_or_a_clear_error(data: Any) -> None:
    trait = check_trait_or_error(lambda: TraitDefinition.from_dict(data, source="fuzz.json"))
    if trait is not None:  # a valid trait holds exactly the text it was given
        assert trait.name == data["name"]
        assert trait.description == data.get("description", "")
        assert trait.assistant_name == data.get("assistant_name", "")
        assert [(p.pos, p.neg) for p in trait.instructions] == [
            (p["pos"], p["neg"]) for p in data["instruction"]
        ]
        assert list(trait.questions) == data["questions"]
        assert trait.eval_prompt == data["eval_prompt"]


@settings(max_examples=200, deadline=None)
@given(
    name=st.one_of(st.just(TRAIT), TEXT),
    extract=trait_json(ORIGINAL["extract"]),
    eval_=trait_json(ORIGINAL["eval"]),
)
def test_from_original_gives_a_trait_or_a_clear_error(name: str, extract: Any, eval_: Any) -> None:
    check_trait_or_error(
        lambda: TraitDefinition.from_original(name, extract, eval_, source="fuzz.json")
    )


# Texts json.loads fails on in ways other than JSONDecodeError: nesting past the recursion
# limit, and integers past Python's 4300-digit conversion limit.
PATHOLOGICAL_JSON = st.one_of(
    st.integers(1, 200_000).map(lambda n: ("[" * n + "]" * n).encode()),
    st.integers(4000, 20_000).map(lambda n: ("7" * n).encode()),
    st.integers(4000, 20_000).map(
        lambda n: ('{"name": "x", "questions": [' + "9" * n + "]}").encode()
    ),
)


@st.composite
def json_file_bytes(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """The bytes of a JSON file holding a drawn value, often damaged: cut short, a stray
    byte, a BOM, or another encoding."""
    value = draw(values)
    text = json.dumps(
        value, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2]))
    )
    # surrogatepass: a lone surrogate written raw is invalid UTF-8, as on a broken disk file
    raw = text.encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["as is"] * 4 + ["cut", "stray byte", "bom", "latin-1", "utf-16"]))
    if how == "cut":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if how == "stray byte":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=2)) + raw[at:]
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "latin-1":
        return text.encode("latin-1", "replace")
    if how == "utf-16":
        return text.encode("utf-16", "surrogatepass")
    return raw


STUDIO_FILE = json_file_bytes(trait_json(STUDIO))
FILE_BYTES = st.one_of(
    STUDIO_FILE, STUDIO_FILE, STUDIO_FILE, PATHOLOGICAL_JSON, st.binary(max_size=64)
)


@settings(max_examples=200, deadline=None)
@given(raw=FILE_BYTES, rename=st.booleans())
@example(raw=b"[" * 100_000 + b"]" * 100_000, rename=False)
@example(raw=b"7" * 5000, rename=False)
@example(raw=json.dumps({**STUDIO, "name": "power_seeking\n"}).encode(), rename=False)
@example(raw=json.dumps({**STUDIO, "description": "\ud800"}).encode(), rename=False)
@example(raw=b"\xef\xbb\xbf" + json.dumps(STUDIO).encode(), rename=False)
def test_studio_file_gives_a_trait_or_a_clear_error(raw: bytes, rename: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.json"
        path.write_bytes(raw)
        name = "renamed" if rename else None
        trait = check_trait_or_error(lambda: read_trait_file(path, name=name))
    if trait is not None and not rename:
        assert trait.name == json.loads(raw.decode("utf-8-sig"))["name"]
    if raw.removeprefix(b"\xef\xbb\xbf") == json.dumps(STUDIO).encode():
        # The valid file reads back whole, with or without the BOM Windows editors write.
        assert trait == (replace(BASE, name="renamed") if rename else BASE)


# A damaged split file: missing (None), JSON of a changed split, or not JSON at all.
SPLIT_BYTES = {
    split: st.one_of(
        st.none(),
        json_file_bytes(trait_json(ORIGINAL[split])),
        json_file_bytes(trait_json(ORIGINAL[split])),
        json_file_bytes(trait_json(ORIGINAL[split])),
        PATHOLOGICAL_JSON,
        st.binary(max_size=32),
    )
    for split in ORIGINAL
}


@settings(max_examples=150, deadline=None)
@given(
    damaged=st.sets(st.sampled_from(list(ORIGINAL))),
    data=st.data(),
    target=st.sampled_from(["root", "extract", "eval"]),
)
def test_original_files_give_a_trait_or_a_clear_error(
    damaged: set[str], data: st.DataObject, target: str
) -> None:
    """The per-split format: none, one or both split files damaged or missing, read from the
    root folder or from either file."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = {
            "extract": root / EXTRACT_DIR / "fuzzed.json",
            "eval": root / EVAL_DIR / "fuzzed.json",
        }
        for split, path in paths.items():
            path.parent.mkdir()
            raw = json.dumps(ORIGINAL[split]).encode()
            if split in damaged:
                raw = data.draw(SPLIT_BYTES[split], label=split)
            if raw is not None:
                path.write_bytes(raw)
        if target == "root":
            check_trait_or_error(lambda: read_trait_file(root, name="fuzzed"))
        else:
            check_trait_or_error(lambda: read_trait_file(paths[target]))


# ---- logprob aggregation ----------------------------------------------------------------
def reference_number(token: str) -> int | None:
    """The integer 0..100 a token stands for, by the rule in aggregate_logprobs' docstring
    ("tokens that are integers 0..100"), written without number_token's regex.

    Decisions, all matching how the original project read tokens (``int(token)``):
    - surrounding whitespace is ignored: OpenAI-style BPE tokens carry a leading space
      (" 7"), and a server may end the one token with a newline; " 7" means 7;
    - leading zeros count ("07", "050"): the token still names that integer, and the
      original's int("07") == 7;
    - any Unicode decimal digit counts ("５" is 5): int() reads them, and they name the same
      number;
    - signs, exponents, decimals, separators and more than three digits do not ("+5",
      "-0", "1e2", "7.0", "1_0", "0100"): a judge asked for an integer 0..100 that emits
      them is not answering the question, and "-1" or "101" are outside the scale.
    """
    text = token.strip()
    if not 1 <= len(text) <= 3 or not text.isdecimal():
        return None
    value = int(text)
    return value if value <= 100 else None


def reference_aggregate(top: list[tuple[str, float]]) -> tuple[float | None, float]:
    """sum(p*n)/sum(p) over integer tokens, no score under 0.25 mass. NaN and infinite
    logprobs carry no usable probability (-inf is p=0 anyway); a logprob above 0 is a
    probability above 1, so it counts as 1 (rounding noise from a server, or a broken one)."""
    pairs = []
    for token, logprob in top:
        value = reference_number(token)
        if value is None or not math.isfinite(logprob):
            continue
        pairs.append((math.exp(min(logprob, 0.0)), value))
    mass = math.fsum(p for p, _ in pairs)
    if mass < MIN_LOGPROB_MASS:
        return None, mass
    return math.fsum(p * n for p, n in pairs) / mass, mass


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("0", 0),
        ("100", 100),
        (" 50", 50),
        (" 7", 7),
        ("7\n", 7),
        ("050", 50),
        ("07", 7),
        ("５", 5),
        ("101", None),
        ("-1", None),
        ("-0", None),
        ("+5", None),
        ("1e2", None),
        ("7.0", None),
        ("1_0", None),
        ("0100", None),
        ("²", None),  # a superscript is not a decimal digit
        ("", None),
        (" ", None),
        ("REFUSAL", None),
    ],
)
def test_number_token_decisions(token: str, expected: int | None) -> None:
    assert number_token(token) == expected == reference_number(token)


NUMBER_LIKE = st.sampled_from(
    [" 50", "050", "100", "101", "-1", "1e2", "５", "٣", " 7", "07", "7 ", "\n7", "+5", "-0",
     "1_0", "7.0", "", " ", "REFUSAL", "²", "0", "00", "0100"]
)  # fmt: skip
TOKENS = st.one_of(
    NUMBER_LIKE,
    st.integers(-5, 150).map(str),
    st.builds(
        lambda pre, n, post: f"{pre}{n}{post}",
        st.sampled_from(["", " ", "0", "\t"]),
        st.integers(0, 120),
        st.sampled_from(["", " ", "\n"]),
    ),
    st.text(max_size=4),
)
LOGPROBS = st.one_of(
    st.floats(),  # anything, NaN and +-inf included
    st.floats(min_value=-1e6, max_value=0.0),
    st.sampled_from([math.nan, math.inf, -math.inf, -1e308, -745.2, 0.0, -0.0, 1e-9, 710.0]),
)


@settings(max_examples=400, deadline=None)
@given(top=st.lists(st.tuples(TOKENS, LOGPROBS), max_size=25))
@example(top=[])
@example(top=[("5", 800.0)])
@example(top=[("100", 0.0)] * 3)
def test_aggregate_any_input_matches_reference(top: list[tuple[str, float]]) -> None:
    score, mass = aggregate_logprobs(top)
    expected_score, expected_mass = reference_aggregate(top)
    assert mass >= 0 and math.isfinite(mass)
    assert score is None or 0 <= score <= 100
    assert mass == pytest.approx(expected_mass, rel=1e-9, abs=1e-12)
    # Right at the 0.25 cut a rounding difference may land either side; elsewhere not.
    if abs(expected_mass - MIN_LOGPROB_MASS) > 1e-9:
        assert (score is None) == (expected_score is None)
        if score is not None:
            assert score == pytest.approx(expected_score, rel=1e-9, abs=1e-9)


@st.composite
def top_logprobs(draw: st.DrawFn) -> list[tuple[str, float]]:
    """The top entries of a real distribution: probabilities that sum to at most 1, the
    rest of the mass on tokens not listed."""
    tokens = draw(st.lists(TOKENS, max_size=20))
    weights = draw(st.lists(st.floats(1e-30, 1.0), min_size=len(tokens), max_size=len(tokens)))
    unlisted = draw(st.floats(0.0, 1.0))
    total = math.fsum(weights) + unlisted
    return [(t, math.log(w / total)) for t, w in zip(tokens, weights, strict=True)]


@settings(max_examples=300, deadline=None)
@given(top=top_logprobs())
# All mass on "100": the rounded mean came out 100.00000000000001, which the judgments
# table's CHECK (score <= 100) refuses.
@example(
    top=[
        ("100", -1.1394342831883648),
        ("100", -1.8325814637483102),
        ("100", -1.8325814637483102),
        ("100", -3.2188758248682006),
    ]
)
def test_aggregate_a_distribution(top: list[tuple[str, float]]) -> None:
    score, mass = aggregate_logprobs(top)
    expected_score, expected_mass = reference_aggregate(top)
    assert 0 <= mass <= 1 + 1e-9
    assert mass == pytest.approx(expected_mass, rel=1e-9, abs=1e-12)
    if expected_mass >= MIN_LOGPROB_MASS + 1e-9:
        assert score is not None
        assert score == pytest.approx(expected_score, rel=1e-9, abs=1e-9)
        assert 0 <= score <= 100
    elif expected_mass < MIN_LOGPROB_MASS - 1e-9:
        assert score is None


# ---- text scores ------------------------------------------------------------------------
RAISES = object()
_REFUSAL_WORD = re.compile(r"\bREFUSAL\b", re.IGNORECASE)


def reference_score_text(text: str) -> float | None | object:
    """None for the word REFUSAL; else the first run of 1-3 decimal digits that is not part
    of a longer number, a decimal ("3.5") or a negative number ("-5"), as a float when it is
    at most 100; RAISES when that number is over 100 or there is none."""
    if _REFUSAL_WORD.search(text):
        return None
    i = 0
    while i < len(text):
        if not text[i].isdecimal():
            i += 1
            continue
        j = i
        while j < len(text) and text[j].isdecimal():
            j += 1
        before = text[i - 1] if i else ""
        after = text[j] if j < len(text) else ""
        if j - i <= 3 and before not in (".", "-") and after != ".":
            value = int(text[i:j])
            return float(value) if value <= 100 else RAISES
        i = j
    return RAISES


SCORE_TEXT = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.sampled_from(
            [
                "REFUSAL",
                "refusal",
                "REFUSALS",
                "-",
                ".",
                " ",
                "\n",
                ":",
                "Score",
                "5",
                "50",
                "100",
                "101",
                "1000",
                "3.5",
                "1e2",
                "５０",
                "٣",
                "-5",
                "0",
            ]
        ),  # fmt: skip
        max_size=8,
    ).map("".join),
)


@settings(max_examples=400, deadline=None)
@given(text=SCORE_TEXT)
@example(text="-5")
@example(text="Score: -5, I mean 60")
@example(text="3.5")
def test_parse_score_text_matches_reference(text: str) -> None:
    expected = reference_score_text(text)
    if expected is RAISES:
        with pytest.raises(RetryableReply) as caught:
            parse_score_text(text)
        assert_one_line(str(caught.value))
        return
    score = parse_score_text(text)
    assert score == expected
    assert score is None or (isinstance(score, float) and 0 <= score <= 100)


# ---- CSV import -------------------------------------------------------------------------
SIDES = ("pos", "neg")
REQUIRED = ("question", "prompt", "answer", "question_id", TRAIT, "coherence")
SCORE_COLUMNS = (TRAIT, "coherence")
# pandas' default NA strings (read_csv's keep_default_na): such a score cell is empty.
PANDAS_NA = {
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
}  # fmt: skip
TEXT_CELLS = st.one_of(
    st.text(max_size=15),
    st.sampled_from(
        ['He said "no", ok', "a,b", "line\nbreak", "\r\n", "\r", '"', '""', "", " ", "NA",
         "None", "null", "#N/A", "nan", "\ufeff", "\x00", "日本語", "x_99999999999999999999",
         "x_-1", "x_", "_7", "q_٣"]
    ),
)  # fmt: skip
# Scores the import takes (a number 0..100, or empty/NA for unscored) ...
GOOD_SCORES = st.one_of(
    st.sampled_from(
        ["", " ", "NaN", "nan", "-nan", "NA", "None", "null", "N/A", "-0", "0", "100", "100.0",
         "1e2", "1e-300", " 50 ", "５０", "1_0"]
    ),
    st.integers(0, 100).map(str),
    st.floats(0, 100).map(repr),
)  # fmt: skip
# ... and anything, much of it refused.
SCORE_CELLS = st.one_of(
    GOOD_SCORES,
    st.sampled_from(
        ["inf", "-inf", "Infinity", "-1", "100.0001", "150", "REFUSAL", "5,0", "0x10", "50%",
         "1" * 400]
    ),
    st.floats().map(repr),
    st.integers(-10, 200).map(str),
)  # fmt: skip


@pytest.fixture(scope="module")
def base_rows(tiny_model_dir: Path) -> dict[str, list[dict[str, str]]]:
    """test_import_csv's well-formed rows per side, as the strings a CSV holds. Built once:
    loading the tokenizer for the chat prompts is the slow part."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    specs = _specs(BASE.questions)
    return {
        side: [
            {column: str(value) for column, value in row.items()}
            for row in _frame(tokenizer, specs, side).to_dict("records")
        ]
        for side in SIDES
    }


@st.composite
def csv_table(draw: st.DrawFn, rows: list[dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    """A header and rows: base rows (duplicates allowed) with cells swapped for fuzz,
    sometimes a required column gone, extra columns, any column order. Half the tables
    draw their scores from those the import takes, so that whole files import often."""
    header = list(REQUIRED)
    if draw(st.integers(0, 9)) == 0:
        header.remove(draw(st.sampled_from(REQUIRED)))
    header += draw(st.lists(st.one_of(TEXT_CELLS, st.sampled_from(REQUIRED)), max_size=2))
    header = draw(st.permutations(header))
    scores = draw(st.sampled_from([GOOD_SCORES, SCORE_CELLS]))
    table = []
    for _ in range(draw(st.integers(0, 4))):
        base = draw(st.sampled_from(rows))
        cells = []
        for column in header:
            fuzz = scores if column in SCORE_COLUMNS else TEXT_CELLS
            keep = column in base and draw(st.integers(0, 3)) > 0
            cells.append(base[column] if keep else draw(fuzz))
        table.append(cells)
    return header, table


def csv_bytes(
    header: list[str], table: list[list[str]], newline: str, quoting: int, bom: bool
) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator=newline, quoting=quoting).writerows([header, *table])
    return (b"\xef\xbb\xbf" if bom else b"") + out.getvalue().encode("utf-8")


def expected_score(cell: str) -> float | None:
    """What a score cell imports as; raises PersonaError where the importer must refuse."""
    text = cell.strip()
    if cell in PANDAS_NA or not text:
        return None
    try:
        score = float(text)
    except ValueError:
        raise PersonaError("not a number") from None
    if math.isnan(score):
        return None
    if not 0 <= score <= 100:
        raise PersonaError("outside 0-100")
    return score


def expected_rows(header: list[str], table: list[list[str]]) -> Counter | None:
    """(question, answer, trait score, coherence) per row the import must store, None where
    it must refuse the file. pandas keeps the first of duplicated column names."""
    if any(column not in header for column in REQUIRED) or not table:
        return None
    at = {column: header.index(column) for column in REQUIRED}
    try:
        return Counter(
            (
                row[at["question"]],
                row[at["answer"]],
                expected_score(row[at[TRAIT]]),
                expected_score(row[at["coherence"]]),
            )
            for row in table
        )
    except PersonaError:
        return None


def counts(store: Store) -> tuple[int, int, int]:
    return tuple(store.db[table].count for table in ("jobs", "responses", "judgments"))


def stored_rows(store: Store, job: int) -> Counter:
    found = Counter()
    for response in store.responses(job=job):
        scores = {j.metric: j.score for j in store.judgments(response.id)}
        found[(response.question_text, response.answer, scores["trait"], scores["coherence"])] += 1
    return found


def run_import(store: Store, model: Path, pos: Path, neg: Path) -> Any:
    """The import's result, or None after a clear error that wrote nothing."""
    before = counts(store)
    try:
        result = import_csv(store, TRAIT, pos, neg, model=str(model))
    except PersonaError as exc:
        assert_one_line(str(exc))
        assert counts(store) == before, "a refused import wrote to the database"
        return None
    n = result.pos_rows + result.neg_rows
    assert result.pos_rows > 0 and result.neg_rows > 0
    assert counts(store) == (before[0] + 2, before[1] + n, before[2] + 2 * n)
    return result


@settings(FIXTURES_OK, max_examples=120)
@given(data=st.data())
def test_import_of_well_formed_csvs_matches_the_cells(
    data: st.DataObject,
    store: Store,
    tiny_model_dir: Path,
    base_rows: dict[str, list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    """Properly quoted CSVs of fuzzed cells: the import succeeds exactly when every
    required column is there, there are rows, and every score is empty, NA or a number
    0..100; and then every cell comes back verbatim."""
    # QUOTE_MINIMAL quotes a cell holding a character of the line terminator, so with "\n" a
    # lone "\r" would go out unquoted and end the row for pandas: not a well-formed CSV.
    newline, quoting = data.draw(
        st.sampled_from(
            [("\r\n", csv.QUOTE_MINIMAL), ("\n", csv.QUOTE_ALL), ("\r\n", csv.QUOTE_ALL)]
        )
    )
    paths, expected = {}, {}
    for side in SIDES:
        header, table = data.draw(csv_table(base_rows[side]), label=side)
        expected[side] = expected_rows(header, table)
        # Every row one cell longer than the header, as a stray trailing comma makes: pandas
        # would take the first column for the row index and shift the others left, so the
        # import must refuse the file rather than store cells under the wrong columns.
        if data.draw(st.integers(0, 9), label=f"{side} ragged") == 0:
            table = [[*row, data.draw(TEXT_CELLS)] for row in table]
            expected[side] = None
        paths[side] = tmp_path / f"{side}.csv"
        paths[side].write_bytes(
            csv_bytes(header, table, newline, quoting, bom=data.draw(st.booleans()))
        )

    result = run_import(store, tiny_model_dir, paths["pos"], paths["neg"])
    if None in expected.values():
        assert result is None, f"imported a CSV it should refuse: {expected}"
        return
    assert result is not None, "refused a well-formed CSV"
    assert stored_rows(store, result.pos_job) == expected["pos"]
    assert stored_rows(store, result.neg_job) == expected["neg"]


@st.composite
def damaged_csv(draw: st.DrawFn, rows: list[dict[str, str]]) -> bytes:
    """A CSV broken at the byte level: unquoted cells, cut short, stray or deleted bytes,
    another encoding, or random bytes."""
    header, table = draw(csv_table(rows))
    raw = csv_bytes(header, table, "\n", csv.QUOTE_MINIMAL, bom=False)
    how = draw(
        st.sampled_from(["unquoted", "cut", "stray bytes", "delete", "latin-1", "utf-16", "random"])
    )
    if how == "unquoted":  # commas, quotes and newlines in cells shift the columns
        return "\n".join(",".join(row) for row in [header, *table]).encode("utf-8")
    if how == "cut":
        return raw[: draw(st.integers(0, len(raw)))]
    if how == "stray bytes":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at:]
    if how == "delete":
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        return raw[:at] + raw[at + 1 :]
    if how == "latin-1":
        return raw.decode("utf-8").encode("latin-1", "replace")
    if how == "utf-16":
        return raw.decode("utf-8").encode("utf-16")
    return draw(st.binary(max_size=200))


@settings(FIXTURES_OK, max_examples=120)
@given(data=st.data())
def test_import_of_damaged_csvs_is_clean(
    data: st.DataObject,
    store: Store,
    tiny_model_dir: Path,
    base_rows: dict[str, list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    """Any bytes: a successful import whose scores are in range, or a one-line PersonaError
    that left the database as it was."""
    paths = {}
    for side in SIDES:
        paths[side] = tmp_path / f"{side}.csv"
        paths[side].write_bytes(data.draw(damaged_csv(base_rows[side]), label=side))
    result = run_import(store, tiny_model_dir, paths["pos"], paths["neg"])
    if result is not None:
        for job in (result.pos_job, result.neg_job):
            for (_q, _a, *scores), _n in stored_rows(store, job).items():
                assert all(s is None or 0 <= s <= 100 for s in scores)


def test_import_refuses_rows_longer_than_the_header(
    store: Store, tiny_model_dir: Path, base_rows: dict[str, list[dict[str, str]]], tmp_path: Path
) -> None:
    """Found by fuzzing: a trailing comma on every row made pandas use the first column as
    the row index and import every cell under the next column's name."""
    rows = [[row[column] for column in REQUIRED] for row in base_rows["pos"][:3]]
    pos = tmp_path / "pos.csv"
    neg = tmp_path / "neg.csv"
    pos.write_bytes(csv_bytes(list(REQUIRED), rows, "\r\n", csv.QUOTE_MINIMAL, bom=False))
    longer = [[*row, ""] for row in rows]
    neg.write_bytes(csv_bytes(list(REQUIRED), longer, "\r\n", csv.QUOTE_MINIMAL, bom=False))
    assert run_import(store, tiny_model_dir, pos, neg) is None
    with pytest.raises(PersonaError, match="data row 1 has more cells than the header"):
        import_csv(store, TRAIT, pos, neg, model=str(tiny_model_dir))


def test_import_keys_an_overlong_instruction_number_as_none(
    store: Store, tiny_model_dir: Path, base_rows: dict[str, list[dict[str, str]]], tmp_path: Path
) -> None:
    """Found by fuzzing: a question_id ending in a number past SQLite's 64-bit integers
    raised OverflowError while writing; it now counts as no instruction number (0)."""
    rows = [[row[column] for column in REQUIRED] for row in base_rows["pos"][:3]]
    pos = tmp_path / "pos.csv"
    pos.write_bytes(csv_bytes(list(REQUIRED), rows, "\r\n", csv.QUOTE_MINIMAL, bom=False))
    rows[0][REQUIRED.index("question_id")] = f"{TRAIT}_0_pos_{'9' * 25}"
    neg = tmp_path / "neg.csv"
    neg.write_bytes(csv_bytes(list(REQUIRED), rows, "\r\n", csv.QUOTE_MINIMAL, bom=False))
    result = run_import(store, tiny_model_dir, pos, neg)
    assert result is not None
    assert sorted(r.key for r in store.responses(job=result.neg_job)) == [
        (0, 0, 0),
        (0, 0, 1),
        (1, 3, 0),
    ]
