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


# Published shapes of each family's common 7-12B model (random weights: speed does not
# depend on them). Keys are model types; values are config arguments.
ARCH_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2": dict(  # Qwen2.5-7B
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
    ),
    "qwen3": dict(  # Qwen3-8B
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
    ),
    "mistral": dict(  # Mistral-7B-v0.1 (sliding window 4096)
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, sliding_window=4096,
    ),
    "gemma2": dict(  # Gemma-2-9B
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=4096,
        query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(  # Gemma-3-12B's text model
        vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
        query_pre_attn_scalar=256,
    ),
    "phi3": dict(  # Phi-3-mini (fused qkv and gate_up)
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, sliding_window=2047,
    ),
    "olmo2": dict(  # OLMo-2-7B
        vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    ),
}  # fmt: skip


def build_arch_model(arch: str):
    """A family's 7-12B shape in bf16 on the GPU (``llama`` is the Llama-3.1-8B shape)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models import LoadedModel

    if arch == "llama":
        return build_model()
    shape = dict(ARCH_SHAPES[arch])
    vocab = shape["vocab_size"]
    config = AutoConfig.for_model(
        arch,
        **shape,
        max_position_embeddings=8192,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 2,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.generation_config.pad_token_id = config.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=BenchTokenizer(vocab),
        model_id=f"random-{arch}-shape",
        path=Path("."),
        device=torch.device("cuda"),
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
