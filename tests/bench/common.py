"""Shared pieces of the GPU benchmarks: a random-init Llama-3.1-8B-shaped model (speed does
not depend on the weights), random prompts, timing, and the printed table."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class BenchTokenizer:
    """What the engine asks of a tokenizer, for a model with no real vocabulary."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size - 1
        self.pad_token_id = vocab_size - 2

    def get_vocab(self) -> dict[str, int]:
        return {}


def llama8b_config(layers: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128255,
        pad_token_id=128254,
        tie_word_embeddings=False,
    )


def build_model(layers: int = 32):
    """The 8B shape in bf16 on the GPU, initialised there (a CPU init takes minutes)."""
    from transformers import LlamaForCausalLM

    from pipeline.models import LoadedModel

    config = llama8b_config(layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    model.generation_config.pad_token_id = config.pad_token_id
    loaded = LoadedModel(
        model=model,
        tokenizer=BenchTokenizer(config.vocab_size),
        model_id="random-llama-3.1-8b-shape",
        path=Path("."),
        device=torch.device("cuda"),
    )
    return loaded


def random_prompts(n: int, low: int, high: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab - 2, (k,), generator=gen).tolist() for k in lengths]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def card() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu, {os.cpu_count()} cores"


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n{title}  [{card()}]")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).rjust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)


def save_json(name: str, payload: Any) -> None:
    folder = Path(os.environ.get("OUT") or "tests/bench/results")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(payload, indent=2))
