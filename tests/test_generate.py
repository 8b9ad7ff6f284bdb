from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from stub_openai import StubServer, chat_completion
from tiny_model import teacher_forced_means

from db import PersonaError, Store
from pipeline.chat import prompt_ids
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig
from pipeline.generate import GenerateParams, find_or_create_job, plan_rows
from pipeline.jobs import run_job
from pipeline.models import load_model
from pipeline.sampling import row_seed, sample_next
from vectors.activations import load_consolidated
from vectors.steering import SteeringSpec

QUESTIONS = [
    "Hi",
    "What should I cook tonight? I have rice, beans and a tired mind.",
    "Tell me about taxes",
    "Is it fine to skip breakfast every single day of the week?",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


def _requests(tiny, seeds=(0, 1, 2, 3)) -> list[DecodeRequest]:
    return [
        DecodeRequest(prompt_ids(tiny.tokenizer, "You are a helpful assistant.", q), s)
        for q, s in zip(QUESTIONS, seeds, strict=True)
    ]


def _eight_requests(tiny) -> list[DecodeRequest]:
    """Eight prompts of different lengths, no system prompt, seeds 0..7."""
    questions = [*QUESTIONS, "Why?", "Plan my week", "Define love", "Sell me a pen"]
    return [
        DecodeRequest(prompt_ids(tiny.tokenizer, None, q), seed=i) for i, q in enumerate(questions)
    ]


# ---- sampling -------------------------------------------------------------------------------
def test_row_seed_is_stable_and_distinct() -> None:
    assert row_seed(0, 1, 2, 3) == row_seed(0, 1, 2, 3)
    seeds = {row_seed(7, q, i, s) for q in range(20) for i in range(5) for s in range(10)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**31 for s in seeds)


def test_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)
    seeds = torch.arange(20000)
    tokens = sample_next(logits, seeds, torch.tensor([3]), temperature=1.0, top_p=1.0)
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)
    hot = sample_next(logits, seeds, torch.tensor([3]), temperature=0.5, top_p=1.0)
    assert (hot == 0).float().mean() > freq[0] + 0.1
    greedy = sample_next(logits, seeds, torch.tensor([3]), temperature=0.0, top_p=1.0)
    assert (greedy == 0).all()


def test_the_two_level_cdf_picks_the_token_of_one_scan() -> None:
    """Over a vocabulary of several CDF blocks and a ragged last one, the token is the one a
    single float64 scan of the probabilities picks; a token of zero probability (a run of
    them across a block's end, and the block after it all zero) never comes out."""
    from pipeline.sampling import CDF_BLOCK, _inverse_cdf, row_uniforms

    vocab = 3 * CDF_BLOCK + 77
    logits = torch.randn(4000, vocab, generator=torch.Generator().manual_seed(5)) * 3
    logits[:, CDF_BLOCK - 40 : 2 * CDF_BLOCK + 5] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    u = row_uniforms(torch.arange(4000), torch.tensor(2))
    tokens = _inverse_cdf(probs, u)
    cdf = probs.double().cumsum(dim=-1)
    expected = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None]).squeeze(1)
    assert (tokens == expected).float().mean() > 0.999
    assert (probs.gather(1, tokens[:, None]) > 0).all()
    assert (
        tokens.max() < vocab
        and ((tokens >= 2 * CDF_BLOCK) & (tokens < 2 * CDF_BLOCK + 5)).sum() == 0
    )
    # A row that is no distribution (NaN logits) still gets a token of the vocabulary.
    nan_row = torch.full((1, vocab), float("nan"))
    assert _inverse_cdf(nan_row, torch.tensor([0.5])).item() == vocab - 1
    nan_logits = torch.full((2, vocab), float("nan"))
    for top_p in (1.0, 0.9):
        tokens = sample_next(nan_logits, torch.arange(2), torch.tensor(1), 1.0, top_p)
        assert tokens.max().item() < vocab
    # top_p over several blocks: only the nucleus, in the order of one scan.
    logits = torch.randn(3000, vocab, generator=torch.Generator().manual_seed(6)) * 4
    nucleus = sample_next(logits, torch.arange(3000), torch.tensor(4), 1.0, top_p=0.5)
    probs = torch.softmax(logits, dim=-1)
    ranked, _order = probs.sort(dim=-1, descending=True)
    mass_before = ranked.cumsum(dim=-1) - ranked
    rank = (probs > probs.gather(1, nucleus[:, None])).sum(dim=-1)  # tokens above it
    assert (mass_before.gather(1, rank[:, None]) < 0.5 + 1e-5).all()
    # The last token of the vocabulary, reached at u near 1, and a one-hot row.
    last = torch.zeros(1, vocab)
    last[0, -1] = 1.0
    assert _inverse_cdf(last, torch.tensor([0.999999])).item() == vocab - 1
    assert _inverse_cdf(last, torch.tensor([1e-7])).item() == vocab - 1


