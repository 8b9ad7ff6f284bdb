"""A tiny random-init Llama with a byte-level BPE tokenizer trained in memory and a ChatML
template: every pipeline test runs on it in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same template for a model that has no system role (as Gemma's refuses one).
CHATML_NO_SYSTEM = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from db.traits import bundled_traits

    lines = []
    for trait in bundled_traits():
        lines.append(trait.description)
        lines.extend(trait.questions)
        for pair in trait.instructions:
            lines.extend([pair.pos, pair.neg])
    lines.append("0 1 2 3 4 5 6 7 8 9 10 25 50 75 100 REFUSAL [ ] { } \n\t  ")
    return lines


def build_tiny_tokenizer(vocab_size: int = 400, *, system_role: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML if system_role else CHATML_NO_SYSTEM
    return fast


def _tiny_config(tokenizer: Any, *, hidden: int, layers: int) -> dict[str, Any]:
    """What every tiny config shares: 4 heads, 2 KV heads, the tokenizer's ids."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }


def build_tiny_model(
    folder: str | Path,
    *,
    layers: int = 3,
    hidden: int = 64,
    system_role: bool = True,
    seed: int = 0,
) -> Path:
    """Save a tiny random Llama and its tokenizer to ``folder``; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(system_role=system_role)
    config = LlamaConfig(**_tiny_config(tokenizer, hidden=hidden, layers=layers))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def teacher_forced_states(model, prompt: list[int], answer: list[int], steering=()) -> Any:
    """[L+1, T, d]: every hidden state of one forward over prompt ids + answer ids, read by
    hooks (state 0 the first block's input, state l block l-1's raw output, the last one
    included: HF normalises its last entry). With ``steering`` specs, the forward runs under
    ``steered()`` at the positions the engine touches while generating that answer, and the
    states are read after the steering."""
    import torch

    from vectors.steering import sequence_masks, steered

    layers = model.model.layers
    states: list = [None] * (len(layers) + 1)
    ids = torch.tensor([prompt + answer], device=model.device)
    with steered(model, list(steering)) as context:
        context.set(sequence_masks(len(prompt), ids.shape[1]))
        handles = [
            layers[0].register_forward_pre_hook(
                lambda _m, args, kwargs: states.__setitem__(
                    0, args[0] if args else kwargs["hidden_states"]
                ),
                with_kwargs=True,
            )
        ]
        for index, layer in enumerate(layers):
            handles.append(
                layer.register_forward_hook(
                    lambda _m, _i, o, index=index: states.__setitem__(
                        index + 1, o[0] if isinstance(o, tuple) else o
                    )
                )
            )
        try:
            with torch.inference_mode():
                model(ids)
        finally:
            for handle in handles:
                handle.remove()
    return torch.stack([s[0] for s in states])


def teacher_forced_means(model, prompt: list[int], answer: list[int], steering=()) -> dict:
    """The reference for every captured or batched mean (see ``teacher_forced_states``)."""
    h = teacher_forced_states(model, prompt, answer, steering)
    n = len(prompt)
    return {
        "response_avg": h[:, n:].mean(1),
        "prompt_avg": h[:, :n].mean(1),
        "prompt_last": h[:, n - 1],
    }


# One tiny config per architecture family the engine's static runner is tested on. Sliding
# windows (6) are shorter than every test prompt, so a wrong window changes the tokens.
WINDOW = 6
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {
        "use_sliding_window": True,
        "sliding_window": WINDOW,
        "max_window_layers": 1,
        "head_dim": 16,
    },
    "gemma": {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"},
    "gemma2": {
        "sliding_window": WINDOW,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "gemma3_text": {
        "sliding_window": WINDOW,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "layer_types": [
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
        "rope_local_base_freq": 100.0,
    },
    "phi3": {"sliding_window": WINDOW, "partial_rotary_factor": 0.5},
    "olmo2": {},
}


def build_tiny_family(
    folder: str | Path, family: str, *, seed: int = 0, overrides: dict | None = None
) -> Path:
    """Save a tiny random model of ``family`` (4 layers, hidden 64, 4 heads, 2 KV heads) with
    the tiny tokenizer; returns the folder. ``overrides`` replace config values."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    values = {**_tiny_config(tokenizer, hidden=64, layers=4), **FAMILY_CONFIGS[family]}
    config = AutoConfig.for_model(family, **{**values, **(overrides or {})})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms too: a norm left at its init hides a missing one
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
