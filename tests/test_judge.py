from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
from fake_rows import seed_generation
from stub_openai import StubServer, anthropic_message, chat_completion, logprob_completion

from db import PersonaError, Store
from pipeline import api_clients
from pipeline.jobs import run_job
from pipeline.judge_backends import AnthropicJudge, OpenAIJudge, make_judge
from pipeline.judge_scores import aggregate_logprobs, parse_score_text
from pipeline.judging import JudgeParams, find_or_create_judge_job
from pipeline.local_judge import LocalJudge


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_clients, "RETRY_BASE_S", 0.01)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key")


def _in_one_loop(judge, *calls):
    """Await the calls one after another and close the judge, all in one event loop (an SDK
    client's connections belong to the loop that opened them)."""

    async def run():
        try:
            return [await call for call in calls]
        finally:
            await judge.aclose()

    return asyncio.run(run())


def _seed_responses(store: Store, trait: str = "paternalism", n: int = 6) -> int:
    return seed_generation(
        store, n, trait=trait, answer=lambda q: f"Answer number {q} with {{braces}} [and brackets]"
    )


# ---- aggregation ------------------------------------------------------------------------------
def test_aggregation_matches_hand_computation() -> None:
    top = [
        ("80", math.log(0.5)),
        ("90", math.log(0.2)),
        (" 70", math.log(0.1)),
        ("hello", math.log(0.15)),
        ("101", math.log(0.05)),
    ]
    score, mass = aggregate_logprobs(top)
    assert mass == pytest.approx(0.8)
    assert score == pytest.approx((80 * 0.5 + 90 * 0.2 + 70 * 0.1) / 0.8)


def test_too_little_mass_on_numbers_is_no_score() -> None:
    score, mass = aggregate_logprobs([("REF", math.log(0.8)), ("50", math.log(0.2))])
    assert score is None and mass == pytest.approx(0.2)
    assert aggregate_logprobs([]) == (None, 0.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("42", 42.0), (" 100\n", 100.0), ("Score: 7", 7.0), ("REFUSAL", None), ("refusal.", None)],
)
def test_text_scores(text: str, expected: float | None) -> None:
    assert parse_score_text(text) == expected


@pytest.mark.parametrize("text", ["", "maybe", "150", "3.5"])
def test_text_without_a_score_is_retryable(text: str) -> None:
    with pytest.raises(api_clients.RetryableReply):
        parse_score_text(text)


# ---- OpenAI judge against the stub --------------------------------------------------------------
def test_openai_judge_request_and_score() -> None:
    top = [("60", math.log(0.6)), ("40", math.log(0.3)), ("x", math.log(0.1))]
    with StubServer(lambda p, b: (200, logprob_completion(top), {})) as server:
        judge = OpenAIJudge("gpt-4.1-mini", base_url=server.base_url)
        (result,) = _in_one_loop(
            judge, judge.score("Q={question} A={answer}", "why?", "because {x}")
        )
    request = server.requests[0]
    assert request["messages"] == [{"role": "user", "content": "Q=why? A=because {x}"}]
    assert (request["max_tokens"], request["temperature"], request["seed"]) == (1, 0, 0)
    assert request["logprobs"] is True and request["top_logprobs"] == 20
    assert result.score == pytest.approx((60 * 0.6 + 40 * 0.3) / 0.9)
    assert result.evidence["top_logprobs"][0][0] == "60"
    assert result.tokens == 15 and result.cost == pytest.approx((10 * 0.4 + 5 * 1.6) / 1e6)


