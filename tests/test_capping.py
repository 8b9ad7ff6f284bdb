"""Activation capping: h <- h - max(0, h.u - tau) u at one layer, on every runner and in the
teacher-forced forward, with the positions rules of any steering spec."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_model import teacher_forced_means, teacher_forced_states

from db import PersonaError
from pipeline.chat import prompt_ids
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig, Watch
from pipeline.models import load_model
from pipeline.steer import steer_side_by_side
from vectors.steering import SteeringSpec

LAYER = 2


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def vector(tiny) -> torch.Tensor:
    torch.manual_seed(11)
    return torch.randn(tiny.num_layers + 1, tiny.hidden_size)


def _prompts(tiny) -> list[list[int]]:
    questions = ["Hi", "Tell me how to [plan] a long week of work", "Why?"]
    return [prompt_ids(tiny.tokenizer, None, q) for q in questions]


def _projection(states: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return states @ (v / v.norm())


@pytest.fixture(scope="module")
def tau(tiny, vector) -> float:
    """The median projection at the layer over a teacher-forced prompt: half the positions
    are above the cap, half below."""
    states = teacher_forced_states(tiny.model, _prompts(tiny)[1], [40, 41, 42, 43, 44, 45])
    return float(_projection(states[LAYER], vector[LAYER]).median())


def test_positions_below_the_cap_are_bit_equal_and_the_rest_sit_at_it(tiny, vector, tau) -> None:
    prompt, answer = _prompts(tiny)[1], [40, 41, 42, 43, 44, 45]
    plain = teacher_forced_states(tiny.model, prompt, answer)
    spec = SteeringSpec(LAYER, vector, positions="all", cap=tau)
    capped = teacher_forced_states(tiny.model, prompt, answer, [spec])
    assert torch.equal(capped[:LAYER], plain[:LAYER])
    before = _projection(plain[LAYER], vector[LAYER])
    after = _projection(capped[LAYER], vector[LAYER])
    below = before <= tau
    assert 0 < int(below.sum()) < below.numel()  # both kinds of position are tested
    assert torch.equal(capped[LAYER][below], plain[LAYER][below])
    torch.testing.assert_close(after[~below], torch.full_like(after[~below], tau))
    assert after.max() <= tau + 1e-5
    # Only the component along v moved.
    unit = vector[LAYER] / vector[LAYER].norm()
    rest = capped[LAYER] - after[:, None] * unit - (plain[LAYER] - before[:, None] * unit)
    assert rest.abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_a_capped_stream_never_exceeds_the_cap(tiny, vector, tau, backend) -> None:
    engine = DecodeEngine(tiny, backend=backend, capture=True)
    requests = [DecodeRequest(p, seed=i) for i, p in enumerate(_prompts(tiny))]
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0)
    watch = [Watch("v", LAYER, vector[LAYER])]
    plain = engine.run(requests, sampling, watch=watch)
    assert max(float(r.projections.max()) for r in plain) > tau  # the cap has work to do
    spec = SteeringSpec(LAYER, vector, positions="all", cap=tau)
    capped = engine.run(requests, sampling, steering=[spec], watch=watch)
    for result in capped:
        assert float(result.projections.max()) <= tau + 1e-4
        assert float(_projection(result.activations["prompt_last"][LAYER], vector[LAYER])) <= (
            tau + 1e-4
        )


@pytest.mark.parametrize("backend", ["static", "hf"])
@pytest.mark.parametrize("positions", ["response", "all"])
def test_capped_decode_equals_a_teacher_forced_forward(tiny, vector, tau, backend, positions):
    engine = DecodeEngine(tiny, backend=backend, capture=True)
    requests = [DecodeRequest(p, seed=i) for i, p in enumerate(_prompts(tiny))]
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    spec = SteeringSpec(LAYER, vector, positions=positions, cap=tau - 2.0)
    capped = engine.run(requests, sampling, steering=[spec])
    plain = engine.run(requests, sampling)
    assert any(c.answer_ids != p.answer_ids for c, p in zip(capped, plain, strict=True))
    for request, result in zip(requests, capped, strict=True):
        ref = teacher_forced_means(
            tiny.model, list(request.prompt_ids), result.answer_ids, steering=[spec]
        )
        for kind in ("prompt_avg", "prompt_last", "response_avg"):
            torch.testing.assert_close(result.activations[kind], ref[kind], rtol=1e-4, atol=1e-4)


def test_side_by_side_names_the_cap(generated) -> None:
    from db import Store
    from pipeline.extract import extract

    with Store(generated) as store:
        extract(store, "paternalism")
        out = steer_side_by_side(
            store, "paternalism", layer=LAYER, coefs=[], prompt="Hi", positions="all",
            max_new_tokens=4, cap=0.5,
        )  # fmt: skip
        assert list(out) == ["unsteered", f"capped at 0.5 at layer {LAYER}"]
        with pytest.raises(PersonaError, match="--cap must be a finite"):
            steer_side_by_side(
                store, "paternalism", layer=LAYER, coefs=[], prompt="Hi", cap=float("nan")
            )


def test_bad_cap_specs(vector) -> None:
    with pytest.raises(ValueError, match="finite projection"):
        SteeringSpec(LAYER, vector, cap=float("inf"))
    with pytest.raises(ValueError, match="not both"):
        SteeringSpec(LAYER, vector, cap=1.0, ablate=True)


# ---- the steering setting of the dashboard's live monitor --------------------------------------
def test_steering_setting_checks_and_names_itself(vector) -> None:
    from pipeline.steer import SteeringSetting

    assert not SteeringSetting().active and SteeringSetting().label() == "unsteered"
    both = SteeringSetting(coef=6.0, cap=3.5).validate()
    assert both.label() == "steering coef +6, capped at 3.5"
    # The add first, then the cap: the cap bounds what the answer ends up with.
    assert [(s.coef, s.cap) for s in both.specs(LAYER, vector)] == [(6.0, None), (1.0, 3.5)]
    assert SteeringSetting(cap=-1.0).specs(LAYER, vector)[0].cap == -1.0
    for bad in ({"coef": math.nan}, {"coef": math.inf}, {"coef": 1e5}, {"cap": -math.inf}):
        with pytest.raises(PersonaError, match="finite"):
            SteeringSetting(**bad).validate()


def test_live_stream_and_side_by_side_under_a_cap(extracted_db) -> None:
    """The live stream stops at the stop token. Capped, each token reads min(its unsteered
    projection, tau) at the layer: a token's state there depends only on the layers below,
    so a teacher-forced unsteered forward of the capped answer gives what the cap clamped.
    The side by side answers the same prompt with the same seed: its answers are the
    streams'."""
    from statistics import median

    from db import Store
    from pipeline.decoding import decode
    from pipeline.monitor import project_tokens, stream_answer
    from pipeline.steer import SteeringSetting, steered_and_unsteered
    from pipeline.trait_vectors import load_fitted_vector

    def streamed(store, **steering) -> tuple[list[str], list[float]]:
        words: list[str] = []
        values: list[float] = []
        stream_answer(
            store, "paternalism", "Plan my week", lambda w, v: (words.extend(w), values.extend(v)),
            layer=LAYER, max_new_tokens=40, **steering,
        )  # fmt: skip
        return words, values

    with Store(extracted_db) as store:
        fitted = load_fitted_vector(store, "paternalism")
        loaded, tok = fitted.loaded, fitted.loaded.tokenizer
        prompt = prompt_ids(tok, None, "Plan my week")

        def answer_ids(setting: SteeringSetting) -> list[int]:
            specs = setting.specs(LAYER, fitted.vector)
            [result] = decode(loaded, [prompt], [0], max_new_tokens=40, temperature=0.0,
                              steering=specs)  # fmt: skip
            return result.answer_ids

        plain_words, plain = streamed(store)
        assert plain_words == [tok.decode([t]) for t in answer_ids(SteeringSetting())]
        tau = float(median(plain))
        words, capped = streamed(store, cap=tau)
        ids = answer_ids(SteeringSetting(cap=tau))
        assert words == [tok.decode([t]) for t in ids]  # no stop token, no padding
        forced = project_tokens(loaded, prompt, ids, {"v": fitted.vector}, [LAYER])
        raw = forced.values[forced.prompt_len :, 0, 0].tolist()
        assert min(raw) <= tau < max(raw)  # tokens on both sides of the cap
        assert capped == pytest.approx([min(r, tau) for r in raw], abs=1e-4)
        answers = steered_and_unsteered(
            store, "paternalism", "Plan my week", SteeringSetting(cap=tau), layer=LAYER,
            max_new_tokens=40,
        )  # fmt: skip
        assert [a.label for a in answers] == ["unsteered", f"capped at {tau:g} at layer {LAYER}"]
        assert answers[0].tokens == plain_words and answers[1].tokens == words
        assert answers[0].values == pytest.approx(plain, abs=1e-5)
        assert answers[1].values == pytest.approx(capped, abs=1e-5)
        with pytest.raises(PersonaError, match="nothing to compare"):
            steered_and_unsteered(store, "paternalism", "Hi", SteeringSetting(), layer=LAYER)
