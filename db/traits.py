"""Trait definitions: the typed model, its validation, and the JSON formats it travels in.

Two file formats:
- the studio format, one file per trait: ``{"name", "assistant_name", "description",
  "instruction": [{"pos", "neg"}] * 5, "questions": [...] * 40, "eval_prompt"}``;
- the original project's format, one file per split: ``trait_data_extract/NAME.json`` and
  ``trait_data_eval/NAME.json``, each ``{"instruction", "questions": [...] * 20, "eval_prompt"}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from db.errors import PersonaError

N_PAIRS = 5
N_QUESTIONS_PER_SPLIT = 20
N_QUESTIONS = 2 * N_QUESTIONS_PER_SPLIT
SPLITS = ("extract", "eval")
# \Z, not $: $ also matches before a trailing newline, which would let "power_seeking\n" pass.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
EXTRACT_DIR = "trait_data_extract"
EVAL_DIR = "trait_data_eval"


class TraitValidationError(PersonaError):
    """A trait definition breaks a rule; ``problems`` lists every rule it breaks."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        # !r: a name from a file may hold a newline, which must not split the one-line error
        super().__init__(f"trait {name!r} is invalid: {problems[0]}{more}")


@dataclass(frozen=True)
class InstructionPair:
    pos: str
    neg: str


@dataclass(frozen=True)
class TraitDefinition:
    """A trait as the method needs it: 5 pos/neg instruction pairs, 40 questions (the first 20
    are the extract split, the last 20 the eval split) and a 0-100 judge prompt."""

    name: str
    description: str
    instructions: tuple[InstructionPair, ...]
    questions: tuple[str, ...]
    eval_prompt: str
    # The adjective in "You are a/an {assistant_name} assistant." ("paternalistic" reads better
    # than "paternalism"); the name itself when unset.
    assistant_name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- the method's views -------------------------------------------------------------
    def questions_for(self, split: str) -> tuple[str, ...]:
        if split == "extract":
            return self.questions[:N_QUESTIONS_PER_SPLIT]
        if split == "eval":
            return self.questions[N_QUESTIONS_PER_SPLIT:]
        raise PersonaError(f"unknown split '{split}'; use extract or eval")

    @property
    def assistant_label(self) -> str:
        label = (self.assistant_name or self.name).replace("_", " ").strip()
        article = "an" if label[:1].lower() in "aeiou" else "a"
        return f"{article} {label}"

    def system_prompt(self, side: str, instruction_index: int) -> str:
        """The system prompt of the method: the pos side names the trait, the neg side says
        helpful; both end with the side's instruction."""
        pair = self.instructions[instruction_index]
        if side == "pos":
            return f"You are {self.assistant_label} assistant. {pair.pos}"
        if side == "neg":
            return f"You are a helpful assistant. {pair.neg}"
        raise PersonaError(f"unknown side '{side}'; use pos or neg")

    def judge_prompt(self, question: str, answer: str) -> str:
        return fill_judge_template(self.eval_prompt, question, answer)

    # ---- validation ---------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every rule this definition breaks, each naming the exact place; empty when valid."""
        found: list[str] = []
        if not NAME_PATTERN.match(self.name or ""):
            found.append(
                f"name {self.name!r} must be lowercase letters, digits and '_', "
                "starting with a letter (e.g. power_seeking)"
            )
        if len(self.instructions) != N_PAIRS:
            found.append(f"expected {N_PAIRS} instruction pairs, found {len(self.instructions)}")
        for i, pair in enumerate(self.instructions):
            for side in ("pos", "neg"):
                text = getattr(pair, side)
                if not isinstance(text, str) or not text.strip():
                    found.append(f"instruction pair {i + 1} has an empty '{side}' instruction")
        if len(self.questions) != N_QUESTIONS:
            found.append(
                f"expected {N_QUESTIONS} questions ({N_QUESTIONS_PER_SPLIT} extract + "
                f"{N_QUESTIONS_PER_SPLIT} eval), found {len(self.questions)}"
            )
        seen: dict[str, int] = {}
        for i, question in enumerate(self.questions):
            if not isinstance(question, str) or not question.strip():
                found.append(f"question {i + 1} is empty")
                continue
            key = " ".join(question.split()).casefold()
            if key in seen:
                found.append(f"question {i + 1} duplicates question {seen[key] + 1}")
            else:
                seen[key] = i
        found.extend(judge_template_problems(self.eval_prompt))
        return found

    def validate(self) -> TraitDefinition:
        problems = self.problems()
        if problems:
            raise TraitValidationError(self.name, problems)
        return self

    # ---- studio format ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "assistant_name": self.assistant_name,
            "description": self.description,
            "instruction": [{"pos": p.pos, "neg": p.neg} for p in self.instructions],
            "questions": list(self.questions),
            "eval_prompt": self.eval_prompt,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "trait data") -> TraitDefinition:
        if not isinstance(data, Mapping):
            raise PersonaError(f"{source}: expected a JSON object at the top level")
        name = data.get("name")
        if not isinstance(name, str):
            raise PersonaError(f"{source}: missing 'name' (a string such as \"paternalism\")")
        return cls(
            name=name,
            description=_string(data.get("description", ""), "description", source),
            instructions=_pairs(data.get("instruction"), source),
            questions=_questions(data.get("questions"), source),
            eval_prompt=_string(data.get("eval_prompt"), "eval_prompt", source),
            assistant_name=_string(data.get("assistant_name", ""), "assistant_name", source),
        )

    # ---- the original project's format --------------------------------------------------
    def to_original(self) -> dict[str, dict[str, Any]]:
        """``{"extract": {...}, "eval": {...}}``, each in the original per-split format."""
        pairs = [{"pos": p.pos, "neg": p.neg} for p in self.instructions]
        return {
            split: {
                "instruction": pairs,
                "questions": list(self.questions_for(split)),
                "eval_prompt": self.eval_prompt,
            }
            for split in SPLITS
        }

    @classmethod
    def from_original(
        cls,
        name: str,
        extract: Any,
        eval_: Any,
        *,
        description: str = "",
        assistant_name: str = "",
        source: str = "trait data",
    ) -> TraitDefinition:
        for label, part in (("extract", extract), ("eval", eval_)):
            if not isinstance(part, Mapping):
                raise PersonaError(f"{source}: the {label} file must hold a JSON object")
        pairs = _pairs(extract.get("instruction"), f"{source} (extract)")
        for key in ("instruction", "eval_prompt"):
            # One definition written into both files; a copy that differs would be dropped.
            if key in eval_ and eval_[key] != extract.get(key):
                raise PersonaError(
                    f"{source}: the extract and eval files disagree on '{key}'; the original "
                    "format holds one definition in both (make the two files agree)"
                )
        return cls(
            name=name,
            description=description,
            instructions=pairs,
            questions=_questions(extract.get("questions"), f"{source} (extract)")
            + _questions(eval_.get("questions"), f"{source} (eval)"),
            eval_prompt=_string(extract.get("eval_prompt"), "eval_prompt", source),
            assistant_name=assistant_name,
        )