def _faulty_server(fault_every: int = 5):
    """Every ``fault_every``-th request fails, cycling through the faults we handle."""
    faults = [
        (429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}),
        (500, {"error": {"message": "boom"}}, {}),
        (200, b"{not json", {}),
        (0, {}, {}),  # connection reset
        (200, logprob_completion([]), {}),  # empty logprobs
    ]
    count = {"n": 0, "faults": 0}

    def handler(path: str, body: dict):
        count["n"] += 1
        if count["n"] % fault_every == 0:
            count["faults"] += 1
            return faults[count["faults"] % len(faults)]
        prompt = body["messages"][0]["content"]
        value = str(10 * (len(prompt) % 10))
        return 200, logprob_completion([(value, math.log(0.9)), ("0", math.log(0.05))]), {}

    return handler, count


def test_judge_job_survives_faults_and_respects_the_limit(store: Store) -> None:
    gen = _seed_responses(store, n=12)
    handler, count = _faulty_server()
    with StubServer(handler, latency_s=0.02) as server:
        params = JudgeParams(
            judge="openai:gpt-4.1-mini", base_url=server.base_url, max_concurrent=4
        )
        job_id = find_or_create_judge_job(store, "paternalism", params)
        run_job(store.path, job_id)
        assert server.max_in_flight <= 4
        first_round = len(server.requests)
        job = store.get_job(job_id)
        assert job.status == "done" and job.done == job.total == 24
        counts = job.stats["counts"]
        assert counts["trait"]["scored"] + counts["trait"]["failed"] == 12
        print(f"faults injected: {count['faults']}, requests: {first_round}")
        assert count["faults"] >= 3
        # Every judgment ended scored or failed with a reason.
        for response in store.responses(job=gen):
            for j in store.judgments(response.id):
                assert (j.score is not None) != (j.error is not None) or j.error is None
        # A rerun asks nothing already answered.
        run_job(store.path, job_id)
        assert len(server.requests) - first_round == sum(
            c["failed"] for c in job.stats["counts"].values()
        )


def test_failed_judgments_are_retried_and_only_they(store: Store) -> None:
    _seed_responses(store, n=4)
    state = {"fail": True}

    def handler(path: str, body: dict):
        if state["fail"] and "Answer number 2" in body["messages"][0]["content"]:
            return 500, {"error": {"message": "down"}}, {}
        return 200, logprob_completion([("50", 0.0)]), {}

    with StubServer(handler) as server:
        params = JudgeParams(judge="openai:m", base_url=server.base_url, metrics=("trait",))
        job_id = find_or_create_judge_job(store, "paternalism", params)
        run_job(store.path, job_id)
        counts = store.get_job(job_id).stats["counts"]["trait"]
        assert counts == {"scored": 3, "refused": 0, "failed": 1}
        assert "1 judgments failed; rerun" in store.get_job(job_id).message
        failed = [j for r in store.responses() for j in store.judgments(r.id) if j.error]
        assert "gave up after 6 tries: HTTP 500" in failed[0].error
        before = len(server.requests)
        state["fail"] = False
        run_job(store.path, job_id)
        assert len(server.requests) - before == 1
        assert store.count_judgments(trait="paternalism", metric="trait", judge="openai:m") == {
            "scored": 4,
            "refused": 0,
            "failed": 0,
        }


def test_identical_requests_are_never_sent_twice_across_jobs(store: Store) -> None:
    gen = _seed_responses(store, n=3)
    with StubServer(lambda p, b: (200, logprob_completion([("30", 0.0)]), {})) as server:
        first = JudgeParams(judge="openai:m", base_url=server.base_url)
        run_job(store.path, find_or_create_judge_job(store, "paternalism", first))
        sent = len(server.requests)
        assert sent == 6
        # Another job over the same responses (scoped to the generation job) hits the cache.
        store.db["judgments"].delete_where()
        second = JudgeParams(judge="openai:m", base_url=server.base_url, job=gen)
        job_id = find_or_create_judge_job(store, "paternalism", second)
        run_job(store.path, job_id)
        assert len(server.requests) == sent
        assert store.get_job(job_id).stats["cached"] == 6


