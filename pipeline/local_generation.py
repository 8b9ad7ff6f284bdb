"""Generation with a local model: the decode engine in this process, or one worker process per
device (``--gpus``, ``pipeline.sharding``) with this process writing every row.

Rows are written in groups as they finish, activations first, so a killed job loses at most
the rows in flight, and a rerun of the same command resumes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from db import PersonaError, Store, TraitDefinition
from db.traits import N_PAIRS
from pipeline.generate import GenerateParams, RowKey, _context_length, _row
from pipeline.jobs import JobProgress
from pipeline.response_means import activations_dir
from pipeline.sampling import row_seed
from pipeline.sharding import GPUS_ALL, run_sharded, single_device, worker_devices
from vectors import activations

# Without --batch-size, slots come from free GPU memory, at most this many: past it a step's
# attention over every slot's cache costs more than the extra rows bring.
MAX_AUTO_SLOTS = 256
# Rows written at once when workers generate (in one process: a quarter of the slots).
SHARDED_WRITE_GROUP = 16


def generate_local(
    store: Store,
    job_id: int,
    params: GenerateParams,
    trait: TraitDefinition,
    pending: list[RowKey],
    progress: JobProgress,
) -> None:
    from pipeline.chat import prompt_ids
    from pipeline.engine import DecodeRequest, SamplingConfig
    from pipeline.models import fits_one_gpu, load_model, load_tokenizer

    progress.message = f"loading {params.model}"
    progress.flush(force=True)
    devices = worker_devices(params.gpus, params.device, lambda: fits_one_gpu(params.model))
    if params.gpus in (None, GPUS_ALL) and len(pending) <= MAX_AUTO_SLOTS:
        # Rows that fit one GPU's slots gain nothing from more GPUs (the answers' length,
        # not the batch, sets the time), and each worker costs a model load.
        devices = []
    loaded = None
    if devices:  # the workers load the model; this process needs its tokenizer only
        tokenizer, resolved = load_tokenizer(params.model)
        model_id, context = resolved.model_id, _context_length(resolved.path)
    else:
        loaded = load_model(params.model, device=params.device or single_device(params.gpus))
        tokenizer, model_id = loaded.tokenizer, loaded.model_id
        context = getattr(loaded.model.config, "max_position_embeddings", None)
    sampling = SamplingConfig(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        ignore_eos=params.ignore_eos,
    )
    systems = {i: trait.system_prompt(params.side, i) for i in range(N_PAIRS)}
    prompts = {
        key: prompt_ids(tokenizer, systems[key[1]], trait.questions[key[0]]) for key in pending
    }
    # Similar lengths side by side pad least; seeds make the order irrelevant to the tokens.
    ordered = sorted(pending, key=lambda k: (len(prompts[k]), k))
    longest = max(len(prompts[k]) for k in ordered)
    if context and longest + params.max_new_tokens > context:
        raise PersonaError(
            f"--max-new-tokens {params.max_new_tokens} plus the longest prompt ({longest} "
            f"tokens) is past {model_id}'s context of {context} tokens; give at most "
            f"--max-new-tokens {max(1, context - longest)}"
        )
    requests = [DecodeRequest(prompts[k], row_seed(params.seed, *k)) for k in ordered]
    folder = activations_dir(store, job_id)
    finished: list[tuple[RowKey, Any]] = []

    def store_finished() -> None:
        """Rows that finished since the last write: their activations, then the rows."""
        if not finished:
            return
        keys = [key for key, _ in finished]
        results = [result for _, result in finished]
        if params.capture:
            stacked = {
                kind: torch.stack([r.activations[kind] for r in results])
                for kind in activations.KINDS
            }
            try:
                activations.write_shard(folder, keys, stacked, [len(r.answer_ids) for r in results])
            except activations.ActivationFileError as exc:  # those rows are not stored
                raise PersonaError(str(exc)) from None
        rows = [
            _row(
                job_id,
                trait,
                params,
                key,
                systems[key[1]],
                prompts[key],
                result.answer_ids,
                tokenizer.decode(result.answer_ids, skip_special_tokens=True),
                result.finish_reason,
                model_id,
            )
            for key, result in finished
        ]
        store.add_responses(rows)
        progress.add(len(rows), new_tokens=sum(len(r.answer_ids) for r in results))
        finished.clear()

    def write_and_check(group: int) -> None:
        # A cancel is seen within one host check (or one poll of the workers).
        if len(finished) >= group:
            store_finished()
        progress.flush()
        progress.check_cancelled()

    if devices:
        source = _sharded_results(params, sampling, requests, devices, progress, write_and_check)
    else:
        source = _engine_results(params, sampling, requests, loaded, progress, write_and_check)
    for index, result in source:
        finished.append((ordered[index], result))
    store_finished()


def _engine_results(params, sampling, requests, loaded, progress, write_and_check) -> Iterator:
    from pipeline.engine import DecodeEngine

    engine = DecodeEngine(loaded, capture=params.capture)
    longest = max(len(r.prompt_ids) for r in requests)
    if params.batch_size:
        slots, how = params.batch_size, "--batch-size"
    else:
        slots = auto_slots(loaded, longest + params.max_new_tokens, params.capture)
        how = "chosen from free GPU memory" if loaded.device.type == "cuda" else "CPU default"
    slots = min(slots, len(requests))
    progress.extra["slots"] = slots
    progress.message = f"generating with {loaded.model_id} ({slots} slots, {how})"
    # Rows are written in groups of a quarter of the slots.
    group = max(1, slots // 4)
    try:
        yield from engine.stream(
            requests, sampling, lambda _steps: write_and_check(group), slots=slots
        )
    except torch.cuda.OutOfMemoryError:
        raise PersonaError(_out_of_memory(slots)) from None


def _sharded_results(params, sampling, requests, devices, progress, write_and_check) -> Iterator:
    chosen: dict[str, str] = {}

    def on_note(device: str, text: str) -> None:
        chosen[device] = text
        progress.extra["slots"] = dict(chosen)
        listed = ", ".join(f"{d}: {t}" for d, t in chosen.items())
        progress.message = f"generating with {params.model} on {len(devices)} workers ({listed})"

    payload = {
        "model": params.model,
        "capture": params.capture,
        "sampling": sampling,
        "batch_size": params.batch_size,
    }
    items = [(list(r.prompt_ids), r.seed) for r in requests]
    progress.message = f"starting {len(devices)} workers ({', '.join(devices)})"
    progress.flush(force=True)
    for index, result in run_sharded(
        devices,
        generate_shard,
        payload,
        items,
        on_idle=lambda: write_and_check(SHARDED_WRITE_GROUP),
        on_note=on_note,
    ):
        yield index, _from_wire(result)


def generate_shard(device: str, payload: dict, share: Sequence, emit, note) -> None:
    """A worker's part (``pipeline.sharding``): its rows on its own copy of the model."""
    from pipeline.engine import DecodeEngine, DecodeRequest
    from pipeline.models import load_model

    if not share:
        return
    loaded = load_model(payload["model"], device=device)
    sampling = payload["sampling"]
    requests = [DecodeRequest(prompt, seed) for _index, (prompt, seed) in share]
    longest = max(len(r.prompt_ids) for r in requests)
    slots = payload["batch_size"] or auto_slots(
        loaded, longest + sampling.max_new_tokens, payload["capture"]
    )
    slots = min(slots, len(requests))
    note(f"{slots} slots")
    engine = DecodeEngine(loaded, capture=payload["capture"])
    try:
        for position, result in engine.stream(requests, sampling, slots=slots):
            emit(share[position][0], _to_wire(result))
    except torch.cuda.OutOfMemoryError:
        raise PersonaError(_out_of_memory(slots)) from None


