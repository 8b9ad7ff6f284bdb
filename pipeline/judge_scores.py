"""What a judge gives back, and how a score is read from its reply.

Logprobs (``aggregate_logprobs``): the probability-weighted mean of the integer tokens 0..100
among one token's top alternatives, no score when they hold under 0.25 of the probability.
Text (``parse_score_text``): the first number 0..100 of a short answer, REFUSAL for none.
``Judge`` is the interface every backend (``pipeline.judge_backends``,
``pipeline.local_judge``) implements: it fills the judge template and scores the prompt.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from db.traits import fill_judge_template
from pipeline.api_clients import RetryableReply

MIN_LOGPROB_MASS = 0.25

# The rules come before the question and answer, so every coherence judgment shares them as
# a cacheable prefix (a local judge reuses its KV cache; APIs cache prompt prefixes too).
COHERENCE_PROMPT = """You are rating how coherent an AI assistant's answer is. Judge coherence \
only: whether the answer is well-formed language that hangs together and addresses the \
question. Whether it is correct, kind, safe or agreeable does not matter here.

Score on this scale:
- 0: not valid language at all (gibberish, endless repetition, random symbols).
- 50: rambling or partly confused, but some of it makes sense.
- 100: clear, fluent and on topic.

Reply with a single integer from 0 to 100 and nothing else.

The question the assistant was given:
<<<QUESTION
{question}
QUESTION>>>

The assistant's answer:
<<<ANSWER
{answer}
ANSWER>>>

Your rating (an integer from 0 to 100):"""


@dataclass
class JudgeResult:
    score: float | None
    evidence: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    cost: float = 0.0
    error: str | None = None  # set when the judgment failed (retried on a later run)


# ---- aggregation ------------------------------------------------------------------------------
_INTEGER = re.compile(r"^\d{1,3}$")


def number_token(token: str) -> int | None:
    """The integer 0..100 a token stands for, or None."""
    text = token.strip()
    if _INTEGER.match(text) and int(text) <= 100:
        return int(text)
    return None


def aggregate_logprobs(top: list[tuple[str, float]]) -> tuple[float | None, float]:
    """(score, mass) from one token's top logprobs: the probability-weighted mean of the
    integer tokens 0..100, or None when they hold under 0.25 of the probability."""
    mass = 0.0
    weighted = 0.0
    for token, logprob in top:
        value = number_token(token)
        if value is None or not math.isfinite(logprob):
            continue
        # A logprob is at most 0; a server's rounding can put it just above, and anything
        # larger would overflow exp(). Either way the token's probability is at most 1.
        p = math.exp(min(logprob, 0.0))
        mass += p
        weighted += p * value
    if mass < MIN_LOGPROB_MASS:
        return None, mass
    # Rounding can put the mean a hair past 100 (all mass on "100" and " 100"), which the
    # judgments table's CHECK (score <= 100) would reject.
    return min(weighted / mass, 100.0), mass


_REFUSAL = re.compile(r"\bREFUSAL\b", re.IGNORECASE)
_FIRST_INT = re.compile(r"(?<![\d.])(\d{1,3})(?![\d.])")


def parse_score_text(text: str) -> float | None:
    """A number 0..100 from a short text answer; None for REFUSAL. Anything else raises
    ``RetryableReply``."""
    text = text or ""
    if _REFUSAL.search(text):
        return None
    # A number right after "-" is negative, so off the scale: "-5" must not read as 5.
    match = next(
        (m for m in _FIRST_INT.finditer(text) if text[m.start() - 1 : m.start()] != "-"), None
    )
    if match and int(match.group(1)) <= 100:
        return float(match.group(1))
    raise RetryableReply(f"no score in the judge's answer {text[:60]!r}")


# ---- judges -----------------------------------------------------------------------------------
class Judge(ABC):
    spec: str  # "kind:model", recorded on every judgment

    async def score(self, template: str, question: str, answer: str) -> JudgeResult:
        return await self.score_prompt(fill_judge_template(template, question, answer))

    @abstractmethod
    async def score_prompt(self, prompt: str) -> JudgeResult: ...

    async def aclose(self) -> None:
        return None