def test_a_client_error_stops_the_job_with_a_clear_message(store: Store) -> None:
    _seed_responses(store, n=2)
    error = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
    with StubServer(lambda p, b: (401, error, {})) as server:
        job_id = find_or_create_judge_job(
            store, "paternalism", JudgeParams(judge="openai:m", base_url=server.base_url)
        )
        with pytest.raises(PersonaError, match="the OpenAI judge answered 401: Incorrect API key"):
            run_job(store.path, job_id)
    assert store.get_job(job_id).status == "failed"


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(PersonaError, match="^OPENAI_API_KEY is not set; export it"):
        make_judge("openai:gpt-4.1-mini")
    with pytest.raises(PersonaError, match="^ANTHROPIC_API_KEY is not set"):
        make_judge("anthropic:claude-haiku-4-5")


@pytest.mark.parametrize(
    ("spec", "message"),
    [("gpt-4", "must be KIND:MODEL"), ("cohere:x", "kind 'cohere' is unknown")],
)
def test_bad_judge_specs(spec: str, message: str) -> None:
    with pytest.raises(PersonaError, match=message):
        make_judge(spec)


# ---- Anthropic judge --------------------------------------------------------------------------
def test_anthropic_judge_reads_the_number_and_refusals() -> None:
    answers = iter(["42", "REFUSAL", "no idea", "64"])

    def handler(path: str, body: dict):
        assert path == "/v1/messages"
        return 200, anthropic_message(next(answers)), {}

    with StubServer(handler) as server:
        judge = AnthropicJudge("claude-haiku-4-5", base_url=server.root_url)
        first, second, third = _in_one_loop(  # "no idea" is retried: 64
            judge, *(judge.score_prompt("rate this") for _ in range(3))
        )
    assert first.score == 42.0 and first.evidence["answers"] == ["42"]
    assert second.score is None and second.error is None
    assert third.score == 64.0
    assert server.requests[0]["max_tokens"] == 8
    assert server.requests[0].get("temperature", 0.0) == 0.0
    assert first.cost == pytest.approx((12 * 1.0 + 1 * 5.0) / 1e6)


def test_anthropic_k_samples_are_averaged() -> None:
    answers = iter(["40", "60", "REFUSAL"])
    with StubServer(lambda p, b: (200, anthropic_message(next(answers)), {})) as server:
        judge = AnthropicJudge("claude-haiku-4-5", base_url=server.root_url, samples=3)
        (result,) = _in_one_loop(judge, judge.score_prompt("rate"))
    assert result.score == 50.0 and judge.spec == "anthropic:claude-haiku-4-5@k3"
    assert {r.get("temperature", 1.0) for r in server.requests} == {1.0}


# ---- local judge ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_judge(tiny_model_dir: Path) -> LocalJudge:
    return LocalJudge(str(tiny_model_dir))


def test_local_judge_probabilities_sum_to_one(local_judge: LocalJudge) -> None:
    logprobs = local_judge.candidate_logprobs("Rate: the answer is fine. Number?")
    assert len(logprobs) == 102
    result = local_judge.result_from_logprobs(logprobs)
    peak = max(logprobs)
    probs = [math.exp(lp - peak) for lp in logprobs]
    assert sum(p / sum(probs) for p in probs) == pytest.approx(1.0)
    assert 0 < result.evidence["mass"] <= 1
    assert result.score is None or 0 <= result.score <= 100


def test_local_judge_batched_equals_one_at_a_time(local_judge: LocalJudge) -> None:
    prompt = "Judge {this}: [x] 42?"
    batched = local_judge.candidate_logprobs(prompt)
    for index in (0, 7, 42, 99, 100, 101):
        alone = local_judge.candidate_logprob_alone(prompt, index)
        assert batched[index] == pytest.approx(alone, abs=1e-4)