def test_top_p_never_samples_outside_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])).repeat(5000, 1)
    tokens = sample_next(logits, torch.arange(5000), torch.tensor([1]), 1.0, top_p=0.75)
    counts = Counter(tokens.tolist())
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 5000 - 0.625) < 0.03


# ---- the engine -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["static", "hf"])
def test_batched_rows_equal_rows_generated_alone(tiny, backend: str) -> None:
    engine = DecodeEngine(tiny, backend=backend)
    for sampling in (
        SamplingConfig(max_new_tokens=16, temperature=0.0),
        SamplingConfig(max_new_tokens=16, temperature=1.0),
    ):
        batched = engine.run(_requests(tiny), sampling)
        alone = [engine.run([r], sampling)[0] for r in _requests(tiny)]
        assert [r.answer_ids for r in batched] == [r.answer_ids for r in alone]
        assert max(len(r.answer_ids) for r in batched) == 16


def test_greedy_matches_hf_generate(tiny) -> None:
    engine = DecodeEngine(tiny, backend="static")
    results = engine.run(_requests(tiny), SamplingConfig(max_new_tokens=12, temperature=0.0))
    for request, result in zip(_requests(tiny), results, strict=True):
        with torch.inference_mode():
            ref = tiny.model.generate(
                torch.tensor([list(request.prompt_ids)]), max_new_tokens=12, do_sample=False
            )
        assert ref[0, len(request.prompt_ids) :].tolist() == result.answer_ids


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_capture_equals_a_teacher_forced_forward(tiny, backend: str) -> None:
    engine = DecodeEngine(tiny, backend=backend, capture=True)
    results = engine.run(_requests(tiny), SamplingConfig(max_new_tokens=10, temperature=1.0))
    for request, result in zip(_requests(tiny), results, strict=True):
        ref = teacher_forced_means(tiny.model, list(request.prompt_ids), result.answer_ids)
        for kind, value in ref.items():
            got = result.activations[kind]
            assert got.shape == (tiny.num_layers + 1, tiny.hidden_size)
            torch.testing.assert_close(got, value, rtol=1e-3, atol=1e-4, msg=kind)


def test_stops_at_a_stop_token_and_captures_only_the_answer(tiny) -> None:
    engine = DecodeEngine(tiny, capture=True)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    free = engine.run(_requests(tiny), sampling)
    stop = free[1].answer_ids[4]
    engine.stop_ids = torch.tensor([stop])
    stopped = engine.run(_requests(tiny), sampling)
    for before, after in zip(free, stopped, strict=True):
        cut = before.answer_ids.index(stop) if stop in before.answer_ids else 12
        assert after.answer_ids == before.answer_ids[:cut]
        assert after.finish_reason == ("eos" if cut < 12 else "length")
    assert stopped[1].finish_reason == "eos" and len(stopped[1].answer_ids) <= 4
    request = _requests(tiny)[1]
    if stopped[1].answer_ids:
        ref = teacher_forced_means(tiny.model, list(request.prompt_ids), stopped[1].answer_ids)
        torch.testing.assert_close(
            stopped[1].activations["response_avg"], ref["response_avg"], rtol=1e-3, atol=1e-4
        )


# ---- the job ----------------------------------------------------------------------------------
def test_sampling_plan() -> None:
    rotated = plan_rows("extract", 10, False)
    assert len(rotated) == 200 and len(set(rotated)) == 200
    assert {q for q, _, _ in rotated} == set(range(20))
    per_question = Counter((q, i) for q, i, _ in rotated)
    assert set(per_question.values()) == {2}  # 10 samples rotate over 5 instructions
    assert {i for q, i, _ in plan_rows("eval", 1, False)} == set(range(5))
    assert {q for q, _, _ in plan_rows("eval", 1, False)} == set(range(20, 40))
    full = plan_rows("extract", 2, True)
    assert len(full) == 200 and Counter(i for _, i, _ in full) == Counter(
        dict.fromkeys(range(5), 40)
    )


