"""Fault injection: a stub judge that fails one request in five (429 with Retry-After, 500,
a timeout, a reset connection, malformed JSON, empty logprobs) and some prompts always. Every
judgment ends scored, refused or failed with its reason; the job never crashes; a resume
asks again exactly the failed ones."""

from __future__ import annotations

import collections
import hashlib
import math
import random
import threading
import time

import pytest
from fake_rows import seed_generation
from stub_openai import StubServer, logprob_completion

from db import Store
from pipeline import api_clients
from pipeline.jobs import run_job
from pipeline.judging import JudgeParams, find_or_create_judge_job

FAULTS = ("429", "500", "timeout", "reset", "malformed", "no logprobs")
TIMEOUT_S = 0.3


def _value(prompt: str) -> int:
    return hashlib.sha256(prompt.encode()).digest()[0] % 101


class FaultyJudge:
    """Seeded faults on 20% of requests, and a 500 every time for prompts that contain
    ``broken``."""

    def __init__(self, seed: int, rate: float = 0.2) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self.broken: set[str] = set()
        self.injected: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, path: str, body: dict):
        prompt = body["messages"][0]["content"]
        with self.lock:
            fault = self.rng.choice(FAULTS) if self.rng.random() < self.rate else None
            if any(word in prompt for word in self.broken):
                fault = "always 500"
            if fault:
                self.injected[fault] += 1
        if fault == "429":
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}
        if fault in ("500", "always 500"):
            return 500, {"error": {"message": "internal error"}}, {}
        if fault == "timeout":
            time.sleep(2 * TIMEOUT_S)
        if fault == "reset":
            return 0, {}, {}
        if fault == "malformed":
            return 200, b'{"choices": [{"index": 0, "mess', {}
        if fault == "no logprobs":
            return 200, logprob_completion([]), {}
        if "REFUSE" in prompt:
            return 200, logprob_completion([("I", math.log(0.95)), ("9", math.log(0.05))]), {}
        value = str(_value(prompt))
        return 200, logprob_completion([(value, 0.0)]), {}


def _answer(i: int) -> str:
    """Every 17th answer draws a refusal; the first three always fail."""
    return ("REFUSE " if i % 17 == 0 else "") + f"answer {i}" + (" broken" * (i < 3))


def test_every_judgment_ends_scored_refused_or_failed_with_a_reason(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_clients, "RETRY_BASE_S", 0.01)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    seed_generation(store, 60, answer=_answer)
    judge = FaultyJudge(seed=20)
    judge.broken = {"broken"}
    with StubServer(judge) as server:
        params = JudgeParams(
            judge="openai:stub", base_url=server.base_url, max_concurrent=8, timeout_s=TIMEOUT_S
        )
        job_id = find_or_create_judge_job(store, "paternalism", params)
        run_job(store.path, job_id)  # never raises: faults are the server's, not ours
        job = store.get_job(job_id)
        assert (job.status, job.done, job.total) == ("done", 120, 120)
        assert set(judge.injected) >= set(FAULTS), judge.injected  # every kind happened
        failed = []
        for response in store.responses():
            judgments = store.judgments(response.id)
            assert sorted(j.metric for j in judgments) == ["coherence", "trait"]
            for j in judgments:
                if j.error is not None:
                    assert j.score is None and j.error.startswith("gave up after")
                    failed.append((response.answer, j.metric, j.error))
                elif "REFUSE" in response.answer:
                    assert j.score is None and j.evidence["mass"] < 0.25  # a refusal
                else:
                    assert j.score is not None and j.evidence["top_logprobs"]
        # The always-broken prompts failed, with the server's status as the reason.
        broken = [f for f in failed if "broken" in f[0]]
        assert len(broken) == 6 and all("HTTP 500" in f[2] for f in broken)
        assert job.message == f"{len(failed)} judgments failed; rerun to retry them"

        judge.broken = set()
        judge.rate = 0.0
        before = len(server.requests)
        run_job(store.path, job_id)
        assert len(server.requests) - before == len(failed)  # only the failed ones again
    counts = store.get_job(job_id).stats["counts"]
    assert counts["trait"]["failed"] == counts["coherence"]["failed"] == 0
    assert counts["trait"]["refused"] == 4  # answers 0, 17, 34, 51
