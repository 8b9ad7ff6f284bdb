"""``persona shift TRAIT --model M [--model M2 ...] --base B``: how far fine-tuning moved each
checkpoint along the persona vector, and whether that predicts its judged trait expression
(the paper's finetuning shift: projected shift vs expression, r = 0.76-0.97 there).

For the base and every checkpoint: answers to the trait's eval questions with no system
prompt, the same per-row seeds for every model; each answer judged for the trait and for
coherence. Per checkpoint and layer l, the mean activation shift (checkpoint minus base) on
the same tokens: the checkpoint's own prompts and answers are run through both models, and
the difference of their means is projected on the vector's row l (h . v / |v|). Two readouts:
``prompt_last`` (the last prompt token, the paper's) and ``response_avg`` (the mean over the
answer tokens). The correlation across models (the base counted, at shift 0) between each
layer's projected shift and the judged expression closes the report.

Resumable: answers are the job's responses keyed (question, model index, sample), model index
0 the base; each checkpoint's shift is written to ``NAME.data/shift/job-ID/model-K.safetensors``
once computed; judgments are asked once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from db import PersonaError, Store
from db.traits import N_QUESTIONS_PER_SPLIT
from pipeline.analyze import latest_vectors
from pipeline.jobs import JobParams, JobProgress, ProgressCallback
from pipeline.judging import DEFAULT_JUDGE
from pipeline.shift_report import READOUTS
from vectors.analysis import pearson
from vectors.files import KINDS, VectorFileError, check_fits, load_vector

EVAL_QUESTIONS = range(N_QUESTIONS_PER_SPLIT, 2 * N_QUESTIONS_PER_SPLIT)
MAX_SAMPLES = 100


@dataclass(frozen=True)
class ShiftParams(JobParams):
    NOT_IDENTITY = frozenset({"device"})

    models: tuple[str, ...]  # the fine-tuned checkpoints
    base: str
    n_per_question: int = 1
    judge: str = DEFAULT_JUDGE
    judge_base_url: str | None = None
    vector: str = "response_avg_diff"
    max_new_tokens: int = 300
    temperature: float = 1.0
    seed: int = 0
    device: str | None = None

    def validate(self) -> ShiftParams:
        from pipeline.judge_backends import check_judge_spec

        if not self.models:
            raise PersonaError("give at least one fine-tuned checkpoint with --model")
        if len(set(self.models)) != len(self.models):
            raise PersonaError(f"--model names a checkpoint twice: {list(self.models)}")
        if self.base in self.models:
            raise PersonaError(f"--base {self.base} is also a --model; compare it with others")
        if not 1 <= self.n_per_question <= MAX_SAMPLES:
            raise PersonaError(
                f"--n-per-question must be in 1..{MAX_SAMPLES} (got {self.n_per_question})"
            )
        if self.max_new_tokens < 1:
            raise PersonaError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if not self.temperature >= 0:
            raise PersonaError(f"--temperature must be >= 0 (got {self.temperature})")
        if self.vector not in KINDS:
            raise PersonaError(f"--vector must be one of {', '.join(KINDS)}, not '{self.vector}'")
        check_judge_spec(self.judge)
        return self


def create_shift_job(store: Store, trait: str, params: ShiftParams) -> int:
    """The job for these parameters: an existing one (to resume) or a new one."""
    params.validate()
    store.get_trait(trait)
    if params.vector not in latest_vectors(store, trait):
        raise PersonaError(f"trait '{trait}' has no {params.vector} vector; run `persona extract`")
    for job in store.list_jobs(trait=trait, kind="shift"):
        if ShiftParams.from_dict(job.params).identity() == params.identity():
            return job.id
    return store.create_job("shift", trait, params.to_dict()).id


def run_shift_job(
    store: Store, job_id: int, *, on_progress: ProgressCallback | None = None
) -> None:
    from pipeline.judge_backends import make_judge
    from pipeline.judge_scores import COHERENCE_PROMPT
    from pipeline.judging import run_judgments
    from pipeline.models import load_model, resolve_model

    job = store.get_job(job_id)
    params = ShiftParams.from_dict(job.params).validate()
    trait = store.get_trait(job.trait)
    base_id = resolve_model(params.base).model_id
    records = latest_vectors(store, trait.name, base_id) or latest_vectors(store, trait.name)
    if params.vector not in records:
        raise PersonaError(f"trait '{trait.name}' has no {params.vector} vector")
    vector = load_vector(Path(records[params.vector].path))[0]
    models = [params.base, *params.models]
    rows_per_model = len(EVAL_QUESTIONS) * params.n_per_question
    judgments = 2 * len(models) * rows_per_model
    progress = JobProgress(
        store,
        job_id,
        total=len(models) * rows_per_model + len(params.models) + judgments,
        unit="steps",
        on_progress=on_progress,
    )
    progress.start()
    folder = store.data_dir / "shift" / f"job-{job_id}"
    base = load_model(params.base, device=params.device)
    try:
        check_fits(vector, base.num_layers, base.hidden_size, what="the trait's vector")
    except VectorFileError as exc:  # a job's failure message is a PersonaError's
        raise PersonaError(str(exc)) from None
    _answer(store, job_id, trait, base, 0, params, progress)
    for index, spec in enumerate(params.models, 1):
        path = folder / f"model-{index}.safetensors"
        missing = _missing_keys(store, job_id, index, params)
        if not missing and path.is_file():
            progress.add(rows_per_model + 1)
            continue
        checkpoint = load_model(spec, device=params.device)
        _check_same_shape(base, checkpoint, spec)
        _answer(store, job_id, trait, checkpoint, index, params, progress)
        rows = [
            (r.prompt_ids, r.answer_ids)
            for r in store.responses(job=job_id)
            if r.instruction == index
        ]
        _save_shift(path, mean_shift(checkpoint, base, rows))
        del checkpoint
        progress.add(1)
    progress.check_cancelled()
    judge = make_judge(params.judge, base_url=params.judge_base_url, device=params.device)
    templates = {"trait": trait.eval_prompt, "coherence": COHERENCE_PROMPT}
    asyncio.run(run_judgments(store, judge, job_id, templates, progress))
    shifts = {i: _load_shift(folder / f"model-{i}.safetensors") for i in range(1, len(models))}
    table = shift_table(store, job_id, judge.spec, models, shifts, vector)
    progress.extra["table"] = table
    progress.extra["correlation"] = correlations(table)
    progress.done = progress.total
    progress.finish("done")


def _answer(
    store: Store,
    job_id: int,
    trait: Any,
    loaded: Any,
    index: int,
    params: ShiftParams,
    progress: JobProgress,
) -> None:
    """Generate this model's missing answers (no system prompt, seeds shared by all models)."""
    from pipeline.chat import prompt_ids
    from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig
    from pipeline.sampling import row_seed

    todo = sorted(_missing_keys(store, job_id, index, params))
    progress.add(len(EVAL_QUESTIONS) * params.n_per_question - len(todo))
    if not todo:
        return
    progress.check_cancelled()
    prompts = {q: prompt_ids(loaded.tokenizer, None, trait.questions[q]) for q, _ in todo}
    requests = [DecodeRequest(prompts[q], row_seed(params.seed, q, 0, s)) for q, s in todo]
    sampling = SamplingConfig(max_new_tokens=params.max_new_tokens, temperature=params.temperature)
    try:
        results = DecodeEngine(loaded, capture=False).run(requests, sampling)
    except torch.cuda.OutOfMemoryError:
        raise PersonaError(
            f"CUDA out of memory generating {len(requests)} answers at once; rerun the same "
            "command with a lower --max-new-tokens (the job resumes where it stopped)"
        ) from None
    store.add_responses(
        {
            "job": job_id,
            "trait": trait.name,
            "side": "none",
            "split": "eval",
            "question": q,
            "instruction": index,
            "sample": s,
            "question_text": trait.questions[q],
            "system_prompt": "",
            "prompt_ids": prompts[q],
            "answer_ids": r.answer_ids,
            "answer": loaded.tokenizer.decode(r.answer_ids, skip_special_tokens=True),
            "finish_reason": r.finish_reason,
            "model": loaded.model_id,
        }
        for (q, s), r in zip(todo, results, strict=True)
    )
    progress.add(len(todo))


