from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.chat import prompt_ids
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig, Watch
from pipeline.models import load_model
from pipeline.monitor import hidden_states, project_tokens
from tui.widgets.heatmap import heatmap, legend, visible
from vectors.steering import SteeringSpec, steered


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def vector(tiny) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(tiny.num_layers + 1, tiny.hidden_size)


def _prompts(tiny) -> list[list[int]]:
    questions = ["Hi", "Tell me how to [plan] a long week of work", "Why?"]
    return [prompt_ids(tiny.tokenizer, None, q) for q in questions]


def test_projections_equal_a_manual_computation(tiny, vector) -> None:
    prompt, answer = _prompts(tiny)[1], [40, 41, 42, 43]
    proj = project_tokens(tiny, prompt, answer, {"v": vector}, [1, 3])
    with torch.inference_mode():
        out = tiny.model(torch.tensor([prompt + answer]), output_hidden_states=True)
    h1 = out.hidden_states[1][0]
    expected = h1 @ vector[1] / vector[1].norm()
    torch.testing.assert_close(proj.values[:, 0, 0], expected, rtol=1e-5, atol=1e-5)
    raw_last = hidden_states(tiny, prompt + answer, [3])[:, 0]
    torch.testing.assert_close(proj.values[:, 0, 1], raw_last @ vector[3] / vector[3].norm())
    assert proj.response_average().shape == (1, 2)
    torch.testing.assert_close(proj.response_average()[0, 0], expected[len(prompt) :].mean())


def test_coef_zero_is_identity_and_nonzero_changes_logits(tiny, vector) -> None:
    ids = torch.tensor([_prompts(tiny)[1]])
    with torch.inference_mode():
        plain = tiny.model(ids).logits
        with steered(tiny.model, [SteeringSpec(2, vector, coef=0.0, positions="all")]):
            zero = tiny.model(ids).logits
        with steered(tiny.model, [SteeringSpec(2, vector, coef=4.0, positions="all")]):
            moved = tiny.model(ids).logits
        after = tiny.model(ids).logits  # hooks removed on exit
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, moved)
    assert torch.equal(plain, after)


def test_ablation_zeroes_the_component_at_that_layer(tiny, vector) -> None:
    ids = _prompts(tiny)[1]
    unit = vector[2] / vector[2].norm()
    with steered(tiny.model, [SteeringSpec(2, vector, positions="all", ablate=True)]):
        states = hidden_states(tiny, ids, [2])[:, 0]
    assert (states @ unit).abs().max() < 1e-4
    plain = hidden_states(tiny, ids, [2])[:, 0]
    assert (plain @ unit).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["static", "hf"])
@pytest.mark.parametrize("positions", ["response", "prompt", "all"])
def test_steered_padded_batch_equals_rows_steered_alone(tiny, vector, backend, positions) -> None:
    engine = DecodeEngine(tiny, backend=backend, capture=True)
    requests = [DecodeRequest(p, seed=i) for i, p in enumerate(_prompts(tiny))]
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0)
    specs = [SteeringSpec(2, vector, coef=3.0, positions=positions)]
    batched = engine.run(requests, sampling, steering=specs)
    plain = engine.run(requests, sampling)
    assert any(b.answer_ids != p.answer_ids for b, p in zip(batched, plain, strict=True))
    for request, result in zip(requests, batched, strict=True):
        alone = engine.run([request], sampling, steering=specs)[0]
        assert result.answer_ids == alone.answer_ids
        for kind in ("prompt_avg", "prompt_last", "response_avg"):
            torch.testing.assert_close(
                result.activations[kind], alone.activations[kind], rtol=1e-4, atol=1e-5
            )


@pytest.mark.parametrize("backend", ["static", "hf"])
@pytest.mark.parametrize("positions", ["response", "all"])
def test_rows_steered_by_their_own_specs_equal_each_setting_run_alone(
    tiny, vector, backend, positions
) -> None:
    """A sweep's settings in one queue (``DecodeRequest.steer``): each row, whatever its
    neighbours' specs (two at its layer, one at another, a cap, none), with refilled slots,
    gives the tokens and captures of its own specs run alone."""
    engine = DecodeEngine(tiny, backend=backend, capture=True)
    specs = [
        SteeringSpec(2, vector, coef=3.0, positions=positions),
        SteeringSpec(2, vector, coef=-3.0, positions=positions),
        SteeringSpec(1, vector, coef=4.0, positions=positions),
        SteeringSpec(2, vector, cap=0.0, positions=positions),
    ]
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    prompts = _prompts(tiny)
    choices = [(0,), (1,), (), (2,), (3,), (0, 2), None]
    requests = [
        DecodeRequest(prompts[i % len(prompts)], seed=i, steer=steer)
        for i, steer in enumerate(choices)
    ]
    mixed = engine.run(requests, sampling, slots=3, steering=specs)
    answers = set()
    for request, result in zip(requests, mixed, strict=True):
        own = specs if request.steer is None else [specs[k] for k in request.steer]
        plain = DecodeRequest(request.prompt_ids, request.seed)
        alone = engine.run([plain], sampling, steering=own)[0]
        assert result.answer_ids == alone.answer_ids
        answers.add((tuple(request.prompt_ids), tuple(result.answer_ids)))
        for kind in ("prompt_avg", "prompt_last", "response_avg"):
            torch.testing.assert_close(
                result.activations[kind], alone.activations[kind], rtol=1e-4, atol=1e-5
            )
    # The settings differ: the same prompt answered differently under different specs.
    assert len(answers) > len(prompts)
    for steer, given in (((4,), specs), ((-1,), specs), ((0,), [])):
        with pytest.raises(ValueError, match=f"spec index {steer[0]}; the run has {len(given)}"):
            engine.run([DecodeRequest(prompts[0], 0, steer=steer)], sampling, steering=given)


