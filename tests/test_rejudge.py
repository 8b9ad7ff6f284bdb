"""Judging one pair again: only its responses are asked, afresh (not from the cache), both
metrics, and a failed request keeps the judgment it would have replaced."""

from __future__ import annotations

import pytest
from fake_rows import seed_generation
from stub_openai import StubServer, logprob_completion

from db import PersonaError, Store
from pipeline import api_clients
from pipeline.jobs import run_job
from pipeline.judge_backends import DEFAULT_PRICES, estimate_cost
from pipeline.judging import (
    JudgeParams,
    estimate_judging,
    find_or_create_judge_job,
    rejudge_params,
)


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_clients, "RETRY_BASE_S", 0.01)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")


def _scores(store: Store) -> dict[tuple[int, str], float | None]:
    return {(r.id, j.metric): j.score for r in store.responses() for j in store.judgments(r.id)}


def test_a_pair_is_judged_again_alone_and_afresh(store: Store) -> None:
    seed_generation(store, 4, answer=lambda q: f"Answer {q}")
    reply = {"score": "30", "fail": False}

    def handler(path: str, body: dict):
        if reply["fail"]:
            return 500, {"error": {"message": "down"}}, {}
        return 200, logprob_completion([(reply["score"], 0.0)]), {}

    with StubServer(handler) as server:
        first = JudgeParams(judge="openai:gpt-4.1-mini", base_url=server.base_url)
        run_job(store.path, find_or_create_judge_job(store, "paternalism", first))
        before = _scores(store)
        asked = len(server.requests)
        pair = [r.id for r in store.responses()[:2]]

        params = rejudge_params(store, "paternalism", "openai:gpt-4.1-mini", pair)
        assert params.base_url == server.base_url  # served as the trait's judge job was
        assert params.metrics == ("trait", "coherence") and params.responses == tuple(pair)
        estimate = estimate_judging(store, "paternalism", params)
        assert estimate.requests == 4 and estimate.cost is not None and estimate.cost > 0

        reply["score"] = "70"
        job_id = find_or_create_judge_job(store, "paternalism", params)
        run_job(store.path, job_id)
        assert len(server.requests) - asked == 4  # the same prompts, not read from the cache
        after = _scores(store)
        for (rid, metric), score in after.items():
            assert score == (70.0 if rid in pair else before[(rid, metric)])

        reply["fail"] = True  # a failed re-judge keeps the judgments it would replace
        run_job(store.path, find_or_create_judge_job(store, "paternalism", params))
        assert _scores(store) == after
        assert all(j.error is None for r in store.responses() for j in store.judgments(r.id))


def test_a_judge_that_cannot_be_asked_again_is_named(store: Store) -> None:
    seed_generation(store, 2)
    rid = store.responses()[0].id
    with pytest.raises(PersonaError, match="the scores are by 'imported', which cannot be asked"):
        rejudge_params(store, "paternalism", "imported", [rid])
    params = rejudge_params(store, "paternalism", "anthropic:claude-haiku-4-5@k3", [rid])
    assert params.judge == "anthropic:claude-haiku-4-5" and params.samples == 3
    assert params.spec == "anthropic:claude-haiku-4-5@k3"
    with pytest.raises(PersonaError, match="is not one of trait 'deception'"):
        find_or_create_judge_job(store, "deception", params)


def test_the_estimate_follows_the_price_table() -> None:
    prompts = ["x" * 400, "y" * 800]  # 101 and 201 tokens at 4 characters a token
    rate_in, rate_out = DEFAULT_PRICES["gpt-4.1-mini"]
    expected = (302 * rate_in + 2 * 1 * rate_out) / 1e6
    assert estimate_cost("openai:gpt-4.1-mini", prompts, prices=DEFAULT_PRICES) == expected
    k3 = estimate_cost("anthropic:claude-haiku-4-5", prompts, prices=DEFAULT_PRICES, samples=3)
    assert k3 == pytest.approx((3 * 302 * 1.0 + 3 * 2 * 8 * 5.0) / 1e6)
    assert estimate_cost("openai:unpriced-model", prompts, prices=DEFAULT_PRICES) is None
    assert estimate_cost("local:smollm2", prompts, prices=DEFAULT_PRICES) == 0.0
