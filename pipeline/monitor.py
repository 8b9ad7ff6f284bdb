"""Monitoring: the projection h_t . v / |v| of every token on persona vectors, at one or
several layers, for a stored response or new text, plus the response average; optionally as
z-scores against a baseline of the model's own answers with no system prompt. Live
monitoring during generation comes from the engine's ``watch`` (see ``pipeline.engine``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from db import PersonaError, Store
from db.store import Response
from pipeline.chat import prompt_ids, stop_token_ids
from pipeline.trait_vectors import DEFAULT_KIND, check_layer, load_fitted_vector

BASELINE_SPLIT = "eval"


@dataclass
class TokenProjections:
    tokens: list[str]  # decoded one by one, for display
    token_ids: list[int]
    prompt_len: int  # tokens before this index are the prompt
    layers: list[int]
    names: list[str]  # one per vector
    values: torch.Tensor  # [T, n_vectors, n_layers]
    zscored: bool = False
    baseline: dict[str, Any] = field(default_factory=dict)

    def response_average(self) -> torch.Tensor:
        """[n_vectors, n_layers] mean over the response tokens."""
        part = self.values[self.prompt_len :]
        if part.shape[0] == 0:
            return torch.zeros(self.values.shape[1:])
        return part.mean(0)


def hidden_states(loaded: Any, ids: Sequence[int], layers: Sequence[int]) -> torch.Tensor:
    """[T, n_layers, d] float32 hidden states (our convention: raw block outputs) of one
    sequence at the given layers, by one teacher-forced forward."""
    model = loaded.model
    core = getattr(model, model.base_model_prefix, model)
    wanted = sorted(set(layers))
    captured: dict[int, torch.Tensor] = {}
    handles = []
    if 0 in wanted:
        handles.append(
            core.embed_tokens.register_forward_hook(lambda _m, _i, o: captured.__setitem__(0, o))
        )
    for layer in wanted:
        if layer == 0:
            continue
        check_layer(layer, len(core.layers), steered=False)

        def hook(_m: Any, _i: Any, o: Any, layer: int = layer) -> None:
            captured[layer] = o[0] if isinstance(o, tuple) else o

        handles.append(core.layers[layer - 1].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            core(input_ids=torch.tensor([list(ids)], device=loaded.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[layer][0].float() for layer in layers], dim=1).cpu()


def project_tokens(
    loaded: Any,
    prompt: Sequence[int],
    answer: Sequence[int],
    vectors: dict[str, torch.Tensor],
    layers: Sequence[int],
) -> TokenProjections:
    """Per-token projections of prompt ids + answer ids on each [L+1, d] vector."""
    ids = [*prompt, *answer]
    states = hidden_states(loaded, ids, layers)  # [T, n_layers, d]
    names = sorted(vectors)
    values = torch.zeros(len(ids), len(names), len(layers))
    for j, name in enumerate(names):
        for k, layer in enumerate(layers):
            v = vectors[name][layer].float()
            values[:, j, k] = states[:, k] @ v / v.norm().clamp(min=1e-12)
    tok = loaded.tokenizer
    return TokenProjections(
        tokens=[tok.decode([t]) for t in ids],
        token_ids=ids,
        prompt_len=len(prompt),
        layers=list(layers),
        names=names,
        values=values,
    )


def baseline_stats(
    store: Store,
    loaded: Any,
    trait: str,
    vectors: dict[str, torch.Tensor],
    layers: Sequence[int],
    *,
    n: int = 10,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean and std of per-token response projections over the model's own answers to eval
    questions with no system prompt (generated once and kept as a ``none``-side job)."""
    responses = neutral_responses(
        store, loaded, trait, n=n, max_new_tokens=max_new_tokens, seed=seed
    )
    per_token = []
    for r in responses:
        proj = project_tokens(loaded, r.prompt_ids, r.answer_ids, vectors, layers)
        per_token.append(proj.values[proj.prompt_len :])
    values = torch.cat(per_token)
    if values.shape[0] < 2:
        raise PersonaError("the neutral baseline has fewer than two answer tokens")
    return {"mean": values.mean(0), "std": values.std(0).clamp(min=1e-6), "tokens": values.shape[0]}


def neutral_responses(
    store: Store, loaded: Any, trait: str, *, n: int, max_new_tokens: int, seed: int
) -> list[Any]:
    from pipeline.decoding import answer_text, decode, response_row
    from pipeline.sampling import row_seed

    definition = store.get_trait(trait)
    params = {
        "side": "none",
        "split": BASELINE_SPLIT,
        "model": loaded.model_id,
        "n": n,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "baseline": True,
    }
    for job in store.list_jobs(trait=trait, kind="baseline"):
        if job.params == params and job.status == "done":
            return store.responses(job=job.id)
    job = store.create_job("baseline", trait, params)
    questions = list(range(20, 20 + min(n, 20)))
    prompts = [prompt_ids(loaded.tokenizer, None, definition.questions[q]) for q in questions]
    seeds = [row_seed(seed, q, 0, 0) for q in questions]
    results = decode(loaded, prompts, seeds, max_new_tokens=max_new_tokens)
    store.add_responses(
        response_row(
            job=job.id,
            trait=trait,
            side="none",
            split=BASELINE_SPLIT,
            key=(q, 0, 0),
            question_text=definition.questions[q],
            system_prompt="",
            prompt_ids=p,
            answer_ids=r.answer_ids,
            answer=answer_text(loaded, r.answer_ids),
            finish_reason=r.finish_reason,
            model=loaded.model_id,
        )
        for q, p, r in zip(questions, prompts, results, strict=True)
    )
    store.update_job(job.id, status="done", done=len(questions), total=len(questions))
    return store.responses(job=job.id)


