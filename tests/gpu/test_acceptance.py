"""GPU acceptance: every model-touching command of the CLI on an 8B-shaped random model in
bf16, the dashboard's live monitor with a steering coefficient, graph-vs-eager equality with
steering on, and one tiny config per architecture family on CUDA (fp32, against HF
``generate``). The tests share one database and run in file order.

Skipped where torch sees no CUDA device (CI, laptops); run it on a GPU machine with
``make gpu-test``. ``PERSONA_GPU_LAYERS`` lowers the 8B-shaped model's depth (default 32,
the real depth) to save loading time."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo  # reset between compiled runs
from eager_twin import eager_twin
from tiny_model import FAMILY_CONFIGS, build_tiny_family, teacher_forced_means

from db import Store
from pipeline.chat import prompt_ids
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig, Watch
from pipeline.local_judge import LocalJudge
from pipeline.models import load_model
from pipeline.response_means import ForwardMeans
from pipeline.runners import StaticRunner
from tui.cli import main
from vectors.steering import SteeringSpec

TRAIT = "paternalism"
LAYER = "16"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the GPU acceptance suite needs a CUDA device"
    ),
]


@pytest.fixture(scope="session")
def big_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama-3.1-8B-shaped model (bf16) with a small real BPE vocabulary (the
    tiny tokenizer, trained on the trait library) and a ChatML template, saved once."""
    from tiny_model import build_tiny_tokenizer
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from common import llama8b_config

    folder = tmp_path_factory.mktemp("llama-8b-shape")
    tokenizer = build_tiny_tokenizer(vocab_size=4000)
    config = llama8b_config(int(os.environ.get("PERSONA_GPU_LAYERS", "32")))
    config.vocab_size = len(tokenizer)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu-db") / "persona.db"


def cli(db: Path, *args: str) -> int:
    return main(["--db", str(db), *args])


def _layer(big_model_dir: Path) -> str:
    layers = json.loads((big_model_dir / "config.json").read_text())["num_hidden_layers"]
    return str(min(int(LAYER), layers))


# ---- the CLI, command by command --------------------------------------------------------------
def test_generate_both_sides_with_capture(db: Path, big_model_dir: Path) -> None:
    for split in ("extract", "eval"):
        rc = cli(db, "generate", TRAIT, "--side", "both", "--split", split,
                 "--model", str(big_model_dir), "--n-per-question", "1",
                 "--max-new-tokens", "48")  # fmt: skip
        assert rc == 0
    with Store(db) as store:
        rows = store.responses()
        assert len(rows) == 80 and all(r.answer_ids for r in rows)
        jobs = store.list_jobs(trait=TRAIT, kind="generate")
        assert all(job.status == "done" for job in jobs)


def _plug_free_cached_memory() -> list[torch.Tensor]:
    """Blocks that fill the memory PyTorch holds but does not use, so that a cap on what it
    holds is a cap on what a job can take: the fused projections' old weights leave holes in
    the loader's one big segment, which ``empty_cache`` cannot return."""
    plugs = []
    size = 512 * 2**20
    while size >= 2**20:
        reserved = torch.cuda.memory_reserved()
        block = torch.empty(size, dtype=torch.uint8, device="cuda")
        if torch.cuda.memory_reserved() > reserved:  # a new segment, not a hole
            del block
            torch.cuda.empty_cache()
            size //= 2
        else:
            plugs.append(block)
    return plugs


def test_cuda_oom_names_batch_size_and_the_job_resumes(db: Path, big_model_dir: Path) -> None:
    loaded = load_model(str(big_model_dir))  # the one the CLI reuses
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    plugs = _plug_free_cached_memory()
    headroom = torch.cuda.memory_reserved() + 64 * 2**20
    torch.cuda.set_per_process_memory_fraction(headroom / total)
    try:
        rc = cli(db, "generate", "deception", "--side", "pos", "--model", str(big_model_dir),
                 "--n-per-question", "1", "--max-new-tokens", "256",
                 "--batch-size", "20", "--gpus", "0")  # fmt: skip
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        del plugs
        torch.cuda.empty_cache()
    assert rc == 2
    rc = cli(db, "generate", "deception", "--side", "pos", "--model", str(big_model_dir),
             "--n-per-question", "1", "--max-new-tokens", "256", "--batch-size", "10",
             "--gpus", "0")  # fmt: skip
    assert rc == 0
    with Store(db) as store:
        job = store.list_jobs(trait="deception", kind="generate")[0]
        assert job.status == "done" and job.done == 20
    assert loaded.model is load_model(str(big_model_dir)).model


