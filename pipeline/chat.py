"""Chat prompts as token ids. Prompt ids come from the chat template alone; answer ids are
kept apart and concatenated as ids, never re-tokenised as one string (the two can merge at
the boundary and shift it by a token)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from db.errors import PersonaError

_PROBE = "persona-studio system probe 7d1f"


def supports_system_role(tokenizer: Any) -> bool:
    """Whether the template renders a system turn (some raise, some silently drop it)."""
    cached = getattr(tokenizer, "_persona_system_role", None)
    if cached is not None:
        return cached
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        supported = _PROBE in text
    except Exception:  # jinja raises its own TemplateError (and some templates raise others)
        supported = False
    tokenizer._persona_system_role = supported
    return supported


def chat_messages(tokenizer: Any, system: str | None, user: str) -> list[dict[str, str]]:
    """The messages for one turn; a template without a system role gets the system text
    folded into the start of the user turn."""
    if not system:
        return [{"role": "user", "content": user}]
    if supports_system_role(tokenizer):
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": f"{system}\n\n{user}"}]


def prompt_text(tokenizer: Any, system: str | None, user: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise PersonaError(
            "this model's tokenizer has no chat template; use an instruction-tuned (chat) model"
        )
    return tokenizer.apply_chat_template(
        chat_messages(tokenizer, system, user), tokenize=False, add_generation_prompt=True
    )


def prompt_ids(tokenizer: Any, system: str | None, user: str) -> list[int]:
    """Token ids of the rendered prompt, ending with the assistant turn's header. The template
    writes its own special tokens (BOS included), so the tokenizer adds none."""
    text = prompt_text(tokenizer, system, user)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS, the config's EOS (may be a list),
    and the template's end-of-turn tokens when the vocabulary has them."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"):
        if token in vocab:
            ids.add(int(vocab[token]))
    return sorted(ids)


@lru_cache(maxsize=64)
def _model_folder(spec: str) -> Path | None:
    from pipeline.models import resolve_model

    try:
        return resolve_model(spec).path
    except PersonaError:
        return None


def same_model(spec: str, loaded: Any) -> bool:
    """Whether a stored model name and a loaded model are one model: the same name, or
    names that resolve to the same folder."""
    if spec == loaded.model_id:
        return True
    folder = _model_folder(spec)
    return folder is not None and Path(folder) == Path(loaded.path)


def token_ids(response: Any, loaded: Any) -> tuple[list[int], list[int]]:
    """A stored response's prompt and answer as ``loaded``'s token ids: the stored ids when
    that model made them (under any spelling of its name: ``smollm2`` or its folder), else
    the stored text tokenised anew (another tokenizer's ids would be read as other words):
    an imported row's rendered prompt as it is, a generated row's prompt rendered again
    from its system prompt and question."""
    if response.prompt_ids and same_model(response.model, loaded):
        return list(response.prompt_ids), list(response.answer_ids)
    tokenizer = loaded.tokenizer
    if getattr(response, "prompt_text", None):
        prompt = list(tokenizer(response.prompt_text, add_special_tokens=False)["input_ids"])
    else:
        prompt = prompt_ids(tokenizer, response.system_prompt or None, response.question_text)
    answer = tokenizer(response.answer, add_special_tokens=False)["input_ids"]
    return prompt, list(answer)