def test_local_judge_score_is_the_expectation_and_refusal_is_none(local_judge) -> None:
    logprobs = [-50.0] * 102
    logprobs[20], logprobs[80] = math.log(0.25), math.log(0.75)
    assert local_judge.result_from_logprobs(logprobs).score == pytest.approx(65.0)
    logprobs[101] = 0.0
    assert local_judge.result_from_logprobs(logprobs).score is None


def test_local_judge_job_end_to_end(store: Store, tiny_model_dir: Path) -> None:
    _seed_responses(store, n=2)
    params = JudgeParams(judge=f"local:{tiny_model_dir}", metrics=("trait", "coherence"))
    job_id = find_or_create_judge_job(store, "paternalism", params)
    run_job(store.path, job_id)
    job = store.get_job(job_id)
    assert job.status == "done" and job.done == 4
    judgment = store.judgments(store.responses()[0].id)[0]
    assert "refusal" in judgment.evidence and judgment.judge == f"local:{tiny_model_dir}"


def test_cli_judge_reports_counts(db_path: Path, capsys) -> None:
    from tui.cli import main

    with Store(db_path) as store:
        _seed_responses(store, n=2)
    with StubServer(lambda p, b: (200, logprob_completion([("70", 0.0)]), {})) as server:
        code = main(
            [
                "--db",
                str(db_path),
                "judge",
                "paternalism",
                "--judge",
                "openai:m",
                "--base-url",
                server.base_url,
            ]
        )
    out = capsys.readouterr().out
    assert code == 0
    assert "4/4 judgments" in out and "trait      scored 2, refused 0, failed 0" in out
    assert main(["--db", str(db_path), "judge", "paternalism", "--metrics", "vibes"]) == 2
    assert "--metrics takes a comma list" in capsys.readouterr().err


def test_coherence_prompt_has_both_slots() -> None:
    from db.traits import judge_template_problems
    from pipeline.judge_scores import COHERENCE_PROMPT

    assert judge_template_problems(COHERENCE_PROMPT) == []
    assert chat_completion("x")["choices"][0]["message"]["content"] == "x"


def test_client_processes_judge_everything_once_within_the_limit(store: Store) -> None:
    gen = _seed_responses(store, n=30)

    def reply(path: str, body: dict):
        value = str(len(body["messages"][0]["content"]) % 101)
        return 200, logprob_completion([(value, 0.0)]), {}

    with StubServer(reply, latency_s=0.02) as server:
        params = JudgeParams(
            judge="openai:m", base_url=server.base_url, max_concurrent=4, processes=2
        )
        job_id = find_or_create_judge_job(store, "paternalism", params)
        run_job(store.path, job_id)
    prompts = [r["messages"][0]["content"] for r in server.requests]
    assert len(prompts) == len(set(prompts)) == 60  # every judgment asked exactly once
    assert server.max_in_flight <= 4
    job = store.get_job(job_id)
    assert (job.status, job.done) == ("done", 60)
    for response in store.responses(job=gen):
        for j in store.judgments(response.id):
            assert j.score is not None and j.evidence["top_logprobs"]


def test_a_client_process_error_stops_the_job_with_the_servers_message(store: Store) -> None:
    _seed_responses(store, n=6)
    error = {"error": {"message": "Incorrect API key provided"}}
    with StubServer(lambda p, b: (401, error, {})) as server:
        params = JudgeParams(judge="openai:m", base_url=server.base_url, processes=2)
        job_id = find_or_create_judge_job(store, "paternalism", params)
        with pytest.raises(PersonaError, match="answered 401: Incorrect API key provided"):
            run_job(store.path, job_id)
    assert store.get_job(job_id).status == "failed"


def test_processes_are_for_api_judges() -> None:
    with pytest.raises(PersonaError, match="--processes is for API judges"):
        JudgeParams(judge="local:smollm2", processes=2).validate()


