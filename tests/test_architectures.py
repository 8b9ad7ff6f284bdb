"""Exactness of the decode engine on every architecture family it runs on its static-cache
runner, against transformers' own code, in fp32 on the CPU: a tiny random model per family
(4 layers, sliding windows shorter than the prompts, random norm weights), padded batches.

- greedy tokens equal HF ``generate`` greedy;
- captured means equal a teacher-forced forward;
- steered generation (each ``positions`` value): tokens, captures and live watch equal
  between the static and the HF runner, and equal a teacher-forced forward under
  ``steered()`` at the positions the method touches.
The GPU acceptance suite (tests/gpu/) runs the same families on CUDA, graphed and eager.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from tiny_model import FAMILY_CONFIGS, WINDOW, build_tiny_family, teacher_forced_states

from pipeline.chat import prompt_ids
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig, Watch
from pipeline.models import load_model
from pipeline.runners import TESTED_FAMILIES
from vectors.steering import SteeringSpec

QUESTIONS = [
    "Hi there",
    "What should I cook tonight? I have rice, beans and a tired mind.",
    "Is it fine to skip breakfast every single day of the week?",
]
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = build_tiny_family(tmp_path_factory.mktemp(request.param), request.param)
    loaded = load_model(str(folder))
    assert loaded.model.config.model_type == request.param
    return loaded


def _requests(loaded) -> list[DecodeRequest]:
    prompts = [prompt_ids(loaded.tokenizer, "You are a helpful assistant.", q) for q in QUESTIONS]
    assert min(len(p) for p in prompts) > 2 * WINDOW  # the window matters
    return [DecodeRequest(p, seed=i) for i, p in enumerate(prompts)]


def test_every_family_is_tested_and_takes_the_static_runner(family) -> None:
    assert set(FAMILY_CONFIGS) <= set(TESTED_FAMILIES)
    engine = DecodeEngine(family)
    assert engine.backend == "static" and engine.notice is None


def test_greedy_tokens_equal_hf_generate(family) -> None:
    requests = _requests(family)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    results = DecodeEngine(family, capture=False).run(requests, sampling)
    for request, result in zip(requests, results, strict=True):
        with torch.inference_mode():
            ref = family.model.generate(
                torch.tensor([list(request.prompt_ids)]),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
            )
        assert ref[0, len(request.prompt_ids) :].tolist() == result.answer_ids


def test_capture_equals_a_teacher_forced_forward(family) -> None:
    requests = _requests(family)
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    results = DecodeEngine(family, capture=True).run(requests, sampling)
    for request, result in zip(requests, results, strict=True):
        prompt = list(request.prompt_ids)
        states = teacher_forced_states(family.model, prompt, result.answer_ids)
        n = len(prompt)
        torch.testing.assert_close(result.activations["prompt_last"], states[:, n - 1], **TOL)
        torch.testing.assert_close(result.activations["prompt_avg"], states[:, :n].mean(1), **TOL)
        torch.testing.assert_close(result.activations["response_avg"], states[:, n:].mean(1), **TOL)


@pytest.mark.parametrize("positions", ["response", "prompt", "all"])
def test_steering_is_the_same_on_both_runners_and_a_teacher_forced_forward(
    family, positions: str
) -> None:
    torch.manual_seed(5)
    layer = 2
    vector = torch.randn(family.num_layers + 1, family.hidden_size)
    vector[layer] *= 4 / vector[layer].norm()
    spec = SteeringSpec(layer, vector, coef=2.0, positions=positions)
    requests = _requests(family)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    watch = [Watch("v", layer, vector[layer])]
    plain = DecodeEngine(family, capture=True).run(requests, sampling)
    by_runner = {
        backend: DecodeEngine(family, backend=backend, capture=True).run(
            requests, sampling, steering=[spec], watch=watch
        )
        for backend in ("static", "hf")
    }
    assert any(
        s.answer_ids != p.answer_ids for s, p in zip(by_runner["static"], plain, strict=True)
    ), "steering changed no answer: the test lost its point"
    unit = vector[layer] / vector[layer].norm()
    for row, request in enumerate(requests):
        static, hf = by_runner["static"][row], by_runner["hf"][row]
        assert static.answer_ids == hf.answer_ids
        for kind in ("prompt_last", "prompt_avg", "response_avg"):
            torch.testing.assert_close(static.activations[kind], hf.activations[kind], **TOL)
        torch.testing.assert_close(static.projections, hf.projections, **TOL)
        prompt = list(request.prompt_ids)
        n = len(prompt)
        states = teacher_forced_states(family.model, prompt, static.answer_ids, [spec])
        torch.testing.assert_close(static.activations["prompt_last"], states[:, n - 1], **TOL)
        torch.testing.assert_close(static.activations["prompt_avg"], states[:, :n].mean(1), **TOL)
        torch.testing.assert_close(static.activations["response_avg"], states[:, n:].mean(1), **TOL)
        torch.testing.assert_close(static.projections[:, 0], states[layer, n:] @ unit, **TOL)


def test_prefill_logits_equal_the_model_forward(family) -> None:
    """Logits, not only their argmax: soft-capping and embedding scales leave greedy tokens
    alone but not the sampling distribution."""
    from pipeline.runners import StaticRunner

    requests = _requests(family)
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), family.tokenizer.pad_token_id)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for row, r in enumerate(requests):
        ids[row, width - len(r.prompt_ids) :] = torch.tensor(list(r.prompt_ids))
        valid[row, width - len(r.prompt_ids) :] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    runner = StaticRunner(family.model)
    runner.allocate(len(requests), width + 8)
    with torch.inference_mode():
        ours = runner.prefill(ids, valid, positions, lambda _i, h: h, torch.arange(len(requests)))
        for row, r in enumerate(requests):
            theirs = family.model(torch.tensor([list(r.prompt_ids)])).logits[0, -1]
            torch.testing.assert_close(ours[row], theirs, **TOL)


def test_continuous_batching_with_sliding_windows(family) -> None:
    """Refilled slots start at their own cache column: windows and positions follow each
    row, so two slots for three requests give the rows of three slots."""
    requests = _requests(family)
    sampling = SamplingConfig(max_new_tokens=9, temperature=1.0)
    engine = DecodeEngine(family, capture=True)
    together = engine.run(requests, sampling)
    # One request is held back until a slot frees: it starts at another column.
    staggered = engine.run(
        [requests[0], requests[2], requests[1]], sampling, slots=2, check_every=3
    )
    for a, b in zip(together, [staggered[0], staggered[2], staggered[1]], strict=True):
        assert a.answer_ids == b.answer_ids
        torch.testing.assert_close(
            a.activations["response_avg"], b.activations["response_avg"], **TOL
        )


def test_whole_cache_steps_equal_the_rounded_ones(family, monkeypatch) -> None:
    """Where the decode-attention kernel runs (CUDA), each step attends over the whole cache
    under a boolean mask instead of the columns in use rounded up. Here the mode is forced
    on the CPU, where SDPA (or Gemma-2's soft-capped matmuls) reads that mask: tokens,
    captures and the live watch equal the rounded steps', with refilled slots, sliding
    windows and steering."""
    torch.manual_seed(3)
    layer = 2
    vector = torch.randn(family.num_layers + 1, family.hidden_size)
    vector[layer] *= 3 / vector[layer].norm()
    spec = SteeringSpec(layer, vector, coef=1.5, positions="all")
    watch = [Watch("v", layer, vector[layer])]
    requests = _requests(family)
    order = [requests[0], requests[2], requests[1]]
    sampling = SamplingConfig(max_new_tokens=9, temperature=1.0, ignore_eos=True)
    # Rounded steps over several lengths, each short of the cache.
    monkeypatch.setattr("pipeline.engine.ATTENTION_ROUND", 8)

    def run(whole: bool) -> tuple[list, set[int]]:
        engine = DecodeEngine(family, capture=True)
        # The CPU engine steps eagerly, so it takes rounded steps; told to, whole-cache ones.
        assert not engine.runner.reads_valid_keys_only(torch.device("cpu"))
        engine.runner.valid_keys_only = whole
        attended: set[int] = set()
        decode = engine.runner.decode

        def recorded(tokens, positions, column, key_valid, hook):
            attended.add(key_valid.shape[1])
            return decode(tokens, positions, column, key_valid, hook)

        engine.runner.decode = recorded
        results = engine.run(order, sampling, slots=2, check_every=3, steering=[spec], watch=watch)
        return results, attended

    rounded, rounded_lengths = run(False)
    whole, whole_lengths = run(True)
    assert len(rounded_lengths) > 1 and len(whole_lengths) == 1
    assert max(whole_lengths) > max(rounded_lengths)
    for a, b in zip(rounded, whole, strict=True):
        assert a.answer_ids == b.answer_ids
        for kind in ("prompt_last", "prompt_avg", "response_avg"):
            torch.testing.assert_close(a.activations[kind], b.activations[kind], **TOL)
        torch.testing.assert_close(a.projections, b.projections, **TOL)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")
@pytest.mark.parametrize("name", TESTED_FAMILIES)
def test_compiled_step_equals_the_uncompiled_one(name: str, tmp_path) -> None:
    """The decode step with its layers torch.compile'd (opt-in, ``--compile``) against the
    plain one, per family, with steering, capture and watch on: equal tokens, equal states
    (fp32)."""
    loaded = load_model(str(build_tiny_family(tmp_path / name, name)))
    torch.manual_seed(7)
    layer = 2
    vector = torch.randn(loaded.num_layers + 1, loaded.hidden_size)
    specs = [SteeringSpec(layer, vector, coef=2.0, positions="all")]
    watch = [Watch("v", layer, vector[layer])]
    requests = _requests(loaded)
    for temperature in (0.0, 1.0):
        sampling = SamplingConfig(max_new_tokens=10, temperature=temperature, ignore_eos=True)
        plain, compiled = (
            DecodeEngine(loaded, capture=True, compiled=choice).run(
                requests, sampling, steering=specs, watch=watch
            )
            for choice in (False, True)
        )
        for p, c in zip(plain, compiled, strict=True):
            assert p.answer_ids == c.answer_ids
            for kind in ("prompt_last", "prompt_avg", "response_avg"):
                torch.testing.assert_close(c.activations[kind], p.activations[kind], **TOL)
            torch.testing.assert_close(c.projections, p.projections, **TOL)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")
def test_one_compiled_layer_serves_every_layer(tmp_path) -> None:
    """Compiling layer by layer traces one layer, not each: the layers differ only in their
    tensors (each gets its own cache slice, so no layer index reaches the compiled code)."""
    from torch._dynamo.utils import counters

    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")))
    assert loaded.num_layers > 1
    torch._dynamo.reset()
    counters.clear()
    sampling = SamplingConfig(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    DecodeEngine(loaded, capture=True, compiled=True).run(_requests(loaded), sampling)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")
# gemma2: windowed masks, soft-capping; deterministic: the additive decode mask
@pytest.mark.parametrize(
    ("name", "deterministic"), [("llama", False), ("gemma2", False), ("llama", True)]
)
def test_one_compile_serves_every_length_batch_and_session(
    name: str, deterministic: bool, tmp_path, monkeypatch
):
    """Left to itself, torch.compile compiled the layer again for each new attended length,
    each compacted batch, each session's cache and each flip of a guarded relation (seven
    compiles in one CPU run; seconds each for an 8B layer on a GPU). The step marks those
    sizes dynamic, attends to the cache's end without ever holding all of it, and never
    compacts below two rows: one compile serves sessions of other slots and cache lengths
    across every attended length up to the cache's end, and compactions down to a late row
    alone; a batch of one compiles once more, and only once. Tokens and captures equal the
    uncompiled engine's."""
    from torch._dynamo.utils import counters

    import pipeline.engine as engine_module

    # A new attended length every 8 columns, and the last of them the cache's whole length.
    monkeypatch.setattr(engine_module, "ATTENTION_ROUND", 8)
    monkeypatch.setattr(engine_module, "CACHE_ROUND", 8)
    loaded = load_model(str(build_tiny_family(tmp_path / name, name)))
    requests = _requests(loaded) * 2
    torch._dynamo.reset()
    counters.clear()
    compiled = DecodeEngine(loaded, capture=True, compiled=True, deterministic=deterministic)
    batches: list[int] = []
    compact = compiled._compact
    monkeypatch.setattr(
        compiled, "_compact", lambda state, keep: (batches.append(len(keep)), compact(state, keep))
    )
    plain = DecodeEngine(loaded, capture=True)

    def run_both(rows: list[DecodeRequest], sampling: SamplingConfig, slots: int) -> None:
        ours = compiled.run(rows, sampling, slots=slots, check_every=4)
        reference = plain.run(rows, sampling, slots=slots, check_every=4)
        for c, p in zip(ours, reference, strict=True):
            assert c.answer_ids == p.answer_ids
            torch.testing.assert_close(
                c.activations["response_avg"], p.activations["response_avg"], **TOL
            )

    # Six rows in four slots: two start late, then the batch compacts to them.
    run_both(requests, SamplingConfig(max_new_tokens=20, temperature=1.0, ignore_eos=True), 4)
    # Five rows in four slots: the fifth starts late and finishes alone, in a batch of two.
    run_both(requests[:5], SamplingConfig(max_new_tokens=9, temperature=0.0, ignore_eos=True), 4)
    assert batches and min(batches) == 2  # compacted, never to one row
    assert counters["stats"]["unique_graphs"] == 1
    run_both(requests[:1], SamplingConfig(max_new_tokens=30, temperature=0.0, ignore_eos=True), 1)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")