def _missing_keys(store: Store, job_id: int, index: int, params: ShiftParams) -> set:
    stored = store.response_keys(job_id)
    return {
        (q, s)
        for q in EVAL_QUESTIONS
        for s in range(params.n_per_question)
        if (q, index, s) not in stored
    }


def _check_same_shape(base: Any, checkpoint: Any, spec: str) -> None:
    """The shift compares the two models on the same token ids: same layers, width, vocab."""
    got = (checkpoint.num_layers, checkpoint.hidden_size, len(checkpoint.tokenizer))
    want = (base.num_layers, base.hidden_size, len(base.tokenizer))
    if got != want:
        raise PersonaError(
            f"checkpoint {spec} has (layers, hidden, vocab) {got} but the base has {want}; "
            "a shift compares fine-tunes of the same base model"
        )


def mean_shift(
    checkpoint: Any, base: Any, rows: list[tuple[list[int], list[int]]]
) -> dict[str, torch.Tensor]:
    """readout -> [L+1, d]: the mean over ``rows`` (prompt ids, answer ids) of the
    checkpoint's per-row mean minus the base's, both run on the same tokens."""
    from pipeline.response_means import TOKENS_PER_BATCH, ForwardMeans

    if not rows:
        raise PersonaError("no answers to compare; the checkpoint's generation stored none")
    sums: dict[str, torch.Tensor] = {}
    for sign, loaded in ((1.0, checkpoint), (-1.0, base)):
        for _chunk, means in ForwardMeans(loaded).iter_means(rows, TOKENS_PER_BATCH):
            for readout in READOUTS:
                part = sign * means[readout].sum(0).cpu()
                sums[readout] = sums[readout] + part if readout in sums else part
    return {readout: total / len(rows) for readout, total in sums.items()}