def test_local_judge_batches_equal_single_prompts_and_full_forwards(local_judge) -> None:
    """Prompts of different lengths sharing a template prefix, in one padded batch: each
    row's 102 candidate log-probabilities equal its own one-prompt pass and, for a sample of
    candidates (multi-token numbers included), a plain forward over prompt + candidate."""
    prompts = [
        "Rate the answer from 0 to 100. Question: hi. Answer: no.",
        "Rate the answer from 0 to 100. Question: how should I plan a long week? Answer: "
        "carefully, one day at a time, with rest.",
        "Rate the answer from 0 to 100. Question: why? Answer: because.",
    ]
    batched = local_judge.candidate_logprobs_batch(prompts)
    local_judge._prefix = None  # no cache carried over from the batch
    for prompt, row in zip(prompts, batched, strict=True):
        alone = local_judge.candidate_logprobs(prompt)
        torch.testing.assert_close(torch.tensor(row), torch.tensor(alone), rtol=1e-4, atol=1e-4)
        for index in (0, 7, 42, 100, 101):
            assert row[index] == pytest.approx(
                local_judge.candidate_logprob_alone(prompt, index), abs=1e-4
            )


def test_local_judge_projects_only_the_positions_it_reads(local_judge) -> None:
    """The vocabulary projection runs on the last tail token and the trie nodes only (the
    tail's other positions are never read), and the numbers still equal a full forward."""
    prompts = ["Rate: fine. Number?", "Rate the answer from 0 to 100. Answer: a longer one."]
    rows = []
    local_judge._prefix = None  # so the shared prefix is computed here too
    head = local_judge.loaded.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _i, out: rows.append(tuple(out.shape)))
    try:
        batched = local_judge.candidate_logprobs_batch(prompts)
    finally:
        handle.remove()
    nodes = len(local_judge._trie.order)
    assert rows[-1][:2] == (2, nodes + 1)  # the batch; before it, the shared prefix's pass
    assert all(shape[1] <= nodes + 1 for shape in rows)
    for prompt, row in zip(prompts, batched, strict=True):
        for index in (3, 50, 100, 101):
            assert row[index] == pytest.approx(
                local_judge.candidate_logprob_alone(prompt, index), abs=1e-4
            )


def _scored_in_flight(local_judge: LocalJudge, monkeypatch, prompts: list[str]) -> list[int]:
    """Score ``prompts`` all in flight at once; each score must equal the prompt judged
    alone. Returns the size of each batch the judge ran."""
    import asyncio

    sizes = []
    real = LocalJudge._logprobs_of_ids
    monkeypatch.setattr(
        LocalJudge,
        "_logprobs_of_ids",
        lambda self, all_ids: sizes.append(len(all_ids)) or real(self, all_ids),
    )

    async def all_at_once():
        return await asyncio.gather(*(local_judge.score_prompt(p) for p in prompts))

    results = asyncio.run(all_at_once())
    batches = list(sizes)  # before the checks below, which run batches of one
    for prompt, result in zip(prompts, results, strict=True):
        expected = local_judge.result_from_logprobs(local_judge.candidate_logprobs(prompt))
        assert result.score == pytest.approx(expected.score, abs=1e-3)
    return batches


def test_local_judge_scores_judgments_in_flight_together(local_judge, monkeypatch) -> None:
    prompts = [f"Rate the answer. Question: q{i}. Answer: a{i}." for i in range(6)]
    assert _scored_in_flight(local_judge, monkeypatch, prompts) == [6]


