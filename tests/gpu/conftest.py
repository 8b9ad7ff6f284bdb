"""The GPU acceptance suite: skipped where torch sees no CUDA device (CI, laptops).

Run it on a GPU machine with ``make gpu-test``. The 8B-shaped model's depth can be lowered
with ``PERSONA_GPU_LAYERS`` (default 32, the real depth) to save time on loading."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tiny_model, conftest helpers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="the GPU acceptance suite needs a CUDA device")
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


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