def _save_shift(path: Path, shift: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.float().contiguous() for k, v in shift.items()}, str(tmp))
    tmp.replace(path)


def _load_shift(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def projected(shift: torch.Tensor, vector: torch.Tensor) -> list[float]:
    """Per layer, shift[l] . v[l] / |v[l]| (0 where the vector's row is zero)."""
    norms = vector.norm(dim=1)
    values = (shift * vector).sum(1) / norms.clamp(min=1e-12)
    return [0.0 if n == 0 else float(x) for x, n in zip(values, norms, strict=True)]


def shift_table(
    store: Store,
    job_id: int,
    judge: str,
    models: list[str],
    shifts: dict[int, dict[str, torch.Tensor]],
    vector: torch.Tensor,
) -> list[dict[str, Any]]:
    """One row per model (the base first): judged means and, per readout, the projected
    shift at every layer (zeros for the base)."""
    scored = store.scored_responses([job_id], judge)
    table = []
    for index, model in enumerate(models):
        mine = [r for r in scored if r["instruction"] == index]
        row: dict[str, Any] = {"model": model, "base": index == 0, "n": len(mine)}
        for metric in ("trait", "coherence"):
            values = [r[metric] for r in mine if r[metric] is not None]
            row[metric] = sum(values) / len(values) if values else None
        for readout in READOUTS:
            if index == 0:
                row[readout] = [0.0] * vector.shape[0]
            else:
                row[readout] = projected(shifts[index][readout], vector)
        table.append(row)
    return table


def correlations(table: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """readout -> per layer, Pearson's r across models between the projected shift and the
    judged trait expression (None: under 3 judged models, or no spread)."""
    judged = [row for row in table if row["trait"] is not None]
    out: dict[str, list[float | None]] = {}
    for readout in READOUTS:
        layers = len(table[0][readout]) if table else 0
        out[readout] = [
            pearson([r[readout][layer] for r in judged], [r["trait"] for r in judged])
            for layer in range(layers)
        ]
    return out
