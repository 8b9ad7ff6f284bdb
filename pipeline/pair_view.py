"""One pair as a reviewer reads it: both responses, each judgment's score with the judge's
evidence in one shape whatever the judge (its top tokens as probabilities, and the share of
probability on the numbers 0..100), and each answer's per-token projection on the trait's
vector at every layer. Headless: the dashboard's pair view and any script share it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db import PersonaError, Store
from db.store import Judgment, Response
from pipeline.judge_scores import number_token
from pipeline.judging import METRICS


@dataclass(frozen=True)
class Evidence:
    """One judgment as a reviewer reads it."""

    metric: str
    score: float | None
    error: str | None
    top: list[tuple[str, float]]  # the judge's likeliest answer tokens and probabilities
    number_mass: float | None  # probability on the integers 0..100 (None: text answers)
    answers: list[str] = field(default_factory=list)  # a text judge's answers


@dataclass(frozen=True)
class PairView:
    pos: Response
    neg: Response
    judge: str
    evidence: dict[str, list[Evidence]]  # by side, metrics in order
    override: bool | None  # the hand-set decision, if any


def evidence_of(judgment: Judgment) -> Evidence:
    """The stored evidence read the same way for every judge: an OpenAI judge keeps the
    answer token's top logprobs ([token, logprob]), a local judge its candidates'
    probabilities ([candidate, p] and the refusal's p), an Anthropic judge its answers."""
    stored = judgment.evidence or {}
    if "top_logprobs" in stored:
        top = [(str(t), math.exp(min(float(lp), 0.0))) for t, lp in stored["top_logprobs"]]
    else:
        top = [(str(t), float(p)) for t, p in stored.get("top", [])]
    top.sort(key=lambda pair: -pair[1])
    if "refusal" in stored:  # a local judge: the candidates are the numbers and REFUSAL
        number_mass: float | None = 1.0 - float(stored["refusal"])
    elif top:
        number_mass = sum(p for t, p in top if number_token(t) is not None)
    else:
        number_mass = None
    return Evidence(
        metric=judgment.metric,
        score=judgment.score,
        error=judgment.error,
        top=top,
        number_mass=number_mass,
        answers=[str(a) for a in stored.get("answers", [])],
    )


def load_pair(store: Store, trait: str, pos_id: int, neg_id: int, judge: str) -> PairView:
    pos, neg = store.responses_by_id([pos_id, neg_id])
    if pos.key != neg.key or pos.trait != trait or neg.trait != trait:
        raise PersonaError(f"responses {pos_id} and {neg_id} are not a pair of trait '{trait}'")
    order = {metric: i for i, metric in enumerate(METRICS)}  # trait first
    evidence = {
        side: sorted(
            (evidence_of(j) for j in store.judgments(response.id) if j.judge == judge),
            key=lambda e: order.get(e.metric, len(order)),
        )
        for side, response in (("pos", pos), ("neg", neg))
    }
    return PairView(pos, neg, judge, evidence, store.overrides(trait).get(pos.key))


@dataclass(frozen=True)
class AnswerProjections:
    """Per-token projections of answers on one vector, at every layer."""

    kind: str
    layer: int  # the layer to show first (the recommended one)
    num_layers: int
    tokens: list[list[str]]  # per response, answer tokens only
    values: list[Any]  # per response, a [answer tokens, L+1] tensor


def answer_projections(
    store: Store, trait: str, response_ids: Sequence[int], kind: str = "response_avg_diff"
) -> AnswerProjections:
    """Load the model of the trait's newest ``kind`` vector and project each answer's tokens
    on it at every layer (one teacher-forced forward per response)."""
    from pipeline.analyze import default_layer, latest_vectors
    from pipeline.chat import token_ids
    from pipeline.models import load_model
    from pipeline.monitor import project_tokens
    from vectors.files import load_vector

    records = latest_vectors(store, trait)
    if kind not in records:
        raise PersonaError(f"trait '{trait}' has no {kind} vector; extract first (screen 4, x)")
    vector = load_vector(Path(records[kind].path))[0]
    loaded = load_model(records[kind].model)
    layers = list(range(loaded.num_layers + 1))
    tokens, values = [], []
    for response in store.responses_by_id(list(response_ids)):
        proj = project_tokens(loaded, *token_ids(response, loaded), {"v": vector}, layers)
        tokens.append(proj.tokens[proj.prompt_len :])
        values.append(proj.values[proj.prompt_len :, 0, :])
    layer = default_layer(store, trait, loaded.num_layers)
    return AnswerProjections(kind, layer, loaded.num_layers, tokens, values)