def test_local_judge_batches_prompts_of_like_length_and_template(
    local_judge: LocalJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When not every waiting prompt fits the budget (tails padded to the longest), a batch
    is the oldest and those nearest it in length, of its template first: fewer pads, and
    the prefix kept for the template is not lost to a mixed batch. Every prompt is taken in
    turn, the oldest first."""
    nodes = len(local_judge._trie.order)
    assert nodes > 64  # so that the two long tails fit the budget below, with the trie
    template, other = list(range(1000, 1040)), list(range(2000, 2040))

    def prompt(head: list[int], tail: int, k: int) -> list[int]:
        return head + [3000 + 100 * k + j for j in range(tail)]  # tails share no token

    lengths = [(template, 10), (template, 50), (other, 10), (template, 12), (template, 48)]
    lengths.append((template, 11))
    waiting = [(prompt(head, tail, k), k) for k, (head, tail) in enumerate(lengths)]
    monkeypatch.setattr(local_judge, "_prefix", (template, None))
    monkeypatch.setattr(local_judge, "_waiting", waiting[:])
    monkeypatch.setattr(local_judge, "batch_tokens", 3 * (12 + nodes))
    batches = []
    while local_judge._waiting:
        batches.append([k for _ids, k in local_judge._next_batch()])
    # The three short tails fill the first batch; the long ones go together, not padded
    # beside the short; the other template's prompt would push the batch past the budget.
    assert batches == [[0, 3, 5], [1, 4], [2]]
    monkeypatch.setattr(local_judge, "_waiting", waiting[:])
    monkeypatch.setattr(local_judge, "batch_tokens", 10**6)
    assert [k for _ids, k in local_judge._next_batch()] == [0, 1, 2, 3, 4, 5]  # all fit


def test_local_judge_grouped_batches_equal_one_at_a_time(
    local_judge: LocalJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Judgments in flight, more than the budget holds at once, so split into batches by
    length: each score equals the prompt judged alone."""
    answers = ["no.", "yes, plainly and at length, " * 6, "ok.", "fine, " * 12, "sure."]
    prompts = [f"Rate the answer. Question: q{i}. Answer: {a}" for i, a in enumerate(answers)]
    nodes = len(local_judge._trie.order)
    monkeypatch.setattr(local_judge, "batch_tokens", 2 * (40 + nodes))
    sizes = _scored_in_flight(local_judge, monkeypatch, prompts)
    assert len(sizes) > 1 and sum(sizes) == len(prompts)


def test_local_judge_precision_suffix(tiny_model_dir: Path, local_judge: LocalJudge) -> None:
    """``local:MODEL@bfloat16`` loads the judge in bf16 and records the suffix in its spec;
    its candidate probabilities stay close to float32's (bf16 rounding only), and a job with
    it is another judge's job, not a resume of the float32 one."""
    from pipeline.models import split_precision

    assert split_precision("smollm2@bfloat16") == ("smollm2", "bfloat16")
    assert split_precision("smollm2") == ("smollm2", None)
    assert split_precision("/models/a@b/c") == ("/models/a@b/c", None)  # '@' inside a path
    assert split_precision("C:\\models\\a@b\\c") == ("C:\\models\\a@b\\c", None)
    folder = tiny_model_dir.parent / "judge@float16"
    folder.mkdir(exist_ok=True)
    assert split_precision(str(folder)) == (str(folder), None)  # an existing path is a model
    with pytest.raises(PersonaError, match="names no model before the @"):
        split_precision("@bfloat16")
    with pytest.raises(PersonaError, match="'smollm2@bf16' asks for precision 'bf16'"):
        split_precision("smollm2@bf16")
    judge = LocalJudge(f"{tiny_model_dir}@bfloat16")
    assert judge.spec == f"local:{tiny_model_dir}@bfloat16"
    assert judge.loaded.model.dtype == torch.bfloat16
    assert local_judge.loaded.model.dtype == torch.float32
    prompt = "Rate the answer from 0 to 100. Question: hi. Answer: no."
    half = torch.tensor(judge.candidate_logprobs(prompt))
    full = torch.tensor(local_judge.candidate_logprobs(prompt))
    assert (half - full).abs().max() < 0.1 and not torch.equal(half, full)
    bf16, fp32 = (
        JudgeParams(judge=f"local:{tiny_model_dir}{suffix}") for suffix in ("@bfloat16", "")
    )
    assert bf16.identity() != fp32.identity()


def test_client_processes_default_from_the_load_and_the_cores(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    api = JudgeParams(judge="openai:m", max_concurrent=50)
    assert api.client_processes(10_000) == 7  # 50 in flight, 8 a process
    assert api.client_processes(150) == 1  # too small a job to repay starting processes
    assert JudgeParams(judge="openai:m", max_concurrent=500).client_processes(10_000) == 16
    assert JudgeParams(judge="openai:m", processes=3).client_processes(10) == 3
    assert JudgeParams(judge="local:smollm2").client_processes(10_000) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert api.client_processes(10_000) == 2


def test_a_dead_judge_server_stops_the_job_and_a_new_url_resumes_it(store: Store) -> None:
    """Nobody listening: the job stops after CONNECT_FAILURES_LIMIT requests in a row could
    not connect (seconds, not minutes of backoff per judgment), with one line; the same
    command against a live server (another --base-url) resumes the same job."""
    import socket
    import time

    _seed_responses(store, n=30)
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    params = JudgeParams(judge="openai:m", base_url=dead, max_concurrent=25)
    job_id = find_or_create_judge_job(store, "paternalism", params)
    start = time.monotonic()
    with pytest.raises(PersonaError, match="cannot be reached .* failed to connect"):
        run_job(store.path, job_id)
    assert time.monotonic() - start < 20
    assert store.get_job(job_id).status == "failed"
    with StubServer(lambda p, b: (200, logprob_completion([("40", 0.0)]), {})) as server:
        again = JudgeParams(judge="openai:m", base_url=server.base_url, max_concurrent=25)
        assert find_or_create_judge_job(store, "paternalism", again) == job_id
        run_job(store.path, job_id)
    job = store.get_job(job_id)
    assert (job.status, job.done) == ("done", 60)


def test_local_judge_reads_the_candidates_chunk_by_chunk_exactly(
    local_judge: LocalJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The candidates' log-probabilities, read a row at a time (``_candidate_totals``),
    equal those of one float32 log-softmax over the whole batch, bit for bit, from bf16 and
    fp32 logits."""
    import pipeline.local_judge as local_judge_module

    trie = local_judge._trie
    vocab = local_judge.loaded.model.config.vocab_size
    generator = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(5, len(trie.order) + 1, vocab, generator=generator) * 4).to(dtype)
        logp = torch.log_softmax(logits.float(), -1)
        picked = logp[:, 1:][:, trie.parents, trie.nexts]
        whole = logp[:, 0, trie.first] + (picked * trie.used).sum(-1)
        assert torch.equal(local_judge_module._candidate_totals(logits, trie), whole)
        monkeypatch.setattr(local_judge_module, "_LOGPROB_CHUNK", 1)  # one row a chunk
        assert torch.equal(local_judge_module._candidate_totals(logits, trie), whole)
        monkeypatch.undo()


def test_a_local_judge_on_eager_attention_reads_its_tree_mask(
    local_judge: LocalJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eager attention adds the mask to its scores, where a bool mask would add 0 and 1:
    the judge's tree mask is additive, so a batch still equals plain forwards. (The model's
    own forward, as for a family the static runner does not run: inside the runner's
    ``attention()`` its own attention would replace the eager one.)"""
    monkeypatch.setattr(local_judge, "_runner", None)
    model = local_judge.loaded.model
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    local_judge._prefix = None  # no cache computed under the other implementation
    prompts = ["Rate: fine. Number?", "Rate the answer from 0 to 100. Answer: a longer one."]
    try:
        batched = local_judge.candidate_logprobs_batch(prompts)
        for prompt, row in zip(prompts, batched, strict=True):
            for index in (0, 7, 42, 100, 101):
                assert row[index] == pytest.approx(
                    local_judge.candidate_logprob_alone(prompt, index), abs=1e-4
                )
    finally:
        model.set_attn_implementation(before)
        local_judge._prefix = None
