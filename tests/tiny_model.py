"""A tiny random-init Llama with a byte-level BPE tokenizer trained in memory and a ChatML
template: every pipeline test runs on it in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

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
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def teacher_forced_means(model, prompt: list[int], answer: list[int]) -> dict:
    """The reference for every captured or batched mean: one forward over prompt ids + answer
    ids with every hidden state, the last taken as the raw block output (HF normalises it)."""
    import torch

    raw = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda _m, _i, o: raw.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.inference_mode():
        out = model(torch.tensor([prompt + answer]), output_hidden_states=True)
    handle.remove()
    h = torch.stack([s[0] for s in [*out.hidden_states[:-1], raw[0]]])  # [L+1, T, d]
    n = len(prompt)
    return {
        "response_avg": h[:, n:].mean(1),
        "prompt_avg": h[:, :n].mean(1),
        "prompt_last": h[:, n - 1],
    }