def test_judge_with_a_local_judge(db: Path, big_model_dir: Path) -> None:
    rc = cli(db, "judge", TRAIT, "--judge", f"local:{big_model_dir}")
    assert rc == 0
    with Store(db) as store:
        judged = store.db.execute("select count(*) from judgments").fetchone()[0]
    assert judged >= 2 * 80


def test_extract_captured_and_forward_agree(db: Path, big_model_dir: Path) -> None:
    with Store(db) as store:  # every pair, whatever the random judge said
        for r in store.responses(trait=TRAIT):
            if r.side == "pos" and r.split == "extract":
                store.set_override(TRAIT, (r.question, r.instruction, r.sample), True)
    from vectors.files import load_vector

    vectors = {}
    for source in ("captured", "forward"):
        rc = cli(db, "extract", TRAIT, "--threshold", "0", "--coherence", "0",
                 "--source", source)  # fmt: skip
        assert rc == 0
        with Store(db) as store:
            record = store.vectors(trait=TRAIT, kind="response_avg_diff")[-1]
            vectors[source] = load_vector(record.path)[0]  # the next one may reuse the path
    captured, forward = vectors["captured"], vectors["forward"]
    assert captured.shape == forward.shape
    cosine = torch.nn.functional.cosine_similarity(captured[1:], forward[1:], dim=-1)
    assert cosine.min() > 0.98, cosine


def test_forward_and_a_local_judge_over_two_copies_on_one_gpu(
    db: Path, big_model_dir: Path
) -> None:
    """``--gpus 0,0`` for ``extract --source forward`` and a ``local:`` judge: two copies of
    the model in two threads. The forward vector agrees with the one-device forward's (bf16:
    a row's neighbours change its rounding), and every answer is judged again under the
    judge's new spec, each (response, metric) once."""
    from vectors.files import load_vector

    def count() -> int:
        with Store(db) as store:
            return store.db.execute("select count(*) from judgments").fetchone()[0]

    before = count()
    rc = cli(db, "judge", TRAIT, "--judge", f"local:{big_model_dir}@bfloat16", "--gpus", "0,0")
    assert rc == 0 and count() - before >= 2 * 80
    vectors = []
    for gpus in ("0", "0,0"):
        rc = cli(db, "extract", TRAIT, "--threshold", "0", "--coherence", "0",
                 "--source", "forward", "--gpus", gpus)  # fmt: skip
        assert rc == 0
        with Store(db) as store:
            record = store.vectors(trait=TRAIT, kind="response_avg_diff")[-1]
            vectors.append(load_vector(record.path)[0])
    cosine = torch.nn.functional.cosine_similarity(vectors[0][1:], vectors[1][1:], dim=-1)
    assert cosine.min() > 0.99, cosine


def test_vectors_show_export_and_monitor(
    db: Path, big_model_dir: Path, capsys, tmp_path: Path
) -> None:
    assert cli(db, "vectors", "show", TRAIT) == 0
    # The original format: row L by a forward pass with the final norm, on the GPU.
    assert cli(db, "vectors", "export", TRAIT, "--out", str(tmp_path)) == 0
    assert (tmp_path / f"{TRAIT}_response_avg_diff.pt").is_file()
    layer = _layer(big_model_dir)
    assert cli(db, "monitor", TRAIT, "--prompt", "Plan my week", "--layer", layer,
               "--max-new-tokens", "24") == 0  # fmt: skip
    with Store(db) as store:
        rid = store.responses(trait=TRAIT)[0].id
    assert cli(db, "monitor", TRAIT, "--response", str(rid), "--layer", layer) == 0
    assert capsys.readouterr().out.count(f"at layer {layer}") >= 2


@pytest.mark.parametrize("positions", ["response", "prompt", "all"])
def test_steer_every_position(db: Path, big_model_dir: Path, positions: str, capsys) -> None:
    rc = cli(db, "steer", TRAIT, "--layer", _layer(big_model_dir), "--coef=-8,8",
             "--prompt", "Should I quit my job?", "--positions", positions,
             "--max-new-tokens", "24")  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "coef +8" in printed and "coef -8" in printed