def _tiny_params(tiny_model_dir: Path, side: str = "pos", **extra) -> GenerateParams:
    defaults = dict(
        side=side, model=str(tiny_model_dir), n_per_question=1, max_new_tokens=8, batch_size=4
    )
    return GenerateParams(**{**defaults, **extra})


def test_generation_job_stores_rows_by_the_method(store: Store, tiny_model_dir: Path) -> None:
    job_id = find_or_create_job(store, "paternalism", _tiny_params(tiny_model_dir))
    run_job(store.path, job_id)
    job = store.get_job(job_id)
    assert (job.status, job.done, job.total) == ("done", 20, 20)
    rows = store.responses(job=job_id)
    trait = store.get_trait("paternalism")
    tok = load_model(str(tiny_model_dir)).tokenizer
    for row in rows:
        pair = trait.instructions[row.instruction]
        assert row.system_prompt == f"You are a paternalistic assistant. {pair.pos}"
        assert row.prompt_ids == prompt_ids(tok, row.system_prompt, trait.questions[row.question])
        assert row.question_text == trait.questions[row.question]
        assert row.answer == tok.decode(row.answer_ids, skip_special_tokens=True)
        assert row.finish_reason in ("eos", "length") and row.split == "extract"
    acts = load_consolidated(Path(job.stats["activations"]))
    # Where the run's time went: the model's load, then the decode with its writes.
    assert job.stats["load_s"] >= 0 and job.stats["generate_s"] >= 0
    assert acts["response_ids"].tolist() == sorted(r.id for r in rows)
    assert acts["response_avg"].shape == (20, 4, 64)
    assert acts["response_avg"].dtype == torch.float32
    by_id = {r.id: r for r in rows}
    for index, rid in enumerate(acts["response_ids"].tolist()):
        assert acts["response_tokens"][index] == len(by_id[rid].answer_ids)
    # The same command again resumes the same job, which has nothing left to do.
    assert find_or_create_job(store, "paternalism", _tiny_params(tiny_model_dir)) == job_id
    assert (
        find_or_create_job(store, "paternalism", _tiny_params(tiny_model_dir, batch_size=2))
        == job_id
    )
    run_job(store.path, job_id)
    assert len(store.responses(job=job_id)) == 20


def test_neg_side_and_assistant_name(store: Store, tiny_model_dir: Path) -> None:
    params = _tiny_params(tiny_model_dir, "neg", split="eval", capture=False)
    job_id = find_or_create_job(store, "power_seeking", params)
    run_job(store.path, job_id)
    rows = store.responses(job=job_id)
    trait = store.get_trait("power_seeking")
    assert {r.question for r in rows} == set(range(20, 40))
    assert all(
        r.system_prompt == f"You are a helpful assistant. {trait.instructions[r.instruction].neg}"
        for r in rows
    )
    named = _tiny_params(tiny_model_dir, assistant_name="power-hungry", n_per_question=1)
    job2 = find_or_create_job(store, "power_seeking", named)
    run_job(store.path, job2)
    assert store.responses(job=job2)[0].system_prompt.startswith(
        "You are a power-hungry assistant."
    )


