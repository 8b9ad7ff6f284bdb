"""Data screening: how strongly each sample of a fine-tuning dataset expresses a trait,
before training on it. For every (prompt, response) pair, the response-average projection
on the persona vector at a layer; with ``compare_base``, also the model's own answer to the
same prompt and the difference (the paper's projection difference: data minus base)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from db import PersonaError, Store
from pipeline.chat import prompt_ids
from pipeline.response_means import TOKENS_PER_BATCH, ForwardMeans
from pipeline.trait_vectors import load_fitted_vector
from vectors.analysis import projections_by_layer


@dataclass
class ScreenRow:
    index: int
    prompt: str
    response: str
    projection: float
    base_projection: float | None = None

    @property
    def difference(self) -> float | None:
        if self.base_projection is None:
            return None
        return self.projection - self.base_projection


def read_samples(path: Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs from JSONL lines ``{"prompt": ..., "response": ...}`` or
    chat lines ``{"messages": [{"role": "user"...}, {"role": "assistant"...}]}``."""
    if not path.is_file():
        raise PersonaError(f"--data {path} does not exist; pass a JSONL file")
    samples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PersonaError(f"--data {path} is not UTF-8 text; save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PersonaError(f"{path} line {number} is not JSON ({exc.msg})") from None
        except RecursionError:  # nesting deeper than the parser's stack
            raise PersonaError(f"{path} line {number} is nested too deeply to read") from None
        samples.append(_sample(item, path, number))
    if not samples:
        raise PersonaError(f"{path} holds no samples")
    return samples


def _sample(item: object, path: Path, number: int) -> tuple[str, str]:
    if (
        isinstance(item, dict)
        and isinstance(item.get("prompt"), str)
        and isinstance(item.get("response"), str)
    ):
        return item["prompt"], item["response"]
    if isinstance(item, dict) and isinstance(item.get("messages"), list):
        turns = [m for m in item["messages"] if isinstance(m, dict)]
        users = [m.get("content") for m in turns if m.get("role") == "user"]
        answers = [m.get("content") for m in turns if m.get("role") == "assistant"]
        if users and answers and isinstance(users[-1], str) and isinstance(answers[-1], str):
            return users[-1], answers[-1]
    raise PersonaError(
        f"{path} line {number} needs 'prompt' and 'response' strings (or chat 'messages')"
    )


def screen(
    store: Store,
    trait: str,
    data: Path,
    *,
    layer: int | None = None,
    compare_base: bool = False,
    model: str | None = None,
    device: str | None = None,
    max_new_tokens: int = 200,
    seed: int = 0,
    gpus: str | None = None,
) -> tuple[int, list[ScreenRow]]:
    """Rank the samples (highest first); returns (layer used, rows). With several devices
    (``gpus``, ``pipeline.sharding.parse_gpus``) the forward passes and base answers are
    shared by a copy of the model a device, each in its own thread."""
    from pipeline.models import fits_one_gpu, load_on_devices
    from pipeline.sampling import row_seed
    from pipeline.sharding import first_device, parse_gpus, worker_devices

    samples = read_samples(data)
    # The model loads on the first device --gpus names (or --device, or the default one).
    where = device or first_device(parse_gpus(gpus))
    fitted = load_fitted_vector(store, trait, model=model, device=where)
    loaded, vector = fitted.loaded, fitted.vector
    layer = fitted.layer_or_default(store, layer, steered=False)
    tok = loaded.tokenizer
    prompts = [prompt_ids(tok, None, p) for p, _ in samples]
    answers = [tok(r, add_special_tokens=False)["input_ids"] for _, r in samples]
    _check_context(loaded, data, prompts, answers, max_new_tokens if compare_base else 0)
    spec = model or fitted.record.model
    devices = worker_devices(parse_gpus(gpus), device, lambda: fits_one_gpu(spec))
    devices = devices[: len(samples)]  # no more copies than samples
    models = load_on_devices(spec, devices) if len(devices) > 1 else [loaded]
    rows = list(zip(prompts, answers, strict=True))
    data_proj = _projections(models, vector, layer, rows)
    base_proj: list[float | None] = [None] * len(samples)
    if compare_base:
        seeds = [row_seed(seed, i, 0, 0) for i in range(len(prompts))]
        base = _base_answers(models, prompts, seeds, max_new_tokens)
        base_proj = list(_projections(models, vector, layer, list(zip(prompts, base, strict=True))))
    rows = [ScreenRow(i, p, r, data_proj[i], base_proj[i]) for i, (p, r) in enumerate(samples)]
    key = (lambda row: row.difference) if compare_base else (lambda row: row.projection)
    rows.sort(key=key, reverse=True)
    return layer, rows


def _projections(
    models: list[Any], vector: torch.Tensor, layer: int, rows: list[tuple[list[int], list[int]]]
) -> list[float]:
    """Each row's response-average projection at ``layer``; with several models, the rows
    read by them in threads (``sharded_forward.ShardedForward``, its means on the CPU)."""
    from pipeline.sharded_forward import ShardedForward

    one = len(models) == 1
    forward = ForwardMeans(models[0]) if one else ShardedForward(models)
    v = vector.to(models[0].device if one else "cpu")
    out = [0.0] * len(rows)
    for chunk, means in forward.iter_means(rows, TOKENS_PER_BATCH):
        values = projections_by_layer(means["response_avg"], v)[:, layer].tolist()
        for i, value in zip(chunk, values, strict=True):
            out[i] = value
    return out


def _base_answers(
    models: list[Any], prompts: list[list[int]], seeds: list[int], max_new_tokens: int
) -> list[list[int]]:
    """The model's own answer to each prompt; with several models, one queue over an engine
    each (``stream_on_engines``)."""
    from pipeline.decoding import decode
    from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig
    from pipeline.engine_threads import own_errors, stream_on_engines

    if len(models) == 1:
        results = decode(models[0], prompts, seeds, max_new_tokens=max_new_tokens)
        return [r.answer_ids for r in results]
    engines = [DecodeEngine(loaded, capture=False) for loaded in models]
    requests = [DecodeRequest(p, seed) for p, seed in zip(prompts, seeds, strict=True)]
    slots = [-(-len(requests) // len(engines))] * len(engines)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    with own_errors():
        answers = dict(stream_on_engines(engines, slots, requests, sampling))
    return [answers[index].answer_ids for index in range(len(requests))]


def _check_context(loaded, data: Path, prompts: list, answers: list, new_tokens: int) -> None:
    """Samples past the model's context would be read with positions it never learned."""
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if not context:
        return
    for number, (prompt, answer) in enumerate(zip(prompts, answers, strict=True), 1):
        if len(prompt) + len(answer) > context:
            raise PersonaError(
                f"{data} sample {number} is {len(prompt) + len(answer)} tokens, past "
                f"{loaded.model_id}'s context of {context}; shorten it or leave it out"
            )
        if len(prompt) + new_tokens > context:
            raise PersonaError(
                f"{data} sample {number}'s prompt ({len(prompt)} tokens) plus the {new_tokens} "
                f"tokens --compare-base answers with is past {loaded.model_id}'s context of "
                f"{context}; shorten it or leave it out"
            )


def write_ranking(rows: list[ScreenRow], path: Path) -> Path:
    """CSV or JSONL by the file's suffix."""
    records = [
        {
            "rank": rank,
            "index": r.index,
            "projection": r.projection,
            "base_projection": r.base_projection,
            "difference": r.difference,
            "prompt": r.prompt,
            "response": r.response,
        }
        for rank, r in enumerate(rows, 1)
    ]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return path