# ---- judge templates ----------------------------------------------------------------------
_SLOT = re.compile(r"\{(\w*)\}")


def judge_template_problems(template: Any) -> list[str]:
    if not isinstance(template, str) or not template.strip():
        return ["eval prompt is empty"]
    slots = _SLOT.findall(template)
    found = []
    for slot in ("question", "answer"):
        if slot not in slots:
            found.append(f"eval prompt has no {{{slot}}} slot")
    others = sorted({s for s in slots if s not in ("question", "answer")})
    if others:
        names = ", ".join("{" + s + "}" for s in others)
        found.append(f"eval prompt has unknown slots {names}; only {{question}} and {{answer}}")
    return found


def fill_judge_template(template: str, question: str, answer: str) -> str:
    """Fill the two slots without ``str.format``, so braces inside an answer or elsewhere in
    the template are kept as text and never interpreted."""
    filled = []
    pos = 0
    for match in _SLOT.finditer(template):
        filled.append(template[pos : match.start()])
        slot = match.group(1)
        filled.append(
            question if slot == "question" else answer if slot == "answer" else match.group(0)
        )
        pos = match.end()
    filled.append(template[pos:])
    return "".join(filled)


# ---- parsing helpers ----------------------------------------------------------------------
def _string(value: Any, key: str, source: str) -> str:
    if value is None:
        raise PersonaError(f"{source}: missing '{key}'")
    if not isinstance(value, str):
        raise PersonaError(f"{source}: '{key}' must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows an unpaired "\ud800" escape; the store cannot save it as UTF-8 text.
        raise PersonaError(
            f"{source}: '{key}' holds an unpaired surrogate escape (such as \\ud800); "
            "write the character itself or a complete surrogate pair"
        ) from None
    return value


def _pairs(value: Any, source: str) -> tuple[InstructionPair, ...]:
    if not isinstance(value, list):
        raise PersonaError(f'{source}: \'instruction\' must be a list of {{"pos", "neg"}} objects')
    pairs = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or "pos" not in item or "neg" not in item:
            raise PersonaError(
                f"{source}: instruction {i + 1} must be an object with 'pos' and 'neg'"
            )
        pairs.append(
            InstructionPair(
                pos=_string(item["pos"], f"instruction {i + 1} pos", source),
                neg=_string(item["neg"], f"instruction {i + 1} neg", source),
            )
        )
    return tuple(pairs)


def _questions(value: Any, source: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise PersonaError(f"{source}: 'questions' must be a list of strings")
    return tuple(_string(q, f"question {i + 1}", source) for i, q in enumerate(value))


# A trait definition is a few kilobytes; past this a "trait file" is something else (a
# device, a dump) and would be read into memory whole.
MAX_TRAIT_FILE_BYTES = 10 * 2**20


def _read_json(path: Path) -> Any:
    try:
        if path.exists() and not path.is_file():  # a FIFO waits forever; /dev/zero never ends
            raise PersonaError(f"trait file {path} is not a regular file; pass a .json file")
        if path.exists() and path.stat().st_size > MAX_TRAIT_FILE_BYTES:
            raise PersonaError(
                f"trait file {path} is {path.stat().st_size:,} bytes; a trait file is a few "
                "kilobytes of JSON"
            )
        # utf-8-sig: editors on Windows start UTF-8 files with a BOM, which json rejects
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PersonaError(f"trait file {path} does not exist; check the path") from None
    except UnicodeDecodeError:
        raise PersonaError(f"trait file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise PersonaError(f"cannot read trait file {path}: {exc.strerror}") from None
    return parse_trait_json(text, f"trait file {path}")


def parse_trait_json(text: str, what: str = "the trait") -> Any:
    """JSON text as data, or a one-line ``PersonaError`` starting with ``what``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PersonaError(
            f"{what} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise PersonaError(
            f"{what} nests lists or objects too deeply to read; a trait file is one "
            "object holding lists of strings"
        ) from None
    except ValueError:  # an integer past Python's digit limit for int()
        raise PersonaError(
            f"{what} holds a number too long to read; a trait file holds strings, "
            "so remove the number"
        ) from None


# ---- files --------------------------------------------------------------------------------
def read_trait_file(
    path: str | Path,
    *,
    name: str | None = None,
    description: str = "",
    assistant_name: str = "",
) -> TraitDefinition:
    """Read a trait from a studio file, an original per-split file (its sibling split is found
    next to it), or an original root folder holding ``trait_data_extract/`` (needs ``name``).
    The result is not validated; call ``validate()``."""
    path = Path(path)
    if path.is_dir():
        if not name:
            raise PersonaError(
                f"{path} is a folder: pass --name to pick NAME from {EXTRACT_DIR}/NAME.json"
            )
        extract_path = path / EXTRACT_DIR / f"{name}.json"
        if not extract_path.exists():
            raise PersonaError(f"{extract_path} does not exist; check the folder and --name")
        return _read_original(extract_path, name, description, assistant_name)
    data = _read_json(path)
    if isinstance(data, Mapping) and "name" in data:
        trait = TraitDefinition.from_dict(data, source=str(path))
        if name and name != trait.name:
            trait = replace(trait, name=name)
        return trait
    if isinstance(data, Mapping) and path.parent.name in (EXTRACT_DIR, EVAL_DIR):
        return _read_original(
            path.parent.parent / EXTRACT_DIR / path.name,
            name or path.stem,
            description,
            assistant_name,
        )
    raise PersonaError(
        f"{path}: not a studio trait file (no 'name') nor inside {EXTRACT_DIR}/ or {EVAL_DIR}/"
    )


def _read_original(
    extract_path: Path, name: str, description: str, assistant_name: str
) -> TraitDefinition:
    eval_path = extract_path.parent.parent / EVAL_DIR / extract_path.name
    if not eval_path.exists():
        raise PersonaError(
            f"{eval_path} does not exist; the original format needs both split files"
        )
    return TraitDefinition.from_original(
        name,
        _read_json(extract_path),
        _read_json(eval_path),
        description=description,
        assistant_name=assistant_name,
        source=str(extract_path),
    )


def write_trait_files(trait: TraitDefinition, out: str | Path, fmt: str = "original") -> list[Path]:
    """Write a trait; ``original`` gives the two per-split files under ``out``, ``studio`` one
    ``out/NAME.json``. Returns the paths written."""
    out = Path(out)
    if fmt == "studio":
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{trait.name}.json"
        _write_json(path, trait.to_dict())
        return [path]
    if fmt != "original":
        raise PersonaError(f"unknown trait format '{fmt}'; use original or studio")
    written = []
    for split, payload in trait.to_original().items():
        folder = out / (EXTRACT_DIR if split == "extract" else EVAL_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{trait.name}.json"
        _write_json(path, payload)
        written.append(path)
    return written


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# ---- the bundled library ------------------------------------------------------------------
def bundled_traits() -> list[TraitDefinition]:
    """The traits shipped with persona-studio, validated, sorted by name."""
    folder = resources.files("db") / "trait_library"
    traits = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            traits.append(TraitDefinition.from_dict(data, source=entry.name).validate())
    return traits


def empty_template(name: str, description: str = "") -> dict[str, Any]:
    """A studio-format skeleton for a trait written by hand: every slot present, all empty."""
    return {
        "name": name,
        "assistant_name": name.replace("_", " "),
        "description": description,
        "instruction": [{"pos": "", "neg": ""} for _ in range(N_PAIRS)],
        "questions": ["" for _ in range(N_QUESTIONS)],
        "eval_prompt": "Question: {question}\nAnswer: {answer}\n"
        "Reply REFUSAL or a number from 0 to 100.",
    }