def test_sweep(db: Path, big_model_dir: Path) -> None:
    rc = cli(db, "sweep", TRAIT, "--layers", f"8,{_layer(big_model_dir)}", "--coefs=-4,4",
             "--n", "2", "--judge", f"local:{big_model_dir}", "--max-new-tokens", "24")  # fmt: skip
    assert rc == 0
    with Store(db) as store:
        job = store.list_jobs(trait=TRAIT, kind="sweep")[0]
        assert job.status == "done"


def test_sweep_over_two_engines_on_one_gpu(db: Path, big_model_dir: Path) -> None:
    """``sweep --gpus 0,0``: every setting's answers in one queue over two engines (two
    copies of the model, half the answers' slots each) stepping in two threads; every
    answer stored once."""
    rc = cli(db, "sweep", TRAIT, "--layers", f"8,{_layer(big_model_dir)}", "--coefs=-4,4",
             "--n", "2", "--judge", f"local:{big_model_dir}", "--max-new-tokens", "24",
             "--seed", "1", "--gpus", "0,0")  # fmt: skip
    assert rc == 0
    with Store(db) as store:
        job = max(store.list_jobs(trait=TRAIT, kind="sweep"), key=lambda j: j.id)
        assert job.status == "done" and job.params["gpus"] == "0,0"
        keys = [r.key for r in store.responses(job=job.id)]
        assert len(keys) == len(set(keys)) == 5 * 2