def zscore(proj: TokenProjections, stats: dict[str, torch.Tensor]) -> TokenProjections:
    proj.values = (proj.values - stats["mean"]) / stats["std"]
    proj.zscored = True
    proj.baseline = {"tokens": int(stats["tokens"])}
    return proj


# ---- the flows the command line and the dashboard share ----------------------------------------
@dataclass
class Monitored:
    """Per-token projections of one answer on one vector at one layer."""

    layer: int
    projections: TokenProjections


def monitor_answer(
    store: Store,
    trait: str,
    *,
    kind: str = DEFAULT_KIND,
    response_id: int | None = None,
    prompt: str | None = None,
    layer: int | None = None,
    model: str | None = None,
    device: str | None = None,
    zscored: bool = False,
    max_new_tokens: int = 120,
    temperature: float = 0.0,
    seed: int = 0,
) -> Monitored:
    """A stored response (``response_id``) or the model's new answer to ``prompt``, projected
    token by token on the trait's latest ``kind`` vector at ``layer`` (default: the trait's
    default layer); z-scores against the neutral baseline when ``zscored``."""
    from pipeline.chat import token_ids
    from pipeline.decoding import decode

    fitted = load_fitted_vector(store, trait, kind, model=model, device=device)
    loaded = fitted.loaded
    layer = fitted.layer_or_default(store, layer, steered=False)
    if response_id is not None:
        prompt_part, answer = token_ids(store.get_response(response_id), loaded)
    elif prompt is not None:
        prompt_part = prompt_ids(loaded.tokenizer, None, prompt)
        answer = decode(
            loaded,
            [prompt_part],
            [seed],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )[0].answer_ids
    else:
        raise PersonaError("monitor needs a stored response id or a prompt to answer")
    vectors = {kind: fitted.vector}
    proj = project_tokens(loaded, prompt_part, answer, vectors, [layer])
    if zscored:
        proj = zscore(proj, baseline_stats(store, loaded, trait, vectors, [layer]))
    return Monitored(layer, proj)


def monitor_responses(
    store: Store,
    trait: str,
    response_ids: Sequence[int],
    *,
    kind: str = DEFAULT_KIND,
    layer: int | None = None,
    zscored: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[int, list[tuple[Response, TokenProjections]]]:
    """Stored responses projected at every layer (values [T, 1, L+1]), for a view that
    moves between layers; with the layer to show first (``layer``, else the default).
    ``on_progress`` hears each stage in words (z-scores first need the neutral baseline,
    whose answers are generated the first time: seconds, not milliseconds)."""
    from pipeline.chat import token_ids

    say = on_progress or (lambda _text: None)
    fitted = load_fitted_vector(store, trait, kind)
    loaded = fitted.loaded
    vectors = {kind: fitted.vector}
    layers = list(range(loaded.num_layers + 1))
    stats = None
    if zscored:
        say("z-scores: the neutral baseline (answers with no system prompt, made once)…")
        stats = baseline_stats(store, loaded, trait, vectors, layers)
    shown = []
    for done, response_id in enumerate(response_ids):
        say(f"projecting response {done + 1} of {len(response_ids)} at every layer…")
        response = store.get_response(response_id)
        proj = project_tokens(loaded, *token_ids(response, loaded), vectors, layers)
        shown.append((response, proj if stats is None else zscore(proj, stats)))
    if layer is None:
        layer = fitted.layer_or_default(store, None, steered=False)
    return layer, shown


# on_words(words, projections): the answer's next tokens as text, each with its projection.
WordsCallback = Callable[[list[str], list[float]], None]


def stream_answer(
    store: Store,
    trait: str,
    prompt: str,
    on_words: WordsCallback,
    *,
    kind: str = DEFAULT_KIND,
    layer: int | None = None,
    coef: float = 0.0,
    cap: float | None = None,
    max_new_tokens: int = 200,
) -> int:
    """The model's greedy answer to ``prompt``, steered at ``layer`` by ``coef`` x the vector
    (when not 0) and capped at ``cap`` (a projection value, when given), streamed to
    ``on_words`` with each token's projection at that layer (after the steering there) as it
    is written, up to the stop token (not included); returns the layer."""
    from pipeline.decoding import decode
    from pipeline.engine import Watch
    from pipeline.steer import SteeringSetting

    setting = SteeringSetting(coef=coef, cap=cap).validate()
    fitted = load_fitted_vector(store, trait, kind)
    loaded = fitted.loaded
    layer = fitted.layer_or_default(store, layer, steered=setting.active)
    tok = loaded.tokenizer
    stops = set(stop_token_ids(tok, loaded.model.config))
    ended = False

    def stream(_start: int, tokens: torch.Tensor, proj: torch.Tensor | None) -> None:
        # A finished row goes on as padding until the check: cut at its stop token.
        nonlocal ended
        if ended:
            return
        ids = tokens[0].tolist()
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        ended = end < len(ids)
        if end:
            words = [tok.decode([t]) for t in ids[:end]]
            values = proj[0, :end, 0].tolist() if proj is not None else [0.0] * len(words)
            on_words(words, values)

    decode(
        loaded,
        [prompt_ids(tok, None, prompt)],
        [0],
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        steering=setting.specs(layer, fitted.vector),
        watch=[Watch(kind, layer, fitted.vector[layer])],
        on_tokens=stream,
        check_every=4,
    )
    return layer
