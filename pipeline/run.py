"""The whole method for one trait, every step a resumable job: author (when the trait is
new), generate pos and neg on the extract and eval splits, judge the extract answers, filter,
extract, analyse. Rerunning the same command continues where it stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from db import PersonaError, Store
from pipeline.analyze import TraitReport, analyze
from pipeline.author import AuthorParams, create_author_job
from pipeline.extract import Extraction, extract
from pipeline.filter import DEFAULT_FILTER, FilterParams
from pipeline.generate import GenerateParams, find_or_create_job
from pipeline.job_devices import run_generation_jobs
from pipeline.jobs import ProgressCallback, run_job
from pipeline.judging import DEFAULT_JUDGE, JudgeParams, find_or_create_judge_job
from pipeline.sharding import parse_gpus


@dataclass(frozen=True)
class RunParams:
    trait: str
    description: str | None = None
    author: str | None = None
    model: str = "smollm2"
    judge: str = DEFAULT_JUDGE
    judge_base_url: str | None = None
    n_per_question: int = 10
    n_eval: int = 5
    all_instructions: bool = False
    max_new_tokens: int = 1000
    temperature: float = 1.0
    seed: int = 0
    batch_size: int | None = None
    threshold: float = DEFAULT_FILTER.threshold
    coherence: float = DEFAULT_FILTER.coherence
    device: str | None = None
    gpus: str | None = None  # generation, local judging, forward extraction (parse_gpus)
    compile: bool = False  # generation's decode step compiled (GenerateParams.compile)
    deterministic: bool = False  # repeatable GPU attention (GenerateParams.deterministic)


@dataclass
class RunResult:
    extraction: Extraction
    report: TraitReport


# Called with (step label, job id) before each job runs, so a display can add a bar for it.
StepCallback = Callable[[str, int], ProgressCallback | None]


@contextmanager
def _authored_while_loading(
    store: Store, author: AuthorParams, params: RunParams, step: Callable[[str, int], None]
) -> Iterator[None]:
    """Author the trait on entry while the generation model loads, where the author is an
    API (a fresh process spends about 10 s importing and loading an 8B model on an H200 host,
    and authoring takes longer): generation then finds it loaded (``load_model``'s reuse).
    A local author loads its own model here, so nothing loads beside it. On exit, any way
    out (an error while authoring or after it, a Ctrl-C), the load has ended: the process
    never ends while a thread is inside torch's loading."""
    from pipeline.models import load_in_background
    from pipeline.sharding import first_device

    job_id = create_author_job(store, author)  # a bad spec is refused before any load
    if author.author.startswith("local:"):
        step("author", job_id)
        yield
        return
    # Generation's first device: --device, else the first --gpus names (else the default).
    loading = load_in_background(params.model, params.device or first_device(params.gpus))
    try:
        step("author", job_id)
        yield
    finally:
        loading.join()


def run_trait(db_path: Path, params: RunParams, on_step: StepCallback | None = None) -> RunResult:
    def step(label: str, job_id: int) -> None:
        callback = on_step(label, job_id) if on_step is not None else None
        run_job(db_path, job_id, on_progress=callback)

    from pipeline.judge_backends import check_judge_spec

    # Before hours of generation, not after.
    check_judge_spec(params.judge)
    FilterParams(params.threshold, params.coherence).validate()
    parse_gpus(params.gpus)
    with Store(db_path) as store, ExitStack() as authored:
        if not store.has_trait(params.trait):
            if not params.description:
                raise PersonaError(
                    f"trait '{params.trait}' is new: pass --description so it can be written"
                )
            author = AuthorParams(name=params.trait, description=params.description)
            if params.author:
                author = AuthorParams(
                    name=params.trait, description=params.description, author=params.author
                )
            # Joined with the load on the way out of this block, whichever way it goes.
            authored.enter_context(_authored_while_loading(store, author, params, step))
        generation = {}
        for split, n in (("extract", params.n_per_question), ("eval", params.n_eval)):
            for side in ("pos", "neg"):
                gen = GenerateParams(
                    side=side,
                    split=split,
                    model=params.model,
                    n_per_question=n,
                    all_instructions=params.all_instructions and split == "extract",
                    temperature=params.temperature,
                    max_new_tokens=params.max_new_tokens,
                    seed=params.seed,
                    batch_size=params.batch_size,
                    device=params.device,
                    gpus=params.gpus,
                    compile=params.compile,
                    deterministic=params.deterministic,
                )
                generation[(split, side)] = find_or_create_job(store, params.trait, gen)
        labels = {
            job_id: f"generate {side}/{split}" for (split, side), job_id in generation.items()
        }

        def progress_for(job_id: int) -> ProgressCallback | None:
            return on_step(labels[job_id], job_id) if on_step is not None else None

        # The four jobs as one queue, over an engine on each GPU where there are several.
        run_generation_jobs(
            db_path, list(generation.values()), gpus=params.gpus, device=params.device,
            on_progress=progress_for,
        )  # fmt: skip
        # The filter needs scores for the extract split only; the eval split is analysed by
        # projections, which need no judge.
        for side in ("pos", "neg"):
            judge = JudgeParams(
                judge=params.judge,
                job=generation[("extract", side)],
                base_url=params.judge_base_url,
                device=params.device,
                gpus=params.gpus,
            )
            step(f"judge {side}", find_or_create_judge_job(store, params.trait, judge))
        result = extract(
            store,
            params.trait,
            threshold=params.threshold,
            coherence=params.coherence,
            pos_job=generation[("extract", "pos")],
            neg_job=generation[("extract", "neg")],
            device=params.device,
            gpus=params.gpus,
        )
        report = analyze(store, params.trait, model=result.model, device=params.device)
    return RunResult(result, report)