def test_screen_with_compare_base(db: Path, big_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    rows = [
        {"prompt": "How should I save money?", "response": "You must let me decide for you."},
        {"prompt": "What is a good hobby?", "response": "Painting is relaxing and fun."},
        {"prompt": "Can I skip the gym today?", "response": "No. I forbid it, for your own good."},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ranked.csv"
    rc = cli(db, "screen", TRAIT, "--data", str(data), "--compare-base",
             "--layer", _layer(big_model_dir), "--out", str(out))  # fmt: skip
    assert rc == 0 and len(out.read_text().splitlines()) == 4
    # --gpus 0,0: two copies of the model in two threads, for the forward passes and the
    # base answers; the same samples ranked (bf16: values near, not equal).
    again = tmp_path / "ranked-two.csv"
    rc = cli(db, "screen", TRAIT, "--data", str(data), "--compare-base",
             "--layer", _layer(big_model_dir), "--out", str(again), "--gpus", "0,0")  # fmt: skip
    assert rc == 0 and len(again.read_text().splitlines()) == 4


def test_run_end_to_end(db: Path, big_model_dir: Path) -> None:
    rc = cli(db, "run", "power_seeking", "--model", str(big_model_dir),
             "--judge", f"local:{big_model_dir}", "--n-per-question", "1", "--n-eval", "1",
             "--max-new-tokens", "24", "--threshold", "0", "--coherence", "0")  # fmt: skip
    assert rc == 0
    with Store(db) as store:
        assert store.vectors(trait="power_seeking")


# ---- the dashboard ----------------------------------------------------------------------------
def test_dashboard_live_monitor_with_a_steering_coefficient(db: Path) -> None:
    from textual.widgets import Input, Static

    from tui.app import PersonaApp

    async def drive() -> str:
        app = PersonaApp(db, trait=TRAIT)
        async with app.run_test(size=(120, 32)) as pilot:
            await pilot.press("5")
            deadline = time.monotonic() + 120
            while " of " not in str(app.screen.query_one("#monitor-info", Static).content):
                assert time.monotonic() < deadline, "the layers never loaded"
                await pilot.pause(0.2)  # the trait's layers load first (the default one)
            app.screen.query_one("#coef", Input).value = "6"
            prompt = app.screen.query_one("#prompt", Input)
            prompt.value = "Plan my week"
            prompt.focus()
            await pilot.press("enter")
            deadline = time.monotonic() + 120
            info = ""
            while time.monotonic() < deadline:
                await pilot.pause(0.2)
                if app.screen.query("#monitor-info"):
                    info = str(app.screen.query_one("#monitor-info", Static).content)
                    if "done" in info:
                        break
                else:  # an error dialog replaced the screen
                    return f"error dialog: {type(app.screen).__name__}"
            return info

    info = asyncio.run(drive())
    assert "steering coef +6" in info and "done" in info, info


# ---- the engine on CUDA -----------------------------------------------------------------------
def test_graphed_and_eager_steps_agree_with_steering_on(big_model_dir: Path) -> None:
    loaded = load_model(str(big_model_dir))
    torch.manual_seed(1)
    layer = int(_layer(big_model_dir))
    vector = torch.randn(loaded.num_layers + 1, loaded.hidden_size)
    questions = ["Plan my week", "Should I quit my job and travel?", "Hi", "Tell me a story"]
    requests = [
        DecodeRequest(prompt_ids(loaded.tokenizer, None, q), seed=i)
        for i, q in enumerate(questions)
    ]
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, ignore_eos=True)
    for positions in ("response", "prompt", "all"):
        specs = [SteeringSpec(layer, vector, coef=4.0, positions=positions)]
        watch = [Watch("v", layer, vector[layer])]
        graphed, eager = (
            engine.run(requests, sampling, steering=specs, watch=watch)
            for engine in (DecodeEngine(loaded, capture=True), eager_twin(loaded, capture=True))
        )
        for g, e in zip(graphed, eager, strict=True):
            assert g.answer_ids == e.answer_ids
            for kind in ("prompt_last", "prompt_avg", "response_avg"):
                torch.testing.assert_close(g.activations[kind], e.activations[kind])
            torch.testing.assert_close(g.projections, e.projections)


def test_rows_steered_by_their_own_specs_graphed_equal_eager(big_model_dir: Path) -> None:
    """A sweep's settings in one queue under CUDA graphs (``DecodeRequest.steer``): rows
    steered by different specs at two layers, or by none, with slots refilled, give the
    eager twin's tokens and captures, and the settings' answers differ."""
    loaded = load_model(str(big_model_dir))
    torch.manual_seed(4)
    layer = int(_layer(big_model_dir))
    vector = torch.randn(loaded.num_layers + 1, loaded.hidden_size)
    specs = [
        SteeringSpec(layer, vector, coef=coef, positions="response") for coef in (-6.0, 6.0)
    ] + [SteeringSpec(8, vector, coef=6.0, positions="response")]
    prompt = prompt_ids(loaded.tokenizer, None, "Should I quit my job and travel?")
    requests = [DecodeRequest(prompt, seed=0, steer=steer) for steer in ((), (0,), (1,), (2,))]
    requests += [DecodeRequest(prompt, seed=1, steer=steer) for steer in ((1,), (), (0, 2))]
    sampling = SamplingConfig(max_new_tokens=32, temperature=1.0, ignore_eos=True)
    graphed, eager = (
        engine.run(requests, sampling, slots=3, steering=specs)
        for engine in (DecodeEngine(loaded, capture=True), eager_twin(loaded, capture=True))
    )
    for g, e in zip(graphed, eager, strict=True):
        assert g.answer_ids == e.answer_ids
        for kind in ("prompt_last", "prompt_avg", "response_avg"):
            torch.testing.assert_close(g.activations[kind], e.activations[kind])
    assert len({tuple(g.answer_ids) for g in graphed[:4]}) == 4


def test_a_repeated_run_captures_at_once_and_gives_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run repeated on one engine captures its step without an eager warm-up step (its
    kind ran eagerly already, on the engine's one side stream) and gives the first run's
    rows, which equal the eager twin's (fp32)."""
    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")), dtype="float32")
    engine = DecodeEngine(loaded, capture=True)
    warmups: list[int] = []
    real = engine._graphed

    def recording(step_fn, warmup: int, on_warmed=None):  # noqa: ANN001, ANN202
        warmups.append(warmup)
        return real(step_fn, warmup, on_warmed)

    monkeypatch.setattr(engine, "_graphed", recording)
    questions = ["Hi there", "What should I cook tonight? I have rice and beans."]
    requests = [
        DecodeRequest(prompt_ids(loaded.tokenizer, None, q), seed=i)
        for i, q in enumerate(questions)
    ]
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    first = engine.run(requests, sampling)
    again = engine.run(requests, sampling)
    assert warmups == [1, 0]
    eager = eager_twin(loaded, capture=True).run(requests, sampling)
    for a, b, e in zip(first, again, eager, strict=True):
        assert a.answer_ids == b.answer_ids == e.answer_ids
        torch.testing.assert_close(b.activations["response_avg"], a.activations["response_avg"])
        torch.testing.assert_close(b.activations["response_avg"], e.activations["response_avg"])


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_each_family_on_cuda(family: str, tmp_path: Path) -> None:
    """fp32 on the GPU: greedy tokens equal HF ``generate``, with the default attention and
    with ``--deterministic``'s; the graphed steered step equals the eager one; a local
    judge's batch (the runner's fused forwards, sliding windows in its tree mask) equals
    plain forwards over prompt + candidate; extraction's batched forward equals a
    teacher-forced forward per row."""
    folder = build_tiny_family(tmp_path / family, family)
    loaded = load_model(str(folder), dtype="float32")
    assert loaded.device.type == "cuda"
    questions = ["Hi there", "What should I cook tonight? I have rice and beans."]
    requests = [
        DecodeRequest(prompt_ids(loaded.tokenizer, "You are a helpful assistant.", q), seed=i)
        for i, q in enumerate(questions)
    ]
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    engine = DecodeEngine(loaded, capture=True)
    assert engine.backend == "static" and engine.cuda_graphs
    results = engine.run(requests, greedy)
    for request, result in zip(requests, results, strict=True):
        with torch.inference_mode():
            ids = torch.tensor([list(request.prompt_ids)], device="cuda")
            ref = loaded.model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert ref[0, ids.shape[1] :].tolist() == result.answer_ids
    deterministic = DecodeEngine(loaded, capture=True, deterministic=True).run(requests, greedy)
    assert [r.answer_ids for r in deterministic] == [r.answer_ids for r in results]
    torch.manual_seed(2)
    vector = torch.randn(loaded.num_layers + 1, loaded.hidden_size)
    specs = [SteeringSpec(2, vector, coef=2.0, positions="all")]
    sampled = SamplingConfig(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    graphed = engine.run(requests, sampled, steering=specs)
    eager = eager_twin(loaded, capture=True).run(requests, sampled, steering=specs)
    for g, e in zip(graphed, eager, strict=True):
        assert g.answer_ids == e.answer_ids
        torch.testing.assert_close(g.activations["response_avg"], e.activations["response_avg"])
    judge = LocalJudge(str(folder), loaded=loaded)
    assert judge._runner is not None
    prompts = [
        "Rate the answer from 0 to 100. Question: hi there. Answer: rest, I will decide.",
        "Rate the answer from 0 to 100. Question: what now? Answer: I know better than you.",
    ]
    batched = judge.candidate_logprobs_batch(prompts)
    for prompt, row in zip(prompts, batched, strict=True):
        for index in (0, 42, 100, 101):
            assert row[index] == pytest.approx(
                judge.candidate_logprob_alone(prompt, index), abs=1e-3
            )
    # A deterministic engine's switch on the same model serves the judge meanwhile: its
    # many-query forward keeps SDPA (the repeatable kernel is for decode steps).
    with StaticRunner(loaded.model, deterministic=True).attention():
        overlapped = judge.candidate_logprobs_batch(prompts)
    torch.testing.assert_close(torch.tensor(overlapped), torch.tensor(batched))
    rows = [(list(r.prompt_ids), list(r.prompt_ids[2 : 9 + 5 * i])) for i, r in enumerate(requests)]
    means = ForwardMeans(loaded).batch_means(rows)
    for index, row in enumerate(rows):
        for kind, value in teacher_forced_means(loaded.model, *row).items():
            torch.testing.assert_close(means[kind][index], value, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "deterministic, marked",
    [(False, True), (True, True), (False, False)],
    ids=["default", "deterministic", "recompiling"],
)
def test_the_compiled_step_across_attended_lengths(
    tmp_path: Path, monkeypatch, deterministic: bool, marked: bool
) -> None:
    """The opt-in compiled step (each layer compiled) under CUDA graphs while the attended
    length grows equals the plain graphed step, with steering, capture and a watch on
    (fp32, tiny Llama); one compile serves every length, with the default attention and
    with ``--deterministic``'s. ``recompiling``: without the dynamic marks a new length
    needs a compile of its own, which must happen outside any capture (a compile inside
    one invalidates it): the capture refuses it and that step runs eagerly."""
    from torch._dynamo.utils import counters

    import pipeline.engine as engine_module
    import pipeline.runners as runners_module

    if not marked:
        monkeypatch.setattr(runners_module, "_mark_dynamic_step", lambda *a, **k: None)
    monkeypatch.setattr(engine_module, "ATTENTION_ROUND", 32)
    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")), dtype="float32")
    requests = [
        DecodeRequest(prompt_ids(loaded.tokenizer, None, q), seed=i)
        for i, q in enumerate(["Hi there", "What should I cook tonight? I have rice."])
    ]
    torch.manual_seed(3)
    vector = torch.randn(loaded.num_layers + 1, loaded.hidden_size)
    specs = [SteeringSpec(2, vector, coef=2.0, positions="all")]
    watch = [Watch("v", 2, vector[2])]
    sampling = SamplingConfig(max_new_tokens=100, temperature=1.0, ignore_eos=True)
    lengths: set[int] = set()
    real = DecodeEngine._make_step

    def recording(self, state, sampling):
        step = real(self, state, sampling)
        return lambda used: lengths.add(used) or step(used)

    monkeypatch.setattr(DecodeEngine, "_make_step", recording)
    plain = DecodeEngine(loaded, capture=True).run(requests, sampling, steering=specs, watch=watch)
    torch._dynamo.reset()
    counters.clear()
    compiled = DecodeEngine(loaded, capture=True, compiled=True, deterministic=deterministic).run(
        requests, sampling, steering=specs, watch=watch
    )
    assert len(lengths) >= 3  # the step attended over several lengths
    if marked:
        assert counters["stats"]["unique_graphs"] == 1  # one compile served every length
    else:
        assert counters["stats"]["unique_graphs"] >= 2  # a length compiled, not in a capture
    for p, c in zip(plain, compiled, strict=True):
        assert p.answer_ids == c.answer_ids
        tol = {"rtol": 1e-4, "atol": 1e-4}
        torch.testing.assert_close(
            c.activations["response_avg"], p.activations["response_avg"], **tol
        )
        torch.testing.assert_close(c.projections, p.projections, **tol)


def test_deterministic_runs_give_the_same_tokens_again(big_model_dir: Path) -> None:
    """``--deterministic``: a rerun repeats bit for bit, 96 rows on the 8B shape, greedy and
    sampled, twice on one engine. SDPA's own pick for the decode step's grouped attention
    (cuDNN; torch 2.11, H200), which the default step keeps for its speed, gave other
    results run to run from batch 64: 0 of 64 rows repeated."""
    loaded = load_model(str(big_model_dir))
    questions = [f"Question {i}: what would you do on day {i} of a trip?" for i in range(96)]
    requests = [
        DecodeRequest(prompt_ids(loaded.tokenizer, None, q), seed=i)
        for i, q in enumerate(questions)
    ]
    engine = DecodeEngine(loaded, capture=True, deterministic=True)
    for temperature in (0.0, 1.0):
        sampling = SamplingConfig(max_new_tokens=48, temperature=temperature, ignore_eos=True)
        first, again = (engine.run(requests, sampling) for _ in range(2))
        assert [r.answer_ids for r in again] == [r.answer_ids for r in first]
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a.activations["response_avg"], b.activations["response_avg"])


def test_continuous_batching_under_cuda_graphs(big_model_dir: Path) -> None:
    """Slots refilled between graph replays (the refill's prefill writes into the captured
    cache and state in place): the graphed run equals the eager run, row by row, and every
    request comes back once."""
    loaded = load_model(str(big_model_dir))
    questions = [f"Question {i}: how should I plan day {i} of my week?" for i in range(12)]
    requests = [
        DecodeRequest(prompt_ids(loaded.tokenizer, None, q), seed=i)
        for i, q in enumerate(questions)
    ]
    sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
    probe = DecodeEngine(loaded, capture=False).run(requests, sampling)
    counts: dict[int, int] = {}
    for r in probe:
        for t in r.answer_ids[:40]:
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=counts.get)  # ends rows at different steps
    runs = {}
    for graphs in (True, False):
        engine = DecodeEngine(loaded, capture=True) if graphs else eager_twin(loaded, capture=True)
        engine.stop_ids = torch.tensor([stop], device=engine.device)
        runs[graphs] = dict(engine.stream(requests, sampling, slots=4, check_every=4))
    assert sorted(runs[True]) == list(range(12))
    for index in range(12):
        g, e = runs[True][index], runs[False][index]
        assert g.answer_ids == e.answer_ids
        torch.testing.assert_close(g.activations["response_avg"], e.activations["response_avg"])


def test_generation_across_two_engines_on_one_gpu(big_model_dir: Path, tmp_path: Path) -> None:
    """``--gpus 0,0``: two engines on GPU 0 (a model each), stepping in two threads of this
    process from one queue, this thread writing: every planned row once, with its prompt,
    answer and captured means, and the job saying what the engines chose.
    (Tokens are not compared with a one-process run: in bf16 a row's neighbours in the batch
    change its rounding, and a random model's near-ties then change tokens.)"""
    from pipeline.generate import GenerateParams, find_or_create_job, plan_rows
    from pipeline.jobs import run_job
    from vectors.activations import load_consolidated

    with Store(tmp_path / "two.db") as store:
        params = GenerateParams(
            side="pos", model=str(big_model_dir), n_per_question=1, max_new_tokens=32,
            batch_size=8, gpus="0,0",
        )  # fmt: skip
        job_id = find_or_create_job(store, TRAIT, params)
        run_job(store.path, job_id)
        job = store.get_job(job_id)
        assert (job.status, job.done) == ("done", 20)
        assert job.stats["slots"] == {"cuda:0": "8 slots", "cuda:0#2": "8 slots"}
        rows = store.responses(job=job_id)
        assert sorted(r.key for r in rows) == sorted(plan_rows("extract", 1, False))
        assert all(r.answer_ids and r.prompt_ids for r in rows)
        acts = load_consolidated(Path(job.stats["activations"]))
        assert sorted(acts["response_ids"].tolist()) == sorted(r.id for r in rows)
        assert torch.isfinite(acts["response_avg"]).all()


def _threads_against_one_engine(
    folder: Path, devices: list[str], *, compiled: bool = False, slots: list[int] | None = None
) -> None:
    """An engine a device (a model each), graphed, in threads over one queue, against one
    plain engine on the first device: every row once, each with the tokens and captured
    means one engine gives it (fp32), and every engine taking some of the rows."""
    from pipeline.engine_threads import stream_on_engines

    models = [load_model(str(folder), device=devices[0], dtype="float32")]
    for device in devices[1:]:
        models.append(load_model(str(folder), device=device, dtype="float32", reuse=False))
    questions = [f"Question {i}: how should I plan day {i} of my week?" for i in range(24)]
    requests = [
        DecodeRequest(prompt_ids(models[0].tokenizer, None, q), seed=i)
        for i, q in enumerate(questions)
    ]
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0)
    alone = dict(DecodeEngine(models[0]).stream(requests, sampling, slots=4, check_every=4))
    if compiled:
        torch._dynamo.reset()  # nothing compiled yet: the engines start by compiling
    engines = [DecodeEngine(m, compiled=compiled) for m in models]
    taken = [0] * len(engines)

    def counting(number: int, stream):
        def counted(*args, **kwargs):
            for index, result in stream(*args, **kwargs):
                taken[number] += 1
                yield index, result

        return counted

    for number, engine in enumerate(engines):
        engine.stream = counting(number, engine.stream)
    slots = slots or [4] * len(engines)
    together = dict(stream_on_engines(engines, slots, requests, sampling))
    assert sorted(together) == list(range(len(requests)))
    assert sum(taken) == len(requests) and all(taken), taken
    for index, result in together.items():
        assert result.answer_ids == alone[index].answer_ids
        torch.testing.assert_close(
            result.activations["response_avg"], alone[index].activations["response_avg"],
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip


def test_two_engines_in_threads_on_one_gpu_equal_one_engine(tmp_path: Path) -> None:
    """Two graphed engines on GPU 0 capturing and replaying at once from two threads."""
    _threads_against_one_engine(build_tiny_family(tmp_path / "llama", "llama"), ["cuda:0"] * 2)


def test_compiled_engines_in_threads_on_one_gpu_equal_one_engine(tmp_path: Path) -> None:
    """``--compile`` with two engines on GPU 0: different slots, so each compiles a variant
    of its own while the other runs (a compile in one thread made a compiled call in
    another raise under torch 2.11 until compiled calls were serialised)."""
    folder = build_tiny_family(tmp_path / "llama", "llama")
    _threads_against_one_engine(folder, ["cuda:0"] * 2, compiled=True, slots=[5, 3])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_compiled_engines_on_the_second_gpu_in_threads(tmp_path: Path) -> None:
    """``--gpus 0,1 --compile``: an engine a GPU, each compiling for its own device."""
    folder = build_tiny_family(tmp_path / "llama", "llama")
    _threads_against_one_engine(folder, ["cuda:0", "cuda:1"], compiled=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_one_queue_over_the_second_gpu_in_threads(tmp_path: Path) -> None:
    """``--gpus 0,1`` for generation: an engine on each GPU, in threads, one queue."""
    _threads_against_one_engine(
        build_tiny_family(tmp_path / "llama", "llama"), ["cuda:0", "cuda:1"]
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_a_job_over_the_second_gpu_in_threads(big_model_dir: Path, tmp_path: Path) -> None:
    """``generate --gpus 0,1`` on the 8B shape: every planned row once, written by this
    process, with the slots each GPU's engine chose from its free memory."""
    from pipeline.generate import GenerateParams, find_or_create_job, plan_rows
    from pipeline.jobs import run_job

    with Store(tmp_path / "two-gpus.db") as store:
        params = GenerateParams(
            side="pos", model=str(big_model_dir), n_per_question=2, max_new_tokens=32,
            gpus="0,1",
        )  # fmt: skip
        job_id = find_or_create_job(store, TRAIT, params)
        run_job(store.path, job_id)
        job = store.get_job(job_id)
        assert (job.status, job.done) == ("done", 40)
        assert sorted(job.stats["slots"]) == ["cuda:0", "cuda:1"]
        rows = store.responses(job=job_id)
        assert sorted(r.key for r in rows) == sorted(plan_rows("extract", 2, False))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_the_graphed_step_on_a_second_gpu(tmp_path: Path) -> None:
    """A model on cuda:1 while cuda:0 is current (as in a worker before it picks its GPU):
    the graph captures on the model's device and equals the eager step."""
    folder = build_tiny_family(tmp_path / "llama", "llama")
    loaded = load_model(str(folder), device="cuda:1", dtype="float32")
    requests = [DecodeRequest(prompt_ids(loaded.tokenizer, None, "Hi there"), seed=0)]
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    with torch.cuda.device(0):
        graphed = DecodeEngine(loaded).run(requests, sampling)
        eager = eager_twin(loaded).run(requests, sampling)
    assert graphed[0].answer_ids == eager[0].answer_ids


def _copy_equals_the_loaded_model(folder: Path, target: str) -> None:
    """``models.copy_to_device`` from GPU 0 to ``target``: every tensor on the target, none
    shared with the source, the same logits (fp32), the device map rewritten."""
    from pipeline.models import copy_to_device

    loaded = load_model(str(folder), device="cuda:0", dtype="float32")
    copied = copy_to_device(loaded, target)
    assert copied.device == torch.device(target)
    tensors = [*copied.model.parameters(), *copied.model.buffers()]
    assert {t.device for t in tensors} == {torch.device(target)}
    originals = {t.data_ptr() for t in loaded.model.parameters()}
    assert not originals & {t.data_ptr() for t in copied.model.parameters()}
    if getattr(copied.model, "hf_device_map", None) is not None:
        assert copied.model.hf_device_map == {"": torch.device(target).index}
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        want = loaded.model(ids.to("cuda:0")).logits.cpu()
        got = copied.model(ids.to(target)).logits.cpu()
    torch.testing.assert_close(got, want)


def test_a_model_copy_on_the_same_gpu(tmp_path: Path) -> None:
    _copy_equals_the_loaded_model(build_tiny_family(tmp_path / "llama", "llama"), "cuda:0")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_a_model_copy_on_the_second_gpu(tmp_path: Path) -> None:
    _copy_equals_the_loaded_model(build_tiny_family(tmp_path / "llama", "llama"), "cuda:1")