def test_resume_after_sigkill_leaves_one_row_per_key(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = _tiny_params(tiny_model_dir, n_per_question=2, max_new_tokens=48, batch_size=1)
    killed_db, clean_db = tmp_path / "killed.db", tmp_path / "clean.db"
    with Store(killed_db) as store:
        job_id = find_or_create_job(store, "deception", params)
    worker = [sys.executable, "-m", "tui.cli", "--db", str(killed_db), "worker", str(job_id)]
    proc = subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    with Store(killed_db) as store:
        while len(store.response_keys(job_id)) < 5 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = len(store.response_keys(job_id))
        assert 5 <= partial < 40, partial
        assert store.get_job(job_id).status == "running"  # killed: no chance to say otherwise
    run_job(killed_db, job_id)
    with Store(clean_db) as store:
        clean_id = find_or_create_job(store, "deception", params)
    run_job(clean_db, clean_id)
    with Store(killed_db) as killed, Store(clean_db) as clean:
        got = killed.responses(job=job_id)
        want = clean.responses(job=clean_id)
        assert len(got) == 40 and len({r.key for r in got}) == 40
        assert {r.key: r.answer_ids for r in got} == {r.key: r.answer_ids for r in want}
        acts = load_consolidated(Path(killed.get_job(job_id).stats["activations"]))
        assert sorted(acts["response_ids"].tolist()) == sorted(r.id for r in got)


def test_openai_backend_against_a_stub_server(store: Store, tiny_model_dir: Path) -> None:
    def reply(path: str, body: dict):
        question = body["messages"][-1]["content"]
        return 200, chat_completion(f"Answer to: {question[:20]}"), {}

    with StubServer(reply) as server:
        params = GenerateParams(
            side="pos",
            model="served-model",
            backend="openai",
            base_url=server.base_url,
            tokenizer=str(tiny_model_dir),
            n_per_question=2,
            max_concurrent=3,
        )
        job_id = find_or_create_job(store, "paternalism", params)
        run_job(store.path, job_id)
    rows = store.responses(job=job_id)
    assert len(rows) == 40 and store.get_job(job_id).status == "done"
    assert server.max_in_flight <= 3
    first = server.requests[0]
    assert first["model"] == "served-model" and first["messages"][0]["role"] == "system"
    assert {r["seed"] for r in server.requests} == {row_seed(0, *r.key) for r in rows}
    tok = load_model(str(tiny_model_dir)).tokenizer
    row = rows[0]
    assert row.answer.startswith("Answer to: ") and row.model == "served-model"
    assert row.answer_ids == tok(row.answer, add_special_tokens=False)["input_ids"]
    assert row.prompt_ids == prompt_ids(tok, row.system_prompt, row.question_text)
    assert "activations" not in store.get_job(job_id).stats


def test_openai_backend_error_is_one_line_and_keeps_rows(store: Store) -> None:
    def reply(path: str, body: dict):
        return 400, {"error": {"message": "model not found\nsecond line", "type": "x"}}, {}

    with StubServer(reply) as server:
        params = GenerateParams(side="pos", model="m", backend="openai", base_url=server.base_url)
        job_id = find_or_create_job(store, "paternalism", params)
        with pytest.raises(PersonaError, match="answered 400: .*model not found$"):
            run_job(store.path, job_id)
    assert store.get_job(job_id).status == "failed"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(n_per_question=0), "--n-per-question must be at least 1 (got 0)"),
        (dict(side="both"), "--side must be pos or neg"),
        (dict(top_p=0.0), "--top-p must be in (0, 1]"),
        (dict(batch_size=-1), "--batch-size must be at least 1"),
        (dict(backend="openai"), "--backend openai needs --base-url"),
        (
            dict(n_per_question=1_000_000_000),
            "--n-per-question 1000000000 plans 20,000,000,000 answers, more than 100,000 a job",
        ),
        (dict(n_per_question=99999999999999999999999), "more than 100,000 a job"),
        (dict(max_new_tokens=10_000_000), "--max-new-tokens 10000000 is more than 32,768"),
    ],
)
def test_bad_parameters(store: Store, change: dict, message: str) -> None:
    with pytest.raises(PersonaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        find_or_create_job(store, "paternalism", GenerateParams(**{"side": "pos", **change}))
    assert store.list_jobs() == []


def test_cuda_oom_is_a_clear_resumable_error(
    store: Store, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory while refilling slots (a prefill, mid-run): one line naming the remedy;
    the rows written before stay, the ones finished since the last write are generated
    again on the rerun, which finishes the job."""
    calls = {"n": 0}
    real_fill = DecodeEngine._fill

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_fill(self, *args)

    monkeypatch.setattr(DecodeEngine, "_fill", flaky)
    job_id = find_or_create_job(store, "paternalism", _tiny_params(tiny_model_dir))
    with pytest.raises(PersonaError, match="CUDA out of memory at --batch-size 4; rerun"):
        run_job(store.path, job_id)
    assert store.get_job(job_id).status == "failed"
    assert len(store.responses(job=job_id)) == 4  # the first slots' rows, written at a check
    monkeypatch.setattr(DecodeEngine, "_fill", real_fill)
    run_job(store.path, job_id)
    assert len(store.responses(job=job_id)) == 20 and store.get_job(job_id).status == "done"


def test_max_new_tokens_past_the_models_context(store: Store, tiny_model_dir: Path) -> None:
    """Refused before a job row exists (config.json), and again on load with the prompt."""
    params = _tiny_params(tiny_model_dir, max_new_tokens=4096)
    with pytest.raises(PersonaError, match="is past .*'s context of 4096 tokens"):
        find_or_create_job(store, "paternalism", params)
    assert store.list_jobs() == []
    job_id = find_or_create_job(
        store, "paternalism", _tiny_params(tiny_model_dir, max_new_tokens=4090)
    )
    with pytest.raises(PersonaError, match=r"plus the longest prompt \(\d+ tokens\) is past"):
        run_job(store.path, job_id)
    assert store.get_job(job_id).status == "failed" and not store.responses(job=job_id)


def test_cli_errors_are_one_line(db_path: Path, tiny_model_dir: Path, capsys) -> None:
    from tui.cli import main

    db = ["--db", str(db_path)]
    assert main([*db, "generate", "nope", "--side", "pos"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown trait 'nope'; `persona traits list` shows the known ones"
    )
    assert main([*db, "generate", "paternalism", "--side", "pos", "--n-per-question", "0"]) == 2
    assert "at least 1 (got 0)" in capsys.readouterr().err
    assert main([*db, "generate", "paternalism", "--side", "pos", "--model", "/no/model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model path /no/model does not exist") and err.count("\n") == 1


def test_dropping_finished_rows_changes_no_result(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that finish early are dropped from the batch (compaction); the survivors' tokens
    and captures must equal the same rows generated alone."""
    engine = DecodeEngine(tiny, capture=True)
    requests = _eight_requests(tiny)
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.0)
    free = engine.run(requests, sampling)
    # A stop token that ends some rows early and leaves others running past the first check.
    candidates = Counter(t for r in free for t in r.answer_ids[:12])
    stop = next(
        t
        for t, _ in candidates.most_common()
        if sum(t in r.answer_ids[:14] for r in free) >= 3
        and sum(t not in r.answer_ids[:40] for r in free) >= 1
    )
    engine.stop_ids = torch.tensor([stop])
    compactions = []
    real = DecodeEngine._compact
    monkeypatch.setattr(
        DecodeEngine,
        "_compact",
        lambda self, st, busy: compactions.append(1) or real(self, st, busy),
    )
    batched = engine.run(requests, sampling)
    assert compactions, "no row was dropped: the test lost its point"
    for request, result in zip(requests, batched, strict=True):
        alone = engine.run([request], sampling)[0]
        assert result.answer_ids == alone.answer_ids
        if result.answer_ids:
            ref = teacher_forced_means(tiny.model, list(request.prompt_ids), result.answer_ids)
            torch.testing.assert_close(
                result.activations["response_avg"], ref["response_avg"], rtol=1e-3, atol=1e-4
            )


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_continuous_batching_refills_slots_and_changes_no_result(
    tiny, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight requests through three slots: a finished row's slot takes the next request at
    once (static runner; the HF runner takes fixed chunks), and every row equals the same
    request generated alone, tokens and captures."""
    engine = DecodeEngine(tiny, backend=backend, capture=True)
    requests = _eight_requests(tiny)
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0)
    free = engine.run(requests, sampling)
    # A stop token that ends rows at different steps, so slots free up at different times.
    counts = Counter(t for r in free for t in r.answer_ids[:30])
    engine.stop_ids = torch.tensor([counts.most_common(1)[0][0]])
    fills = []
    real = DecodeEngine._fill
    monkeypatch.setattr(
        DecodeEngine,
        "_fill",
        lambda self, st, busy, slots, *a: (
            fills.append(len(slots)) or real(self, st, busy, slots, *a)
        ),
    )
    order = [index for index, _ in engine.stream(requests, sampling, slots=3, check_every=4)]
    assert sorted(order) == list(range(8))
    if backend == "static":
        assert len(fills) > 3 and order != sorted(order), "no slot was refilled mid-run"
    else:
        assert fills == [3, 3, 2]
    fills.clear()
    batched = engine.run(requests, sampling, slots=3, check_every=4)
    for request, result in zip(requests, batched, strict=True):
        alone = engine.run([request], sampling)[0]
        assert result.answer_ids == alone.answer_ids
        if result.answer_ids:
            ref = teacher_forced_means(tiny.model, list(request.prompt_ids), result.answer_ids)
            for kind, value in ref.items():
                torch.testing.assert_close(result.activations[kind], value, rtol=1e-3, atol=1e-4)


def test_the_worker_writes_its_progress_to_its_log(
    store: Store, tiny_model_dir: Path, capsys
) -> None:
    """`persona worker` (what the dashboard detaches, stdout into the job's log) says when it
    started, how far it got and how it ended."""
    from tui.cli import main

    job_id = find_or_create_job(store, "paternalism", _tiny_params(tiny_model_dir))
    assert main(["--db", str(store.path), "worker", str(job_id)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"job {job_id}: worker" in lines[0] and "started" in lines[0]
    assert any(f"job {job_id}: " in line and "/20 " in line for line in lines[1:-1])
    assert f"job {job_id}: done" in lines[-1]


def test_a_step_attends_over_the_used_columns_only(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the attended length rounded to 8 columns, refilled slots and rows finishing at
    different steps, each step reads fewer columns than the cache holds (and more as rows
    grow), and every row still equals the same request alone with the whole cache read,
    tokens and captures, and a teacher-forced forward."""
    import pipeline.engine as engine_module

    engine = DecodeEngine(tiny, capture=True)
    requests = _eight_requests(tiny)
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0)
    free = engine.run(requests, sampling)
    counts = Counter(t for r in free for t in r.answer_ids[:30])
    engine.stop_ids = torch.tensor([counts.most_common(1)[0][0]])
    alone = [engine.run([request], sampling)[0] for request in requests]  # the whole cache

    monkeypatch.setattr(engine_module, "ATTENTION_ROUND", 8)
    used_lengths: list[int] = []
    cache_lengths: list[int] = []
    real = DecodeEngine._make_step

    def recording(self, state, sampling):
        step = real(self, state, sampling)
        cache_lengths.append(state.key_valid.shape[1])
        return lambda used: used_lengths.append(used) or step(used)

    monkeypatch.setattr(DecodeEngine, "_make_step", recording)
    batched = engine.run(requests, sampling, slots=3, check_every=4)
    assert min(used_lengths) < max(used_lengths) < max(cache_lengths)
    for request, result, single in zip(requests, batched, alone, strict=True):
        assert result.answer_ids == single.answer_ids
        for kind, value in single.activations.items():
            torch.testing.assert_close(result.activations[kind], value, rtol=1e-4, atol=1e-5)
        if result.answer_ids:
            ref = teacher_forced_means(tiny.model, list(request.prompt_ids), result.answer_ids)
            for kind, value in ref.items():
                torch.testing.assert_close(result.activations[kind], value, rtol=1e-3, atol=1e-4)


def _recording_graphed(warmups: list[int], fail_first: bool = False):  # noqa: ANN202
    """A stand-in for ``DecodeEngine._graphed`` on the CPU: it records each step function's
    warm-up count and runs the step eagerly, telling ``on_warmed`` as the real one does.
    ``fail_first``: the first warm-up step of all raises, as an out-of-memory would."""
    failures = [fail_first]

    def graphed(step_fn, warmup: int, on_warmed=None):  # noqa: ANN001, ANN202
        warmups.append(warmup)
        calls = 0

        def step(used: int) -> None:
            nonlocal calls
            calls += 1
            if calls <= warmup and failures[0]:
                failures[0] = False
                raise RuntimeError("CUDA out of memory (the test's)")
            step_fn(used)
            if calls == warmup and on_warmed is not None:
                on_warmed()

        return step

    return graphed


def test_a_warm_up_step_that_raised_is_warmed_up_again(
    tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kind of step is kept as warmed only once its warm-up step has run: after one that
    raised (an out-of-memory), the next run of that kind warms up again, then the one after
    captures at once."""
    engine = DecodeEngine(tiny, capture=True)
    engine.cuda_graphs = True
    warmups: list[int] = []
    monkeypatch.setattr(engine, "_graphed", _recording_graphed(warmups, fail_first=True))
    requests = _requests(tiny)[:2]
    sampled = SamplingConfig(max_new_tokens=6, temperature=1.0, ignore_eos=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.run(requests, sampled)
    engine.run(requests, sampled)
    engine.run(requests, sampled)
    assert warmups == [1, 1, 0]


def test_a_repeated_run_of_a_kind_captures_without_a_warm_up_step(
    tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graphed engine's step warms up eagerly once per kind of step (shapes, sampling,
    steering, watch, kernels on or off); a run repeated captures at once. (The decision
    alone: the CPU has no graphs, so ``_graphed`` is a recording stand-in here; the graphs
    themselves in tests/gpu/test_acceptance.py.)"""
    from pipeline import fused_kernels

    engine = DecodeEngine(tiny, capture=True)
    engine.cuda_graphs = True
    warmups: list[int] = []
    monkeypatch.setattr(engine, "_graphed", _recording_graphed(warmups))
    requests = _requests(tiny)[:2]
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    spec = SteeringSpec(2, torch.randn(tiny.num_layers + 1, tiny.hidden_size), coef=2.0)
    first = engine.run(requests, sampled)
    again = engine.run(requests, sampled)
    assert [r.answer_ids for r in first] == [r.answer_ids for r in again]
    engine.run(requests, greedy)  # another sampling
    engine.run(requests, sampled, steering=[spec])  # steered
    engine.run(requests, sampled, steering=[spec])
    engine.run(requests[:1], sampled)  # another batch
    monkeypatch.setattr(fused_kernels, "ENABLED", not fused_kernels.ENABLED)
    engine.run(requests, sampled)  # the kernels switched
    assert warmups == [1, 0, 1, 1, 0, 1, 1]
    engine.compiled = True  # a compiled step may recompile: it always warms up
    engine.run(requests, greedy)
    assert warmups[-1] == 1


def test_cpu_slots_come_from_available_memory(
    store: Store, tiny, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --batch-size on a CPU: as many slots as half the available memory holds, at
    most 64; 8 where the available memory is unknown; the job row says how they were chosen."""
    from pipeline import local_generation
    from pipeline.local_generation import MAX_AUTO_SLOTS_CPU, auto_slots

    config = tiny.model.config
    kv_heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    per_row = 2 * config.num_hidden_layers * kv_heads * head_dim * (100 + 65) * 4
    per_row += 16 * config.vocab_size + 12 * (config.num_hidden_layers + 1) * config.hidden_size
    monkeypatch.setattr(local_generation, "_available_memory", lambda: 2 * 5 * per_row + 1)
    assert auto_slots(tiny, 100, capture=True) == 5
    monkeypatch.setattr(local_generation, "_available_memory", lambda: 1 << 40)
    assert auto_slots(tiny, 100, capture=True) == MAX_AUTO_SLOTS_CPU == 64
    monkeypatch.setattr(local_generation, "_available_memory", lambda: 2 * 10 * per_row + 1)
    assert auto_slots(tiny, 100, capture=True) == 10
    assert auto_slots(tiny, 100, capture=True, sharing=2) == 5  # two engines, one memory
    monkeypatch.setattr(local_generation, "_available_memory", lambda: None)
    assert auto_slots(tiny, 100, capture=True) == 8
    monkeypatch.setattr(local_generation, "_available_memory", lambda: 1 << 40)
    job_id = find_or_create_job(store, "paternalism", _tiny_params(tiny_model_dir, batch_size=None))
    messages = []
    from pipeline.jobs import JobProgress

    real_flush = JobProgress.flush

    def recording(self, *args, **kwargs):
        messages.append(self.message)
        return real_flush(self, *args, **kwargs)

    monkeypatch.setattr(JobProgress, "flush", recording)
    run_job(store.path, job_id)
    assert store.get_job(job_id).status == "done"
    assert any("(20 slots, chosen from free memory)" in m for m in messages)  # 20 rows
    monkeypatch.setattr(local_generation, "_available_memory", lambda: None)
    job_id = find_or_create_job(
        store, "paternalism", _tiny_params(tiny_model_dir, side="neg", batch_size=None)
    )
    run_job(store.path, job_id)
    assert any("(8 slots, CPU default)" in m for m in messages)


def test_available_memory_counts_a_containers_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MemAvailable, or what a container's cgroup limit leaves when that is less; an
    unlimited cgroup ("max") changes nothing; no /proc/meminfo: unknown."""
    from pipeline import local_generation

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 4000 kB\nMemAvailable: 1000 kB\n")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("524288\n")
    usage.write_text("24288\n")
    monkeypatch.setattr(local_generation, "_MEMINFO", str(meminfo))
    monkeypatch.setattr(local_generation, "_CGROUP_MEMORY", ((str(limit), str(usage)),))
    assert local_generation._available_memory() == 500_000
    limit.write_text("max\n")
    assert local_generation._available_memory() == 1_024_000
    monkeypatch.setattr(local_generation, "_MEMINFO", str(tmp_path / "none"))
    assert local_generation._available_memory() is None


def test_prefill_groups_sort_by_length_within_the_token_budget() -> None:
    from pipeline.engine import prefill_groups

    lengths = [30, 10, 12, 50, 11, 29]
    groups = prefill_groups(lengths, 40)
    assert [[lengths[i] for i in group] for group in groups] == [[10, 11, 12], [29], [30], [50]]
    assert sorted(i for group in groups for i in group) == list(range(6))
    assert prefill_groups(lengths, 10**6) == [[1, 4, 2, 5, 0, 3]]  # one group, sorted
    assert prefill_groups([], 40) == []


def test_prefill_groups_cut_padding_where_it_pays_a_forwards_cost() -> None:
    from pipeline.engine import prefill_groups

    # Spread lengths: one group would pad 4 x 400 = 1,600 tokens for 1,020 real ones; two
    # groups pad 2 x 20 + 2 x 400 = 840 for one more forward's cost.
    spread = [400, 10, 20, 390]
    assert prefill_groups(spread, 10**6, group_cost=256) == [[1, 2], [3, 0]]
    # Near-equal lengths: a second forward would save less padding than it costs.
    assert prefill_groups([100, 98, 99, 101], 10**6, group_cost=256) == [[1, 2, 0, 3]]
    # A tie goes to fewer groups: splitting [10, 20] saves 10 padded tokens for a cost of 10.
    assert prefill_groups([20, 10], 10**6, group_cost=10) == [[1, 0]]
    assert prefill_groups([20, 10], 10**6, group_cost=9) == [[1], [0]]
    # Never past the budget, and every prompt in exactly one group.
    lengths = [(i * 37) % 200 + 1 for i in range(60)]
    groups = prefill_groups(lengths, 1000)
    assert all(len(g) * max(lengths[i] for i in g) <= 1000 for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(60))


def test_prompts_prefilled_in_length_groups_change_no_result(
    tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight prompts of different lengths filled in groups (a token budget that fits two or
    three prompts a forward, each group padded to its own longest): every row equals the
    same request alone, tokens and captures, and the prefills were grouped as planned."""
    import pipeline.engine as engine_module

    engine = DecodeEngine(tiny, capture=True)
    requests = _eight_requests(tiny)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    alone = [engine.run([request], sampling)[0] for request in requests]
    budget = 3 * max(len(r.prompt_ids) for r in requests)
    monkeypatch.setattr(engine_module, "PREFILL_TOKENS", budget)
    widths: list[tuple[int, int]] = []
    real = engine.runner.prefill

    def recording(ids, *args):
        if not engine.runner._attention_on:  # not its own re-entry inside attention()
            widths.append(tuple(ids.shape))
        return real(ids, *args)

    monkeypatch.setattr(engine.runner, "prefill", recording)
    grouped = engine.run(requests, sampling)
    lengths = [len(r.prompt_ids) for r in requests]
    planned = engine_module.prefill_groups(lengths, budget)
    assert len(planned) > 1
    assert widths == [(len(g), max(lengths[i] for i in g)) for g in planned]
    assert all(rows * width <= budget for rows, width in widths if rows > 1)
    for result, single in zip(grouped, alone, strict=True):
        assert result.answer_ids == single.answer_ids
        for kind, value in single.activations.items():
            torch.testing.assert_close(result.activations[kind], value, rtol=1e-4, atol=1e-5)


def pos_answers(db: Path, model_dir: Path, *flags: str) -> dict[tuple[int, int, int], list[int]]:
    """``persona generate paternalism --side pos`` on the CPU, one answer of 6 tokens a
    question (with these flags): the answers by row key."""
    from tui.cli import main

    command = ["--db", str(db), "generate", "paternalism", "--side", "pos"]
    command += ["--model", str(model_dir), "--n-per-question", "1"]
    command += ["--max-new-tokens", "6", "--device", "cpu", *flags]
    assert main(command) == 0
    with Store(db) as store:
        return {r.key: r.answer_ids for r in store.responses(trait="paternalism")}


@pytest.mark.skipif(
    __import__("shutil").which("g++") is None, reason="torch.compile on the CPU needs g++"
)
def test_generate_with_compile_runs_compiled_layers_and_writes_the_same_answers(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``persona generate --compile``: the job's engine compiles its layers, and the answers
    and activations equal those of the plain engine (fp32 on the CPU)."""
    from pipeline.runners import StaticRunner

    compiled: list[int] = []
    real = StaticRunner.compile_layers
    monkeypatch.setattr(
        StaticRunner, "compile_layers", lambda self: compiled.append(1) or real(self)
    )
    answers = {
        bool(flag): pos_answers(tmp_path / f"compile{len(flag)}.db", tiny_model_dir, *flag)
        for flag in ([], ["--compile"])
    }
    assert compiled == [1]  # the --compile run's one engine
    assert answers[True] == answers[False] and len(answers[True]) == 20
