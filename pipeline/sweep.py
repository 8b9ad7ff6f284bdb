"""Choosing a layer and a coefficient: steered answers to the eval questions for every
(layer, coef) of a grid, judged for the trait and for coherence. The report names the
strongest setting up and down whose mean coherence stays at or above 50. Layers can be
pre-ranked by eval-split AUROC (cheap: no generation) to prune the grid.

Answers are stored as responses of the sweep job (side ``none``, split ``eval``) keyed by
(question, layer, coefficient index), judged like any other, so a rerun resumes."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from db import PersonaError, Store
from pipeline.jobs import JobParams, JobProgress, ProgressCallback
from vectors.errors import VectorFileError

MIN_COHERENCE = 50.0
DEFAULT_COEFS = (-2.0, -1.0, 1.0, 2.0)


@dataclass(frozen=True)
class SweepParams(JobParams):
    layers: tuple[int, ...]
    coefs: tuple[float, ...] = DEFAULT_COEFS
    n: int = 5  # eval questions
    judge: str = "openai:gpt-4.1-mini-2025-04-14"
    judge_base_url: str | None = None
    model: str | None = None
    vector: str = "response_avg_diff"
    positions: str = "response"
    max_new_tokens: int = 120
    temperature: float = 1.0
    seed: int = 0
    prune_top: int | None = None  # keep the K layers with the best eval AUROC
    device: str | None = None
    gpus: str | None = None  # one queue of answers over an engine a device (parse_gpus)
    batch_size: int | None = None  # answers decoded at once (default: what memory holds)
    compile: bool = False  # the decode step's layers compiled (GenerateParams.compile)
    deterministic: bool = False  # repeatable GPU attention (GenerateParams.deterministic)

    NOT_IDENTITY = frozenset({"gpus", "batch_size", "compile", "deterministic"})

    def validate(self) -> SweepParams:
        if not self.layers:
            raise PersonaError("--layers is empty; give a range such as 8-24 or a list 8,12,16")
        if not 1 <= self.n <= 20:
            raise PersonaError(f"--n must be between 1 and 20 eval questions (got {self.n})")
        if self.prune_top is not None and self.prune_top < 1:
            raise PersonaError(f"--prune-top must be at least 1 (got {self.prune_top})")
        if any(layer < 1 for layer in self.layers):
            raise PersonaError(
                f"--layers {list(self.layers)}: a steered layer is a block output, 1 or more"
            )
        check_coefs(self.coefs)
        if self.batch_size is not None and self.batch_size < 1:
            raise PersonaError(f"--batch-size must be at least 1 (got {self.batch_size})")
        from pipeline.judge_backends import check_judge_spec
        from pipeline.sharding import parse_gpus

        parse_gpus(self.gpus)

        check_judge_spec(self.judge)
        return self


def parse_layers(text: str) -> tuple[int, ...]:
    """ "8-24" (every layer), "8-24:4" (every fourth) or "8,12,16"; layers from 1."""
    bad = f"--layers '{text}' is not a range like 8-24[:step] or a list such as 8,12,16"
    if not text.strip():
        return ()  # SweepParams.validate says it is empty
    try:
        if "-" in text and "," not in text:
            span, _, step = text.partition(":")
            low, high = (int(x) for x in span.split("-"))
            stride = int(step) if step else 1
            if stride < 1 or high - low > MAX_LAYERS:
                raise PersonaError(bad)
            layers = tuple(range(low, high + 1, stride))
        else:
            parts = [x.strip() for x in text.split(",")]
            if not all(parts):
                raise PersonaError(bad)
            layers = tuple(int(x) for x in parts)
    except ValueError:
        raise PersonaError(bad) from None
    return layers  # SweepParams.validate checks each is a block output


# A coefficient multiplies an unnormalised difference of means: past this, the steered state
# is noise (or inf in bf16); past MAX_COEFS values, a command runs for minutes.
MAX_COEF = 1e4
MAX_COEFS = 64
MAX_LAYERS = 4096


def check_coefs(coefs: Sequence[float]) -> tuple[float, ...]:
    """Steering coefficients as sweep and steer take them: at least one, each finite with
    |c| <= MAX_COEF, at most MAX_COEFS (SweepParams.validate and parse_coefs both check
    here)."""
    if not coefs:
        raise PersonaError("--coefs is empty; give a list such as -2,-1,1,2")
    if not all(math.isfinite(c) and abs(c) <= MAX_COEF for c in coefs):
        raise PersonaError(f"--coefs needs finite numbers of size at most {MAX_COEF:g}")
    if len(coefs) > MAX_COEFS:
        raise PersonaError(f"--coefs gives {len(coefs)} values; at most {MAX_COEFS} a run")
    return tuple(coefs)


def parse_coefs(text: str) -> tuple[float, ...]:
    """Comma-separated steering coefficients (sweep --coefs, steer --coef, the dashboard's
    sweep form), checked by ``check_coefs``."""
    bad = f"--coefs '{text}' is not a comma list of numbers such as -2,2"
    parts = [part.strip() for part in text.split(",")]
    if not any(parts) or not all(parts):
        raise PersonaError(bad)
    try:
        return check_coefs(tuple(float(part) for part in parts))
    except ValueError:
        raise PersonaError(bad) from None


def format_coefs(coefs: Sequence[float]) -> str:
    """The inverse of ``parse_coefs``: -2,-1,1,2."""
    return ",".join(f"{c:g}" for c in coefs)


def create_sweep_job(store: Store, trait: str, params: SweepParams) -> int:
    from pipeline.analyze import latest_vectors

    params.validate()
    if "response_avg_diff" not in latest_vectors(store, trait):
        raise PersonaError(f"trait '{trait}' has no vectors yet; run `persona extract {trait}`")
    for job in store.list_jobs(trait=trait, kind="sweep"):
        if SweepParams.from_dict(job.params).identity() == params.identity():
            if job.params != params.to_dict():  # e.g. resumed with other --gpus
                store.update_job(job.id, params=params.to_dict())
            return job.id
    return store.create_job("sweep", trait, params.to_dict()).id


def run_sweep_job(
    store: Store, job_id: int, *, on_progress: ProgressCallback | None = None
) -> None:
    from pipeline.analyze import analyze
    from pipeline.chat import prompt_ids
    from pipeline.judge_backends import make_judge
    from pipeline.judge_scores import COHERENCE_PROMPT
    from pipeline.judging import run_judgments
    from pipeline.sharding import first_device
    from pipeline.trait_vectors import check_steered_layers, load_fitted_vector

    job = store.get_job(job_id)
    params = SweepParams.from_dict(job.params).validate()
    trait = store.get_trait(job.trait)
    # The first device --gpus names (or --device, or the default one): the model, the
    # pruning's analysis and a local judge load there.
    where = params.device or first_device(params.gpus)
    try:
        fitted = load_fitted_vector(
            store, trait.name, params.vector, model=params.model, device=where
        )
    except VectorFileError as exc:  # a job's failure message is a PersonaError's
        raise PersonaError(str(exc)) from None
    record, loaded = fitted.record, fitted.loaded
    check_steered_layers(params.layers, loaded.num_layers)
    layers = list(params.layers)
    pruned: dict[str, Any] = {}
    if params.prune_top is not None and len(layers) > params.prune_top:
        report = analyze(store, trait.name, model=record.model, device=where)
        if report.separation is not None:
            ranked = sorted(layers, key=lambda layer: -report.separation[layer].auroc)
            layers = sorted(ranked[: params.prune_top])
            pruned = {"kept": layers, "auroc": {str(x): report.separation[x].auroc for x in ranked}}
    questions = list(range(20, 20 + params.n))
    settings = [(0, 0, 0.0)] + [
        (layer, index + 1, coef) for layer in layers for index, coef in enumerate(params.coefs)
    ]
    total = len(settings) * len(questions)
    stored = store.response_keys(job_id)
    # One step per answer generated and per judgment (trait and coherence).
    progress = JobProgress(
        store, job_id, total=3 * total, done=0, unit="steps", on_progress=on_progress
    )
    progress.extra["pruned"] = pruned
    progress.start()
    prompts = {q: prompt_ids(loaded.tokenizer, None, trait.questions[q]) for q in questions}
    work = []  # (layer, coefficient index, coef, questions still unanswered)
    for layer, index, coef in settings:
        todo = [q for q in questions if (q, layer, index) not in stored]
        progress.add(len(questions) - len(todo))  # answered by an earlier run
        if todo:
            work.append((layer, index, coef, todo))
    _answer(store, job_id, params, trait, fitted, prompts, work, progress)
    judge = make_judge(params.judge, base_url=params.judge_base_url, device=where)
    templates = {"trait": trait.eval_prompt, "coherence": COHERENCE_PROMPT}
    asyncio.run(run_judgments(store, judge, job_id, templates, progress))
    table = sweep_table(store, job_id, judge.spec, params)
    progress.extra["table"] = table
    progress.extra["best"] = best_settings(table)
    progress.done = progress.total  # answers and judgments from earlier runs count too
    progress.finish("done")


def _answer(
    store: Store,
    job_id: int,
    params: SweepParams,
    trait: Any,
    fitted: Any,
    prompts: dict[int, list[int]],
    work: list[tuple[int, int, float, list[int]]],
    progress: JobProgress,
) -> None:
    """The unanswered questions of each setting (``work``), answered with ``fitted``'s model
    and vector, and stored. Every setting's answers in one queue, each row steered by its
    setting's spec (``DecodeRequest.steer``; the unsteered baseline by none): the GPU
    decodes the grid as one large batch, not a batch of --n rows a setting, with the engine
    and its CUDA graphs built once. Each answer is stored as its row finishes: a killed job
    loses only those in flight. The engines (and their caches) go when this returns, before
    the judge loads."""
    from pipeline.decoding import answer_text, response_row
    from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig
    from pipeline.local_generation import engine_slots, engine_stream, queue_devices
    from pipeline.models import fits_one_gpu, load_on_devices
    from pipeline.sampling import row_seed
    from pipeline.sharding import names_devices, worker_devices
    from vectors.steering import SteeringSpec

    record, vector, loaded = fitted.record, fitted.vector, fitted.loaded
    specs: list[SteeringSpec] = []
    requests: list[DecodeRequest] = []
    keys: list[tuple[int, int, int]] = []
    for layer, index, coef, todo in work:
        steer: tuple[int, ...] = ()
        if layer:
            specs.append(SteeringSpec(layer, vector, coef=coef, positions=params.positions))
            steer = (len(specs) - 1,)
        for q in todo:
            requests.append(DecodeRequest(prompts[q], row_seed(params.seed, q, 0, 0), steer))
            keys.append((q, layer, index))
    if not requests:
        return
    devices = worker_devices(
        params.gpus, params.device, lambda: fits_one_gpu(params.model or record.model)
    )
    # As generation's: answers that fit one device's slots stay on it unless --gpus names
    # several; the first device's copy is ``loaded`` itself (load_model reuses it).
    devices = queue_devices(devices, len(requests), names_devices(params.gpus))
    many = len(devices) > 1
    models = load_on_devices(params.model or record.model, devices) if many else [loaded]
    engines = [
        DecodeEngine(
            model, capture=False, compiled=params.compile, deterministic=params.deterministic
        )
        for model in models
    ]
    sampling = SamplingConfig(max_new_tokens=params.max_new_tokens, temperature=params.temperature)
    length = max(len(r.prompt_ids) for r in requests) + params.max_new_tokens
    slots = engine_slots(engines, length, False, params.batch_size, len(requests))
    progress.extra["slots"] = slots[0] if len(slots) == 1 else slots

    def on_check() -> None:  # a heartbeat while rows decode; a cancel seen within a check
        progress.flush()
        progress.check_cancelled()

    results = engine_stream(engines, slots, requests, sampling, on_check, steering=specs)
    # Closed on any way out: the devices' threads stop at once, not when the frame goes.
    with closing(results):
        for number, result in results:
            q, layer, index = keys[number]
            row = response_row(
                job=job_id,
                trait=trait.name,
                side="none",
                split="eval",
                key=(q, layer, index),
                question_text=trait.questions[q],
                system_prompt="",
                prompt_ids=prompts[q],
                answer_ids=result.answer_ids,
                answer=answer_text(loaded, result.answer_ids),
                finish_reason=result.finish_reason,
                model=loaded.model_id,
            )
            store.add_responses([row])
            progress.add(1)


def sweep_table(store: Store, job_id: int, judge: str, params: SweepParams) -> list[dict[str, Any]]:
    """Mean trait and coherence per (layer, coef); layer 0 is the unsteered baseline."""
    rows = store.scored_responses([job_id], judge)
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["instruction"], row["sample"]), []).append(row)
    table = []
    for (layer, index), members in sorted(cells.items()):
        traits = [m["trait"] for m in members if m["trait"] is not None]
        coherent = [m["coherence"] for m in members if m["coherence"] is not None]
        table.append(
            {
                "layer": layer,
                "coef": 0.0 if index == 0 else params.coefs[index - 1],
                "n": len(members),
                "trait": sum(traits) / len(traits) if traits else None,
                "coherence": sum(coherent) / len(coherent) if coherent else None,
            }
        )
    return table


def best_settings(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The setting that moves the trait most up (positive coef) and most down (negative),
    among those whose mean coherence stays >= 50."""
    ok = [
        r
        for r in table
        if r["layer"] and r["trait"] is not None and (r["coherence"] or 0) >= MIN_COHERENCE
    ]
    up = [r for r in ok if r["coef"] > 0]
    down = [r for r in ok if r["coef"] < 0]
    return {
        "baseline": next((r for r in table if r["layer"] == 0), None),
        "up": max(up, key=lambda r: r["trait"]) if up else None,
        "down": min(down, key=lambda r: r["trait"]) if down else None,
    }