def _to_wire(result: Any) -> dict[str, Any]:
    """A result as plain arrays: tensors through a pipe would hold a shared-memory handle
    each until the parent wrote them."""
    acts = result.activations
    return {
        "answer_ids": result.answer_ids,
        "finish_reason": result.finish_reason,
        "activations": None if acts is None else {k: v.numpy() for k, v in acts.items()},
    }


def _from_wire(wire: dict[str, Any]) -> Any:
    from pipeline.engine import DecodeResult

    acts = wire["activations"]
    return DecodeResult(
        answer_ids=wire["answer_ids"],
        finish_reason=wire["finish_reason"],
        activations=None if acts is None else {k: torch.from_numpy(v) for k, v in acts.items()},
    )


def _out_of_memory(slots: int) -> str:
    return (
        f"CUDA out of memory at --batch-size {slots}; rerun the same command with "
        "a lower --batch-size (the job resumes where it stopped)"
    )


def auto_slots(loaded: Any, length: int, capture: bool) -> int:
    """Rows decoded at once when ``--batch-size`` is not given: on a GPU, as many as the
    free memory holds (KV cache of ``length`` tokens and capture buffers a row, after a
    reserve for prefill activations), at most ``MAX_AUTO_SLOTS``; on a CPU, 8."""
    if loaded.device.type != "cuda":
        return 8
    config = loaded.model.config
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    width = loaded.model.get_input_embeddings().weight.element_size()
    per_row = 2 * layers * kv_heads * head_dim * (length + 64) * width
    per_row += 4 * int(config.vocab_size) * 4  # logits and sampling, fp32
    if capture:
        per_row += 3 * (layers + 1) * int(config.hidden_size) * 4
    free, total = torch.cuda.mem_get_info(loaded.device)
    budget = free - 0.1 * total  # prefill activations, the graph's pool, fragmentation
    return max(1, min(MAX_AUTO_SLOTS, int(budget // per_row)))