def test_a_compiled_step_never_compiles_inside_a_capture(tmp_path, monkeypatch) -> None:
    """Compiling inside a CUDA graph capture invalidates it (the compiler's autotuning
    synchronises). During a capture, a compiled layer that needs another compile raises
    ``RecompileError`` before it runs anything (the engine then runs that step eagerly and
    captures its next call: tests/gpu), one that needs none runs, and the setting ends with
    the step."""
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.exc import RecompileError

    import pipeline.runners as runners_module

    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")))
    torch._dynamo.reset()
    engine = DecodeEngine(loaded, capture=True, compiled=True)
    sampling = SamplingConfig(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    pair, single = _requests(loaded)[:2], _requests(loaded)[:1]
    reference = engine.run(pair, sampling)  # compiles for every batch of two rows or more
    monkeypatch.setattr(runners_module, "_capturing", lambda: True)
    again = engine.run(pair, sampling)
    assert [r.answer_ids for r in again] == [r.answer_ids for r in reference]
    with pytest.raises(RecompileError):
        engine.run(single, sampling)  # a batch of one is a compile of its own
    assert dynamo_config.error_on_recompile is False
    monkeypatch.setattr(runners_module, "_capturing", lambda: False)
    assert len(engine.run(single, sampling)[0].answer_ids) == 4  # outside a capture: compiles


def test_layers_indexed_out_of_place_do_not_take_the_static_runner(tmp_path) -> None:
    """The prefill finds a layer's cache by its attention's ``layer_idx``, a decode step by
    the layer's place: a model where they differ must not run on the static runner."""
    from pipeline.runners import StaticRunner

    loaded = load_model(str(build_tiny_family(tmp_path / "llama", "llama")))
    assert StaticRunner.fits(loaded.model)
    attention = loaded.model.model.layers[1].self_attn
    attention.layer_idx = 0
    assert not StaticRunner.fits(loaded.model)


def test_a_compiled_step_is_opt_in_and_the_hf_runner_runs_uncompiled(
    family, caplog: pytest.LogCaptureFixture
) -> None:
    assert DecodeEngine(family).compiled is False  # opt-in
    with caplog.at_level("WARNING", logger="persona.engine"):
        engine = DecodeEngine(family, backend="hf", compiled=True)
    assert engine.compiled is False
    notice = f"--compile: {family.model.config.model_type} runs on the HF runner, uncompiled"
    assert notice in caplog.text


def test_every_norm_runs_fused_and_equals_its_own_forward(family) -> None:
    """The static runner swaps every RMSNorm of each family for one ``F.rms_norm`` kernel
    of the same formula: all of them are recognised (a renamed class would fall back to the
    slow path silently), each equals its class's forward in fp32 and in bf16 (where the
    formula decides what is rounded when), and the swap ends with the runner's work."""
    from pipeline.runners import StaticRunner, fused_norm_forward

    runner = StaticRunner(family.model)
    norms = [m for m in family.model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and [m for m, _f in runner._norms] == norms
    gen = torch.Generator().manual_seed(0)
    for module in norms:
        x = torch.randn(3, 5, module.weight.shape[-1], generator=gen) * 4
        fused = fused_norm_forward(module)
        torch.testing.assert_close(fused(x), module(x), rtol=1e-6, atol=1e-6)
        half = copy.deepcopy(module).to(torch.bfloat16)
        assert torch.equal(fused_norm_forward(half)(x.bfloat16()), half(x.bfloat16()))
    with runner.attention():
        assert all(m.forward is f for m, f in runner._norms)
    assert all("forward" not in vars(m) for m in norms)


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_every_projection_group_runs_as_one_matmul_over_the_same_weights(
    name: str, tmp_path
) -> None:
    """q/k/v and gate/up of every layer (Phi-3 has them fused already) become views into one
    tensor per group: no parameter memory added, the model's own forward unchanged (a fresh
    model, so nothing fused it before). Inside the runner's work the group's first projection
    runs the fused product and the others hand back its slices; outside, every projection is
    the module's own again. A probe (``fuse=False``) leaves the weights as loaded."""
    from pipeline.fused_projections import FUSED_GROUPS
    from pipeline.runners import StaticRunner, _static_matches_hf

    model = load_model(str(build_tiny_family(tmp_path / name, name))).model
    groups = [
        [getattr(parent, name) for name in names]
        for parent in model.modules()
        for names in FUSED_GROUPS
        if all(hasattr(parent, name) for name in names)
    ]
    if model.config.model_type == "phi3":
        assert not groups
    else:
        assert len(groups) == 2 * model.config.num_hidden_layers

    def storage_bytes() -> int:
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage() for p in model.parameters()}
        return sum(s.nbytes() for s in storages.values())

    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.inference_mode():
        before, memory = model(input_ids=ids).logits, storage_bytes()
    pointers = [p.data_ptr() for p in model.parameters()]
    assert _static_matches_hf(model)
    assert [p.data_ptr() for p in model.parameters()] == pointers  # the probe fused nothing
    runner = StaticRunner(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    assert storage_bytes() <= memory
    assert [g.modules for g in runner._groups] == groups
    pointers = [p.data_ptr() for p in model.parameters()]
    second = StaticRunner(model)  # finds them fused: nothing moves
    assert [g.modules for g in second._groups] == groups
    assert [p.data_ptr() for p in model.parameters()] == pointers
    gen = torch.Generator().manual_seed(1)
    with runner.attention(), torch.inference_mode():
        for group in groups:
            x = torch.randn(2, 3, group[0].in_features, generator=gen)
            outputs = [m(x) for m in group]
            storages = {o.untyped_storage().data_ptr() for o in outputs}
            assert len(storages) == 1  # slices of one product
            for module, out in zip(group, outputs, strict=True):
                own = torch.nn.functional.linear(x, module.weight, module.bias)
                torch.testing.assert_close(out, own, rtol=1e-5, atol=1e-5)
            other = torch.randn(2, 3, group[0].in_features, generator=gen)
            group[0](x)
            own = torch.nn.functional.linear(other, group[1].weight, group[1].bias)
            assert torch.equal(group[1](other), own)  # another input: its own product
    assert all("forward" not in vars(m) for group in groups for m in group)
    assert all(g.kept is None for g in runner._groups)  # nothing held past the work


def test_runners_overlap_on_one_model_and_leave_other_forwards_alone(family) -> None:
    """Two runners on one model (the monitor's old and new decode share the cached model)
    may overlap, nested or not: the switch to our attention lasts until the last one leaves,
    no error, and afterwards the model is as it was. A forward already on a norm (accelerate's
    device hook on a sharded model) is kept, inside and after; an error inside restores."""
    from pipeline.runners import ATTENTION_NAME, StaticRunner

    model = family.model
    config = model.config
    before = config._attn_implementation
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    outer, inner = StaticRunner(model), StaticRunner(model)
    with outer.attention():
        with inner.attention():
            assert all(m.forward is f for m, f in outer._norms)  # the outer's stay
        assert config._attn_implementation == ATTENTION_NAME
        assert all(m.forward is f for m, f in outer._norms)
    assert config._attn_implementation == before
    assert all("forward" not in vars(m) for m in norms)
    first, second = outer.attention(), inner.attention()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first to enter leaves first
    assert config._attn_implementation == ATTENTION_NAME  # the second still runs
    second.__exit__(None, None, None)
    assert config._attn_implementation == before
    assert all("forward" not in vars(m) for m in norms)

    hooked, calls = norms[-1], []
    own = hooked.forward

    def device_hook(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return own(x)

    hooked.forward = device_hook
    try:
        with StaticRunner(model).attention():
            assert hooked.forward is device_hook
            hooked(torch.ones(2, hooked.weight.shape[-1]))
        assert hooked.forward is device_hook and calls
    finally:
        del hooked.forward
    with pytest.raises(RuntimeError, match="inside"), outer.attention():
        raise RuntimeError("inside")
    assert config._attn_implementation == before
    assert all("forward" not in vars(m) for m in norms)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own forward"])
def test_a_local_judge_masks_each_layers_window_and_runs_the_fused_forwards(
    family, fused: bool
) -> None:
    """The local judge's batch (prompts of several lengths, their common prefix cached, the
    candidates' trie under a tree mask): each candidate's log-probability equals a plain
    forward over prompt + candidate, whose own masks apply each layer's sliding window
    (shorter than the prompts here). The batch runs on the static runner's attention and
    fused norms, or, as for a family the runner does not run, on the model's own forward
    with the same mask. Before, the tree mask let sliding layers see the whole prompt."""
    from pipeline.local_judge import LocalJudge
    from pipeline.runners import ATTENTION_NAME

    judge = LocalJudge(str(family.path), loaded=family)
    if not fused:
        judge._runner = None
    prompts = [
        "Rate the answer from 0 to 100. Question: hi there. Answer: rest, I will decide.",
        "Rate the answer from 0 to 100. Question: what should I cook tonight with rice? "
        "Answer: beans, because I know better than you what is good for you.",
    ]
    assert min(len(prompt_ids(family.tokenizer, None, p)) for p in prompts) > 2 * WINDOW
    seen: list[tuple[str, bool]] = []  # (attention, a fused norm forward installed)
    norm = family.model.model.norm  # installed with the rest on entering attention()
    attention = family.model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(
        lambda *_: seen.append((family.model.config._attn_implementation, "forward" in vars(norm)))
    )
    try:
        batched = judge.candidate_logprobs_batch(prompts)
    finally:
        handle.remove()
    # The batch's pass is the last; the prefix's ran before it, on the model's own forward.
    assert (seen[-1][0] == ATTENTION_NAME) is fused and seen[-1][1] is fused
    for prompt, row in zip(prompts, batched, strict=True):
        for index in (0, 7, 42, 99, 100, 101):
            assert row[index] == pytest.approx(
                judge.candidate_logprob_alone(prompt, index), abs=1e-4
            )


@pytest.mark.parametrize("padding", ["left", "right"])
def test_forward_means_equal_a_teacher_forced_forward(family, padding: str) -> None:
    """Extraction's batched forward (``ForwardMeans``: rows of several lengths padded to one
    width, on the static runner's attention and fused forwards with masks of its own) gives
    each row's means of a teacher-forced forward over that row alone, sliding windows
    (shorter than the rows) included, and the means after the final norm."""
    from tiny_model import teacher_forced_means

    from pipeline.response_means import ForwardMeans
    from pipeline.runners import ATTENTION_NAME

    requests = _requests(family)
    rows = [
        (list(r.prompt_ids), list(r.prompt_ids[3 : 3 + 5 + 4 * i])) for i, r in enumerate(requests)
    ]
    forward = ForwardMeans(family, padding=padding, final_norm=True)
    implementations: list[str] = []
    attention = family.model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(
        lambda *_: implementations.append(family.model.config._attn_implementation)
    )
    try:
        means = forward.batch_means(rows)
    finally:
        handle.remove()
    assert implementations == [ATTENTION_NAME]
    for index, row in enumerate(rows):
        for kind, value in teacher_forced_means(family.model, *row).items():
            torch.testing.assert_close(means[kind][index], value, **TOL)
        # The last block's output after the final norm (the original convention's row L).
        with torch.inference_mode():
            normed = family.model.model.norm(teacher_forced_states(family.model, *row)[-1])
        prompt = len(row[0])
        torch.testing.assert_close(
            means["response_avg_final"][index], normed[prompt:].mean(0), **TOL
        )
        torch.testing.assert_close(means["prompt_last_final"][index], normed[prompt - 1], **TOL)
