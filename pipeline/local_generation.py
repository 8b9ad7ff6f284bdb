"""Generation with a local model: the decode engine in this process, on one device, or an
engine a device (``--gpus``), each in its own thread and all taking rows from one queue
(``pipeline.engine_threads``), with this process writing every row.

Rows are written in groups as they finish, activations first, so a killed job loses at most
the rows in flight, and a rerun of the same command resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from db import PersonaError, Store
from db.traits import N_PAIRS
from pipeline.generate import GenerateParams, JobShare, RowKey, _row
from pipeline.models import GPU_RESERVE
from pipeline.response_means import activations_dir
from pipeline.sampling import row_seed
from pipeline.sharding import names_devices, single_device, worker_devices
from vectors import activations

# Without --batch-size, slots come from free GPU memory, at most this many: past it a step's
# attention over every slot's cache costs more than the extra rows bring.
MAX_AUTO_SLOTS = 256
# On a CPU a step is compute-bound: 64 slots generated the demo's rows 1.18x faster than 32,
# and 128 no faster than 64 (SmolLM2-135M, 2 cores, 2026-11-30).
MAX_AUTO_SLOTS_CPU = 64
_MEMINFO = "/proc/meminfo"
# (limit, usage) files of a container's memory: cgroup v2, then v1.
_CGROUP_MEMORY = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def generate_local(store: Store, share: JobShare) -> None:
    """One job's missing rows by the local model: on one device, or on one engine per GPU
    (``--gpus``) when the rows are more than one GPU's slots."""
    from pipeline.models import fits_one_gpu

    params = share.params
    devices = worker_devices(params.gpus, params.device, lambda: fits_one_gpu(params.model))
    generate_local_jobs(store, [share], devices, named=names_devices(params.gpus))