def test_steering_positions_in_the_prefill(tiny, vector) -> None:
    """``response`` steers only the last real prompt token in the prefill (the position that
    emits the first answer token), ``prompt`` every real prompt token; captures at the steered
    layer read the steered state, earlier layers are untouched (left-padded batch)."""
    engine = DecodeEngine(tiny, capture=True)
    prompts = _prompts(tiny)
    requests = [DecodeRequest(p, seed=0) for p in prompts]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    coef, v = 5.0, vector[2]
    plain = engine.run(requests, sampling)
    response = engine.run(requests, sampling, steering=[SteeringSpec(2, vector, coef=coef)])
    prompt = engine.run(
        requests, sampling, steering=[SteeringSpec(2, vector, coef=coef, positions="prompt")]
    )
    for ids, p, r, q in zip(prompts, plain, response, prompt, strict=True):
        n = len(ids)
        for steered_row in (r, q):
            for kind in ("prompt_last", "prompt_avg"):
                torch.testing.assert_close(
                    steered_row.activations[kind][:2], p.activations[kind][:2]
                )
            # The last prompt token is steered by both, and read after the addition.
            torch.testing.assert_close(
                steered_row.activations["prompt_last"][2],
                p.activations["prompt_last"][2] + coef * v,
                rtol=1e-4,
                atol=1e-4,
            )
        # Response steering moves the prompt average by that one token's share only.
        torch.testing.assert_close(
            r.activations["prompt_avg"][2], p.activations["prompt_avg"][2] + coef * v / n
        )
        torch.testing.assert_close(
            q.activations["prompt_avg"][2], p.activations["prompt_avg"][2] + coef * v
        )
    # The first answer token comes from the steered last prompt position.
    assert any(r.answer_ids[0] != p.answer_ids[0] for r, p in zip(response, plain, strict=True))


def test_live_watch_equals_teacher_forced_projections(tiny, vector) -> None:
    engine = DecodeEngine(tiny, capture=False)
    requests = [DecodeRequest(p, seed=i) for i, p in enumerate(_prompts(tiny))]
    streamed: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    results = engine.run(
        requests,
        SamplingConfig(max_new_tokens=12, temperature=1.0),
        watch=[Watch("v2", 2, vector[2]), Watch("v3", 3, vector[3])],
        on_tokens=lambda start, toks, proj: streamed.append((start, toks, proj)),
        check_every=4,
    )
    assert [s[0] for s in streamed] == [0, 4, 8]
    for row, (request, result) in enumerate(zip(requests, results, strict=True)):
        ref = project_tokens(tiny, request.prompt_ids, result.answer_ids, {"v": vector}, [2, 3])
        expected = ref.values[ref.prompt_len :, 0, :]
        torch.testing.assert_close(result.projections, expected, rtol=1e-4, atol=1e-4)
        first = streamed[0][2][row, : min(4, len(result.answer_ids))]
        torch.testing.assert_close(first, expected[: first.shape[0]], rtol=1e-4, atol=1e-4)


def test_heatmap_is_spans_not_markup() -> None:
    text = heatmap(["[bold]", " ", "\n", "ok"], [1.0, -1.0, 0.0, 0.5], palette="rgb")
    assert text.plain == "[bold]·↵\nok"
    assert len(text.spans) == 4 and all(s.style.bgcolor for s in text.spans)
    assert visible("\t") == "→"
    assert "+1" in legend(1.0, palette="rgb").plain


def test_bad_steering_specs(vector) -> None:
    with pytest.raises(ValueError, match="positions must be one of"):
        SteeringSpec(2, vector, positions="pads")
    with pytest.raises(ValueError, match="embedding output"):
        SteeringSpec(0, vector)
