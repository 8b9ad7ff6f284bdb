"""Argument types: one checker per kind of value, shared by every option of that kind. A bad
value stops at parse time with one line naming the option, before any database or model is
opened. Also the option groups several commands share."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from db import PersonaError
from pipeline.filter import DEFAULT_FILTER, FilterParams

MAX_SEED = 2**63 - 1  # seeds are packed as signed 64-bit integers (pipeline.sampling.row_seed)
VECTOR_KINDS = ("response_avg_diff", "prompt_avg_diff", "prompt_last_diff")


def step_default(step: str, field: str) -> Any:
    """The default of a step's parameter, read from its dataclass (``"module:Class"``, imported
    here: most steps' modules load torch, which the parser must not)."""
    module, _, name = step.partition(":")
    params = getattr(importlib.import_module(module), name)
    found = next(f for f in dataclasses.fields(params) if f.name == field)
    return None if found.default is dataclasses.MISSING else found.default


def add_step_option(
    sub: argparse.ArgumentParser, flag: str, step: str, *, help: str, **kwargs: Any
) -> argparse.Action:
    """An option whose default and validation live in a step's dataclass (``"module:Class"``,
    the field named like the option): absent from the namespace unless given, so the
    dataclass's default applies (``given`` collects what was given); its help names that
    default, read only when help is shown (``StepDefaultsFormatter``; argparse shows nothing
    for an option without help, hence ``help`` is required)."""
    action = sub.add_argument(flag, default=argparse.SUPPRESS, help=help, **kwargs)
    action.step_default = (step, action.dest)  # type: ignore[attr-defined]
    return action


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The step options among ``names`` that the command line gave."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


class StepDefaultsFormatter(argparse.HelpFormatter):
    """argparse's help, with the dataclass default of each ``add_step_option`` appended."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        source = getattr(action, "step_default", None)
        default = None if source is None else step_default(*source)
        if default is None:
            return text
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        return f"{text or ''} (default {shown.replace('%', '%%')})".lstrip()


def whole_number(text: str) -> int:
    """Any integer (a step's dataclass may check its range)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None


def real_number(text: str) -> float:
    """Any finite number (a step's dataclass may check its range)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def row_id(text: str) -> int:
    """A database id (job, response): SQLite's integers stop at 2**63 - 1."""
    value = whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an id from 0 to {MAX_SEED} (got {value})")
    return value


def positive_int(text: str) -> int:
    """A count that must be at least 1 (answers, tokens, batch rows, concurrent requests)."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def non_negative_int(text: str) -> int:
    """An index or budget that may be 0 but not negative (nor past SQLite's integers)."""
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEED} (got {value})")
    return value


def seed_int(text: str) -> int:
    value = whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED} (got {value})")
    return value


def _filter_value(field: str) -> Callable[[str], float]:
    """T or C of the effective-pair rule, checked by the rule's own ``FilterParams``."""

    def parse(text: str) -> float:
        value = real_number(text)
        try:
            FilterParams(**{field: value}).validate()
        except PersonaError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--{field} ")) from None
        return value

    parse.__name__ = field  # argparse names the type in its messages
    return parse


threshold_value = _filter_value("threshold")
coherence_value = _filter_value("coherence")


def non_negative_float(text: str) -> float:
    value = real_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value:g})")
    return value


def positive_float(text: str) -> float:
    """A duration or size that must be above 0."""
    value = real_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0 (got {value:g})")
    return value


def probability(text: str) -> float:
    """A nucleus mass in (0, 1]: 0 would keep no token at all."""
    value = real_number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {value:g})")
    return value


def number_list(text: str) -> list[float]:
    """Comma-separated steering coefficients (finite, |c| <= MAX_COEF, at most MAX_COEFS)."""
    from pipeline.sweep import parse_coefs

    if not any(part.strip() for part in text.split(",")):
        raise argparse.ArgumentTypeError("is empty; give numbers such as 2 or -2,2")
    try:
        return list(parse_coefs(text))
    except PersonaError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--coefs ")) from None


def layer_list(text: str) -> tuple[int, ...]:
    """Layers as 20, 16-24, 16-24:4 or 12,20 (``pipeline.sweep.parse_layers``); the step checks
    them against the model."""
    from pipeline.sweep import parse_layers

    try:
        return parse_layers(text)
    except PersonaError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--layers ")) from None


def output_folder(text: str) -> Path:
    """A folder to write into; created when missing, so only an existing file (or a folder
    that cannot be made) is wrong."""
    if not text.strip():  # Path("") is the current folder: never a silent default
        raise argparse.ArgumentTypeError("is empty; pass a folder (made if missing)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; pass a folder (made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise argparse.ArgumentTypeError(f"cannot make folder {path} ({reason})") from None
    return path


def output_file(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; pass a file name")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; pass a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"folder {path.parent} does not exist; create it first or write elsewhere"
        )
    return path


def input_file(text: str) -> Path:
    """A file to read; an empty value is an error, not the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; pass a file")
    return Path(text)


def add_filter_values(sub: argparse.ArgumentParser) -> None:
    """--threshold and --coherence, with the rule's defaults (``pipeline.filter``)."""
    sub.add_argument(
        "--threshold",
        type=threshold_value,
        default=DEFAULT_FILTER.threshold,
        help=f"T (default {DEFAULT_FILTER.threshold:g})",
    )
    sub.add_argument(
        "--coherence",
        type=coherence_value,
        default=DEFAULT_FILTER.coherence,
        help=f"C (default {DEFAULT_FILTER.coherence:g})",
    )


def add_pair_filter(sub: argparse.ArgumentParser) -> None:
    """The trait and the effective-pair rule's options (``pairs`` and ``extract``)."""
    sub.add_argument("trait")
    add_filter_values(sub)
    sub.add_argument("--pos-job", type=row_id, help="default: the latest pos extract job")
    sub.add_argument("--neg-job", type=row_id, help="default: the latest neg extract job")
    sub.add_argument("--judge", help="whose scores (default: the judge with most scores)")


def gpus_value(text: str) -> str:
    from db import PersonaError
    from pipeline.sharding import parse_gpus

    try:
        return parse_gpus(text)
    except PersonaError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_compile(sub: argparse.ArgumentParser) -> None:
    """--compile: the local engine's decode step with its layers torch.compile'd."""
    sub.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step's layers with torch.compile (GPU: about 8 s once a "
        "process for an 8B model, then steps up to about 10%% faster than the default's, "
        "which runs its norms and rotary as Triton kernels; worth it for long jobs only)",
    )


def add_deterministic(sub: argparse.ArgumentParser) -> None:
    """--deterministic: the local engine's GPU attention on a kernel that repeats."""
    sub.add_argument(
        "--deterministic",
        action="store_true",
        help="GPU decode attention on a kernel whose results repeat run to run, so the same "
        "command on one GPU with a fixed --batch-size gives the same tokens again (an 8B step "
        "at batch 256 about 8%% slower on an H200, about 19%% with --compile; the CPU always "
        "repeats)",
    )


def add_gpus(sub: argparse.ArgumentParser) -> None:
    """--gpus: a model copy a device (generation: ``pipeline.engine_threads``; the rest:
    ``pipeline.sharding``)."""
    sub.add_argument(
        "--gpus",
        type=gpus_value,
        help="devices to spread rows over, a model copy each: all (default: every visible "
        "GPU, when the model fits on one), GPU indices like 0,1, or cpu,cpu",
    )