def generate_local_jobs(
    store: Store, shares: Sequence[JobShare], devices: Sequence[str] = (), *, named: bool = False
) -> None:
    """Several jobs' missing rows in one queue (the jobs share model, device and sampling): a
    slot freed by one job's row takes the next row of any of them, so the plan's jobs
    together take little longer than their longest answer. On one device (``devices``
    empty: the job's own) through one engine; on several, through an engine each, in
    threads, all taking from that one queue; unless ``named`` (by ``--gpus``), rows that
    fit one device's slots stay on the first. Each job's rows are written to it as they
    finish."""
    from pipeline.engine import DecodeEngine, DecodeRequest
    from pipeline.models import load_on_devices

    params = shares[0].params
    devices = queue_devices(devices, sum(len(share.pending) for share in shares), named)
    for share in shares:
        _loading(share)
    started = time.perf_counter()
    places = list(devices) or [params.device or single_device(params.gpus)]
    # Built before the slots are counted: their fused projections take memory first.
    engines = [
        DecodeEngine(
            loaded,
            capture=params.capture,
            compiled=params.compile,
            deterministic=params.deterministic,
        )
        for loaded in load_on_devices(params.model, places)
    ]
    # In the job's stats: where a run's time went (load, then decode with its writes).
    for share in shares:
        share.progress.extra["load_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    loaded = engines[0].loaded
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    writers = [_JobWriter(store, s, loaded.tokenizer, loaded.model_id, context) for s in shares]
    # Similar lengths side by side pad least; seeds make the order irrelevant to the tokens.
    rows = sorted(
        (len(prompt), number, key, prompt, seed)
        for number, writer in enumerate(writers)
        for key, prompt, seed in writer.rows
    )
    requests = [DecodeRequest(prompt, seed) for _, _, _, prompt, seed in rows]
    for index, result in _engine_results(params, requests, engines, shares, writers):
        _length, number, key, _prompt, _seed = rows[index]
        writers[number].finished.append((key, result))
    for writer in writers:
        writer.write()
    for share in shares:
        share.progress.extra["generate_s"] = round(time.perf_counter() - started, 1)


def _loading(share: JobShare) -> None:
    share.progress.message = f"loading {share.params.model}"
    share.progress.flush(force=True)


def _sampling(params: GenerateParams) -> Any:
    from pipeline.engine import SamplingConfig

    return SamplingConfig(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        ignore_eos=params.ignore_eos,
    )


class _JobWriter:
    """One job's prompts and the writing of its finished rows: activations first, then the
    rows, in groups, so a killed job loses at most the rows in flight."""

    def __init__(
        self,
        store: Store,
        share: JobShare,
        tokenizer: Any,
        model_id: str,
        context: int | None,
    ) -> None:
        from pipeline.chat import prompt_ids

        params, trait = share.params, share.trait
        self.store, self.share, self.tokenizer, self.model_id = store, share, tokenizer, model_id
        self.systems = {i: trait.system_prompt(params.side, i) for i in range(N_PAIRS)}
        prompts = {
            key: prompt_ids(tokenizer, self.systems[key[1]], trait.questions[key[0]])
            for key in share.pending
        }
        self.prompts = prompts
        ordered = sorted(share.pending, key=lambda k: (len(prompts[k]), k))
        longest = max(len(prompts[k]) for k in ordered)
        if context and longest + params.max_new_tokens > context:
            raise PersonaError(
                f"--max-new-tokens {params.max_new_tokens} plus the longest prompt ({longest} "
                f"tokens) is past {model_id}'s context of {context} tokens; give at most "
                f"--max-new-tokens {max(1, context - longest)}"
            )
        # (key, prompt ids, seed), shortest prompts first.
        self.rows = [(k, prompts[k], row_seed(params.seed, *k)) for k in ordered]
        self.folder = activations_dir(store, share.job_id)
        self.finished: list[tuple[RowKey, Any]] = []

    def write(self) -> None:
        """Rows that finished since the last write: their activations, then the rows."""
        if not self.finished:
            return
        share, params = self.share, self.share.params
        keys = [key for key, _ in self.finished]
        results = [result for _, result in self.finished]
        if params.capture:
            stacked = {
                kind: torch.stack([r.activations[kind] for r in results])
                for kind in activations.KINDS
            }
            lengths = [len(r.answer_ids) for r in results]
            try:
                activations.write_shard(self.folder, keys, stacked, lengths)
            except activations.ActivationFileError as exc:  # those rows are not stored
                raise PersonaError(str(exc)) from None
        rows = [
            _row(
                share.job_id,
                share.trait,
                params,
                key,
                self.systems[key[1]],
                self.prompts[key],
                result.answer_ids,
                self.tokenizer.decode(result.answer_ids, skip_special_tokens=True),
                result.finish_reason,
                self.model_id,
            )
            for key, result in self.finished
        ]
        self.store.add_responses(rows)
        share.progress.add(len(rows), new_tokens=sum(len(r.answer_ids) for r in results))
        self.finished.clear()

    def write_and_check(self, group: int) -> None:
        # A cancel is seen within one host check (or one poll of the workers).
        if len(self.finished) >= group:
            self.write()
        self.share.progress.flush()
        self.share.progress.check_cancelled()


def _engine_results(params, requests, engines, shares, writers) -> Iterator:
    length = max(len(r.prompt_ids) for r in requests) + params.max_new_tokens
    slots = engine_slots(engines, length, params.capture, params.batch_size, len(requests))
    # How the slots were chosen, said once in the message (as the first engine chose them).
    if params.batch_size:
        how = "--batch-size"
    elif engines[0].device.type == "cuda":
        how = "chosen from free GPU memory"
    else:
        how = "chosen from free memory" if _available_memory() else "CPU default"
    others = {s.job_id: [o.job_id for o in shares if o is not s] for s in shares}
    model_id = engines[0].loaded.model_id
    if len(engines) == 1:
        stats: Any = slots[0]
        where = f"{slots[0]} slots, {how}"
    else:
        stats = {}
        for engine, count in zip(engines, slots, strict=True):
            name = str(engine.device)
            # A device named twice runs two engines: cuda:0, then cuda:0#2.
            repeat = sum(key.split("#")[0] == name for key in stats)
            stats[f"{name}#{repeat + 1}" if repeat else name] = f"{count} slots"
        listed = ", ".join(f"{engine}: {text}" for engine, text in stats.items())
        where = f"{len(engines)} engines: {listed}, {how}"
    for share in shares:
        share.progress.extra["slots"] = stats
        shared = f"; one queue with job {', '.join(map(str, others[share.job_id]))}"
        share.progress.message = (
            f"generating with {model_id} ({where}{shared if others[share.job_id] else ''})"
        )
        share.progress.flush(force=True)
    # Rows are written in groups of a quarter of one engine's slots.
    group = max(1, max(slots) // 4)

    def on_check() -> None:
        for writer in writers:
            writer.write_and_check(group)

    yield from engine_stream(engines, slots, requests, _sampling(params), on_check)


def queue_devices(devices: Sequence[str], rows: int, named: bool) -> Sequence[str]:
    """The devices a queue of ``rows`` runs on: ``devices``, unless they were not named by
    ``--gpus`` and the rows fit one device's slots: then none (the job's own one). A second
    GPU would halve the batch but cost a model load and its memory."""
    return devices if named or rows > MAX_AUTO_SLOTS else ()


def engine_slots(
    engines: Sequence[Any], length: int, capture: bool, batch_size: int | None, rows: int
) -> list[int]:
    """Rows each engine decodes at once: ``batch_size`` where given, else as many as its
    device's free memory holds for rows of ``length`` tokens (``auto_slots``; engines on
    one device share it), never more than its even share of the ``rows`` to decode (or the
    first engine to take from the queue would take them all)."""
    share = -(-rows // len(engines))
    slots = []
    for engine in engines:
        # Engines on one device share its free memory (none has its cache yet).
        sharing = sum(other.device == engine.device for other in engines)
        count = batch_size or auto_slots(engine.loaded, length, capture, sharing=sharing)
        slots.append(min(count, share))
    return slots


def engine_stream(
    engines: Sequence[Any],
    slots: Sequence[int],
    requests: Sequence[Any],
    sampling: Any,
    on_check: Callable[[], None],
    *,
    steering: Sequence[Any] = (),
) -> Iterator[tuple[int, Any]]:
    """(request index, result) as rows finish: one engine's stream, or one queue over
    several engines in threads (``stream_on_engines``); ``on_check()`` runs at each host
    check (one engine) or between results (several). A CUDA out-of-memory ends in the
    one-line message naming the ``--batch-size`` of the engine that ran out."""
    from pipeline.engine_threads import EngineError, stream_on_engines

    try:
        if len(engines) == 1:
            yield from engines[0].stream(
                requests, sampling, lambda _steps: on_check(), slots=slots[0], steering=steering
            )
        else:
            yield from stream_on_engines(
                engines, slots, requests, sampling, on_idle=on_check, steering=steering
            )
    except torch.cuda.OutOfMemoryError:
        raise PersonaError(out_of_memory_message(slots[0])) from None
    except EngineError as exc:
        if isinstance(exc.error, torch.cuda.OutOfMemoryError):
            raise PersonaError(out_of_memory_message(slots[exc.index])) from None
        raise exc.error from None


def out_of_memory_message(slots: int) -> str:
    return (
        f"CUDA out of memory at --batch-size {slots}; rerun the same command with "
        "a lower --batch-size (the job resumes where it stopped)"
    )


def auto_slots(loaded: Any, length: int, capture: bool, sharing: int = 1) -> int:
    """Rows decoded at once when ``--batch-size`` is not given: as many as the free memory
    holds (KV cache of ``length`` tokens and capture buffers a row); on a GPU after a reserve
    for prefill activations, at most ``MAX_AUTO_SLOTS``; on a CPU in half the available
    memory, at most ``MAX_AUTO_SLOTS_CPU`` (8 where the available memory is unknown).
    ``sharing``: engines about to take their caches from the same memory, each its part."""
    config = loaded.model.config
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    width = loaded.model.get_input_embeddings().weight.element_size()
    # + 65: the engine rounds the length up to 64 columns and keeps one more (StaticRunner).
    per_row = 2 * layers * kv_heads * head_dim * (length + 65) * width
    per_row += 4 * int(config.vocab_size) * 4  # logits and sampling, fp32
    if capture:
        per_row += 3 * (layers + 1) * int(config.hidden_size) * 4
    if loaded.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(loaded.device)
        budget = free - GPU_RESERVE * total
        most = MAX_AUTO_SLOTS
    else:
        available = _available_memory()
        if available is None:
            return 8
        budget = available / 2  # the rest: prefill activations, the judge, other processes
        most = MAX_AUTO_SLOTS_CPU
    return max(1, min(most, int(budget / sharing // per_row)))


def _available_memory() -> int | None:
    """Bytes of host memory available to new work: Linux's MemAvailable, or less where a
    container's memory limit (cgroup v2, else v1) leaves less; None if unknown."""
    available = None
    try:
        with open(_MEMINFO) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        return None
    for limit, usage in _CGROUP_MEMORY:
        try:
            with open(limit) as cap_file, open(usage) as used_file:
                cap, used = cap_file.read().strip(), used_file.read().strip()
        except OSError:
            continue
        if cap.isdigit() and used.isdigit() and available is not None:
            available = min(available, max(0, int(cap) - int(used)))
        break
    return available
