"""Activation capping inside the CUDA-graphed decode step: the graphed capped run equals the
eager one and its watched projections never exceed the cap. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eager_twin import eager_twin
from tiny_model import build_tiny_family

from pipeline.chat import prompt_ids
from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig, Watch
from pipeline.models import load_model
from vectors.steering import SteeringSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the GPU acceptance suite needs a CUDA device"
    ),
]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_graphed_capping_equals_eager_and_holds_the_cap(family: str, tmp_path: Path) -> None:
    loaded = load_model(str(build_tiny_family(tmp_path / family, family)), dtype="float32")
    questions = ["Hi there", "What should I cook tonight? I have rice and beans."]
    requests = [
        DecodeRequest(prompt_ids(loaded.tokenizer, None, q), seed=i)
        for i, q in enumerate(questions)
    ]
    torch.manual_seed(4)
    vector = torch.randn(loaded.num_layers + 1, loaded.hidden_size)
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    watch = [Watch("v", 2, vector[2])]
    plain = DecodeEngine(loaded, capture=False).run(requests, sampling, watch=watch)
    tau = float(torch.cat([r.projections for r in plain]).median())
    specs = [SteeringSpec(2, vector, positions="all", cap=tau)]
    graphed_engine = DecodeEngine(loaded, capture=True)
    assert graphed_engine.cuda_graphs
    graphed = graphed_engine.run(requests, sampling, steering=specs, watch=watch)
    eager = eager_twin(loaded, capture=True).run(requests, sampling, steering=specs, watch=watch)
    for g, e in zip(graphed, eager, strict=True):
        assert g.answer_ids == e.answer_ids
        torch.testing.assert_close(g.activations["response_avg"], e.activations["response_avg"])
        assert float(g.projections.max()) <= tau + 1e-3
