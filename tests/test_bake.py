"""Baked models: the vector in the weights equals steering with positions=all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from planted import assert_baked_equals_steered, store_vector
from tiny_model import FAMILY_CONFIGS, build_tiny_family

from db import PersonaError, Store
from pipeline.bake import BakeParams, bake, bake_vector

# Families written as Llama once their sliding windows are off (as their released models ship).
NO_WINDOW = {
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 4},
}


def _vector(folder: Path, seed: int = 7) -> torch.Tensor:
    config = json.loads((folder / "config.json").read_text())
    torch.manual_seed(seed)
    return torch.randn(config["num_hidden_layers"] + 1, config["hidden_size"])


def test_baked_llama_equals_steering_at_every_position(tiny_model_dir, tmp_path) -> None:
    vector = _vector(tiny_model_dir)
    result = bake_vector(str(tiny_model_dir), vector, BakeParams(layer=2, coef=3.0), tmp_path / "b")
    assert result.written_as == "llama" and result.probe_error is not None
    assert result.probe_error < 1e-4
    assert result.where == "model.layers.1.mlp.down_proj.bias"
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["mlp_bias"] is True and config["architectures"] == ["LlamaForCausalLM"]
    meta = json.loads((tmp_path / "b" / "persona_bake.json").read_text())
    assert meta["layer"] == 2 and meta["coef"] == 3.0
    assert_baked_equals_steered(tiny_model_dir, tmp_path / "b", vector, 2, 3.0)


@pytest.mark.parametrize("family", sorted(NO_WINDOW))
def test_llama_shaped_families_are_baked_as_llama(family, tmp_path) -> None:
    source = build_tiny_family(tmp_path / family, family, overrides=NO_WINDOW[family])
    vector = _vector(source)
    result = bake_vector(str(source), vector, BakeParams(layer=4, coef=-2.0), tmp_path / "b")
    assert (result.family, result.written_as) == (family, "llama")
    assert_baked_equals_steered(source, tmp_path / "b", vector, 4, -2.0)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "qwen3"])
def test_families_without_an_mlp_output_bias_are_refused(family, tmp_path) -> None:
    from transformers import AutoConfig

    folder = tmp_path / family
    AutoConfig.for_model(family, num_hidden_layers=4, **FAMILY_CONFIGS[family]).save_pretrained(
        folder
    )
    with pytest.raises(PersonaError, match=f"cannot bake into a {family} model.*llama, mistral"):
        bake_vector(str(folder), torch.zeros(8), BakeParams(layer=1, coef=1.0), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_windows_are_refused(family, tmp_path) -> None:
    source = build_tiny_family(tmp_path / family, family)  # windows of 6 tokens
    with pytest.raises(PersonaError, match="sliding-window attention"):
        bake_vector(str(source), _vector(source), BakeParams(layer=2, coef=1.0), tmp_path / "o")


def test_bake_from_the_store_and_bad_inputs(tiny_model_dir, tmp_path) -> None:
    vector = _vector(tiny_model_dir, seed=9)
    with Store(tmp_path / "p.db") as store:
        with pytest.raises(PersonaError, match="has no response_avg_diff vector"):
            bake(store, "paternalism", tmp_path / "o", BakeParams(layer=2, coef=1.0))
        store_vector(store, "paternalism", str(tiny_model_dir), vector)
        result = bake(store, "paternalism", tmp_path / "o", BakeParams(layer=3, coef=1.5))
        meta = json.loads((result.out / "persona_bake.json").read_text())
        assert meta["trait"] == "paternalism" and meta["kind"] == "response_avg_diff"
        with pytest.raises(PersonaError, match="exists and is not empty"):
            bake(store, "paternalism", tmp_path / "o", BakeParams(layer=3, coef=1.5))
        with pytest.raises(PersonaError, match=r"--layer must be in 1\.\.3"):
            bake(store, "paternalism", tmp_path / "o2", BakeParams(layer=4, coef=1.5))
    for params, message in [
        (BakeParams(layer=0, coef=1.0), "embedding output"),
        (BakeParams(layer=2, coef=0.0), "--coef must be"),
        (BakeParams(layer=2, coef=float("inf")), "--coef must be"),
        (BakeParams(layer=2, coef=1.0, vector="x"), "--vector must be one of"),
    ]:
        with pytest.raises(PersonaError, match=message):
            params.validate()
