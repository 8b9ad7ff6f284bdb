"""The judging job: every response of a trait (or of one generation job) scored for each
metric by one judge, with bounded concurrency, a request cache shared across jobs, progress
(judgments/s, tokens, cost, errors) and resume: a rerun asks only what has no judgment yet or
failed last time. A job may instead judge a few named responses again (one pair, from the
review screen), asking the judge afresh and keeping the old judgment until a new one exists."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import queue as queue_module
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from db import PersonaError, Store
from db.store import Response
from db.traits import TraitDefinition, fill_judge_template
from pipeline.api_clients import JudgeFatalError, redact_keys
from pipeline.jobs import JobParams, JobProgress, ProgressCallback
from pipeline.judge_backends import check_judge_spec, estimate_cost, load_prices, make_judge
from pipeline.judge_scores import COHERENCE_PROMPT, Judge, JudgeResult
from pipeline.sharded_judge import ShardedJudge, sharded_judge
from pipeline.sharding import parse_gpus, single_device

DEFAULT_JUDGE = "openai:gpt-4.1-mini-2025-04-14"
METRICS = ("trait", "coherence")
# Results are written in one transaction every FLUSH_SECONDS (or FLUSH_EVERY results): a
# commit costs the same for 10 rows as for 500, and a kill loses at most this much.
FLUSH_EVERY = 512
FLUSH_SECONDS = 0.5
# Default client processes: one SDK process keeps about 8 requests in flight at full rate
# (docs/benchmarks.md: 64 in flight reached 0.8 of ideal with 8 processes, 0.41 with one);
# a job of fewer requests than this runs in one process (starting one costs about a second).
IN_FLIGHT_PER_PROCESS = 8
MIN_REQUESTS_FOR_PROCESSES = 200


@dataclass(frozen=True)
class JudgeParams(JobParams):
    # Where the judge is served is not what the job is: a rerun with another --base-url
    # (a restarted server) resumes the same job.
    NOT_IDENTITY = frozenset(
        {"max_concurrent", "device", "prices", "timeout_s", "processes", "base_url", "gpus"}
    )

    judge: str = DEFAULT_JUDGE
    metrics: tuple[str, ...] = METRICS
    job: int | None = None
    max_concurrent: int = 50
    base_url: str | None = None
    samples: int = 1
    prices: str | None = None
    device: str | None = None
    timeout_s: float = 60.0  # one request; a timeout is retried like a 5xx
    # Client processes for an API judge: one process's SDK tops out near 500 requests/s.
    # None: chosen from max_concurrent, the cores and the work (``client_processes``).
    processes: int | None = None
    gpus: str | None = None  # a local judge's devices (pipeline.sharding.parse_gpus)
    # Judge exactly these responses again, every metric, whatever they hold: the request
    # cache is not read (a fresh answer is the point), and a failed request leaves the
    # judgment it would have replaced. Empty: the usual job, what has no judgment yet.
    responses: tuple[int, ...] = ()

    def validate(self) -> JudgeParams:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            given = ",".join(self.metrics)
            raise PersonaError(
                f"--metrics takes a comma list of trait and coherence, got '{given}'"
            )
        if self.max_concurrent < 1:
            raise PersonaError(f"--max-concurrent must be at least 1 (got {self.max_concurrent})")
        if self.samples < 1:
            raise PersonaError(f"--samples must be at least 1 (got {self.samples})")
        if self.processes is not None and self.processes < 1:
            raise PersonaError(f"--processes must be at least 1 (got {self.processes})")
        if (self.processes or 1) > 1 and self.judge.startswith("local:"):
            raise PersonaError("--processes is for API judges; a local judge runs in one process")
        if not self.timeout_s > 0:
            raise PersonaError(
                f"--timeout must be a positive number of seconds (got {self.timeout_s})"
            )
        if ":" not in self.judge:
            raise PersonaError(
                f"--judge '{self.judge}' must be KIND:MODEL, e.g. {DEFAULT_JUDGE} or local:smollm2"
            )
        check_judge_spec(self.judge)
        parse_gpus(self.gpus)
        if any(not isinstance(r, int) or r < 1 for r in self.responses):
            raise PersonaError("responses to judge again are response ids (whole numbers >= 1)")
        return self

    @property
    def spec(self) -> str:
        """The judge as its judgments name it (an Anthropic judge's samples included)."""
        if self.judge.startswith("anthropic:") and self.samples > 1:
            return f"{self.judge}@k{self.samples}"
        return self.judge

    def client_processes(self, requests: int) -> int:
        """``processes`` when given; else, for an API judge, one process per
        ``IN_FLIGHT_PER_PROCESS`` requests in flight, at most one per core, and one while
        the job is too small to repay starting them."""
        if self.processes is not None:
            return self.processes
        if self.judge.startswith("local:") or requests < MIN_REQUESTS_FOR_PROCESSES:
            return 1
        wanted = -(-self.max_concurrent // IN_FLIGHT_PER_PROCESS)
        return max(1, min(wanted, os.cpu_count() or 1))


def find_or_create_judge_job(store: Store, trait: str, params: JudgeParams) -> int:
    params.validate()
    store.get_trait(trait)
    if params.judge.startswith("local:"):  # a bad model folder fails before a job row exists
        from pipeline.models import resolve_model, split_precision

        resolve_model(split_precision(params.judge.partition(":")[2])[0])
    if params.job is not None:
        source = store.get_job(params.job)
        if source.kind != "generate" or source.trait != trait:
            raise PersonaError(f"job {params.job} is not a generation job of trait '{trait}'")
    for response in store.responses_by_id(list(params.responses)):
        if response.trait != trait:
            raise PersonaError(f"response {response.id} is not one of trait '{trait}'")
    for job in store.list_jobs(trait=trait, kind="judge"):
        if JudgeParams.from_dict(job.params).identity() == params.identity():
            if job.status in ("done", "failed", "cancelled"):
                store.update_job(job.id, params=params.to_dict(), status="pending")
            return job.id
    return store.create_job("judge", trait, params.to_dict()).id


def rejudge_params(
    store: Store, trait: str, judge: str, responses: list[int] | tuple[int, ...]
) -> JudgeParams:
    """The judge step that asks ``judge`` (as the judgments name it) again about these
    responses, for both metrics, served as the trait's last job with that judge was (its
    base URL, prices, device); a judge that cannot be asked (imported scores) is refused."""
    for job in reversed(store.list_jobs(trait=trait, kind="judge")):
        params = JudgeParams.from_dict(job.params)
        if params.spec == judge:
            return replace(params, job=None, metrics=METRICS, responses=tuple(responses)).validate()
    spec, _, k = judge.partition("@k")
    try:
        return JudgeParams(
            judge=spec, samples=int(k) if k.isdigit() else 1, responses=tuple(responses)
        ).validate()
    except PersonaError:
        raise PersonaError(
            f"the scores are by '{judge}', which cannot be asked again; judge the trait with "
            "a judge (screen 2, J) first"
        ) from None


@dataclass(frozen=True)
class JudgingEstimate:
    requests: int
    cost: float | None  # dollars; None when the judge's model has no price


def estimate_judging(store: Store, trait: str, params: JudgeParams) -> JudgingEstimate:
    """What a judge job would ask, before it runs (the cost from the price table)."""
    _, tasks = judge_tasks(store, store.get_trait(trait), params)
    prompts = [prompt for _, _, prompt in tasks]
    cost = estimate_cost(
        params.judge, prompts, prices=load_prices(params.prices), samples=params.samples
    )
    return JudgingEstimate(len(prompts), cost)


def judge_tasks(
    store: Store, trait: TraitDefinition, params: JudgeParams, spec: str | None = None
) -> tuple[list[Response], list[tuple[int, str, str]]]:
    """(responses in the job's scope, the (response id, metric, prompt) still to ask of the
    judge named ``spec``, by default the one ``params`` names)."""
    templates = {"trait": trait.eval_prompt, "coherence": COHERENCE_PROMPT}
    if params.responses:
        scope = store.responses_by_id(list(params.responses))
        to_ask = {metric: scope for metric in params.metrics}
    else:
        scope = store.responses(trait=trait.name, job=params.job)
        to_ask = {
            metric: store.responses_to_judge(
                trait=trait.name, metric=metric, judge=spec or params.spec, job=params.job
            )
            for metric in params.metrics
        }
    tasks = [
        (r.id, metric, fill_judge_template(templates[metric], r.question_text, r.answer))
        for metric, responses in to_ask.items()
        for r in responses
    ]
    return scope, tasks


def cache_key(judge_spec: str, prompt: str) -> str:
    """One key per (judge model, filled template): the template, question and answer are all
    in the prompt, so identical requests share it across jobs."""
    return hashlib.sha256(f"{judge_spec}\0{prompt}".encode()).hexdigest()


def run_judge_job(
    store: Store,
    job_id: int,
    *,
    on_progress: ProgressCallback | None = None,
    judge: Judge | None = None,
) -> None:
    job = store.get_job(job_id)
    params = JudgeParams.from_dict(job.params).validate()
    trait = store.get_trait(job.trait)
    judge_kwargs = {
        "spec": params.judge,
        "base_url": params.base_url,
        "prices_path": params.prices,
        "samples": params.samples,
        # --gpus 1: a local judge on GPU 1 alone.
        "device": params.device or single_device(parse_gpus(params.gpus)),
        "timeout_s": params.timeout_s,
    }
    if judge is None:
        gpus = parse_gpus(params.gpus)
        judge = sharded_judge(params.judge, gpus, params.device, params.max_concurrent)
        judge = judge or make_judge(**judge_kwargs)
    scope, tasks = judge_tasks(store, trait, params, judge.spec)
    total = len(scope) * len(params.metrics)
    progress = JobProgress(
        store,
        job_id,
        total=total,
        done=total - len(tasks),
        unit="judgments",
        on_progress=on_progress,
    )
    progress.start()
    progress.counters.update(tokens=0, cost=0.0, errors=0, cached=0)
    count = params.client_processes(len(tasks))
    progress.extra["processes"] = count
    processes = (judge_kwargs, count) if count > 1 else None
    asyncio.run(
        _judge_all(
            store,
            judge,
            tasks,
            params.max_concurrent,
            progress,
            processes,
            again=bool(params.responses),
        )
    )
    errors = int(progress.counters.get("errors", 0))
    message = f"{errors} judgments failed; rerun to retry them" if errors else ""
    progress.extra["counts"] = {
        m: store.count_judgments(trait=trait.name, metric=m, judge=judge.spec)
        for m in params.metrics
    }
    progress.finish("done", message)


async def run_judgments(
    store: Store,
    judge: Judge,
    job_id: int,
    templates: dict[str, str],
    progress: JobProgress,
    max_concurrent: int = 16,
) -> None:
    """Judge every response of one job for each metric in ``templates`` (for steps that
    judge their own answers, like the sweep); progress counts one step a judgment."""
    job = store.get_job(job_id)
    tasks = []
    for metric, template in templates.items():
        for response in store.responses_to_judge(
            trait=job.trait, metric=metric, judge=judge.spec, job=job_id
        ):
            prompt = fill_judge_template(template, response.question_text, response.answer)
            tasks.append((response.id, metric, prompt))
    await _judge_all(store, judge, tasks, max_concurrent, progress)


async def _judge_all(
    store: Store,
    judge: Judge,
    tasks: list[tuple[int, str, str]],
    max_concurrent: int,
    progress: JobProgress,
    processes: tuple[dict[str, Any], int] | None = None,
    *,
    again: bool = False,
) -> None:
    """Score ``tasks`` (response id, metric, prompt), cached ones first, writing results in
    batches; ``processes`` = (make_judge arguments, count) spreads the requests over that
    many client processes. ``again``: judging anew, so no cached answer is used and a
    failed request writes nothing (the judgment it would replace stays)."""
    keys = [] if again else [cache_key(judge.spec, p) for _, _, p in tasks]
    cached = store.cached_judge_results(keys)
    buffer: list[tuple[int, str, str, JudgeResult, bool]] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if not buffer:
            return
        rows = [
            {
                "response": rid,
                "metric": metric,
                "judge": judge.spec,
                "score": r.score,
                "evidence": r.evidence,
                "error": r.error,
                "tokens": r.tokens,
                "cost": r.cost,
            }
            for rid, metric, _, r, _ in buffer
            if not (again and r.error is not None)
        ]
        fresh = [
            {
                "key": cache_key(judge.spec, prompt),
                "judge": judge.spec,
                "score": r.score,
                "evidence": r.evidence,
                "tokens": r.tokens,
                "cost": r.cost,
            }
            for _, _, prompt, r, from_cache in buffer
            if r.error is None and not from_cache
        ]
        with store.transaction():
            store.add_judgments(rows)
            if fresh:
                store.cache_judge_results(fresh)
        progress.add(
            len(buffer),
            tokens=sum(r.tokens for *_, r, c in buffer if not c),
            cost=sum(r.cost for *_, r, c in buffer if not c),
            errors=sum(r.error is not None for *_, r, _ in buffer),
            cached=sum(c for *_, c in buffer),
        )
        buffer.clear()
        last_flush = time.monotonic()

    to_ask = []
    # In prompt order: neighbours share the template and often the question, which a local
    # judge reuses from its cache.
    for rid, metric, prompt in sorted(tasks, key=lambda t: (t[1], t[2])):
        hit = cached.get(cache_key(judge.spec, prompt))
        if hit is None:
            to_ask.append((rid, metric, prompt))
            continue
        result = JudgeResult(hit["score"], hit["evidence"], 0, 0.0)
        buffer.append((rid, metric, prompt, result, True))
    flush()

    def collect(rid: int, metric: str, prompt: str, result: JudgeResult) -> None:
        buffer.append((rid, metric, prompt, result, False))
        if len(buffer) >= FLUSH_EVERY or time.monotonic() - last_flush > FLUSH_SECONDS:
            flush()
            progress.check_cancelled()

    if isinstance(judge, ShardedJudge):

        def flush_when_due() -> None:
            if time.monotonic() - last_flush > FLUSH_SECONDS:
                flush()
                progress.check_cancelled()

        try:
            judge.score_all(to_ask, collect, flush_when_due)
        finally:
            flush()
        return

    if processes is not None and len(to_ask) > 1:
        try:
            await _score_in_processes(*processes, to_ask, max_concurrent, collect)
        finally:
            flush()
            await judge.aclose()
        return

    limit = asyncio.Semaphore(max_concurrent)

    async def one(rid: int, metric: str, prompt: str) -> None:
        async with limit:
            result = await judge.score_prompt(prompt)
        collect(rid, metric, prompt, result)

    pending = [asyncio.ensure_future(one(*task)) for task in to_ask]
    try:
        await asyncio.gather(*pending)
    except BaseException:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise
    finally:
        flush()  # whatever came back is kept, whatever the ending
        await judge.aclose()


# ---- client processes ---------------------------------------------------------------------
Task = tuple[int, str, str]  # (response id, metric, prompt)
_SEND_EVERY_S = 0.02


async def _score_in_processes(
    judge_kwargs: dict[str, Any],
    count: int,
    tasks: list[Task],
    max_concurrent: int,
    collect: Callable[[int, str, str, JudgeResult], None],
) -> None:
    """Split ``tasks`` over ``count`` spawned client processes (max_concurrent in flight in
    all) and hand each result to ``collect`` here, where the database is written."""
    count = min(count, len(tasks), max_concurrent)  # each process keeps one in flight at least
    # Forked: a spawned child spends a second importing the SDK, as long as judging 1,000
    # requests takes. A forked child touches neither SQLite nor torch nor the parent's
    # event loop (asyncio ignores a running loop of another pid): it makes its own client.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    results = context.Queue()
    limits = [max_concurrent // count + (i < max_concurrent % count) for i in range(count)]
    children = [
        context.Process(
            target=_client_process,
            args=(judge_kwargs, tasks[i::count], limits[i], results, os.getpid()),
            daemon=True,
        )
        for i in range(count)
    ]
    with warnings.catch_warnings():
        # Python 3.12+ warns on fork() in a threaded process (here: the heartbeat thread,
        # which holds no lock the child uses).
        warnings.simplefilter("ignore", DeprecationWarning)
        for child in children:
            child.start()
    loop = asyncio.get_running_loop()
    running = count

    def handle(message: tuple[str, Any]) -> None:
        nonlocal running
        kind, payload = message
        if kind == "results":
            for rid, metric, prompt, result in payload:
                collect(rid, metric, prompt, result)
        elif kind == "done":
            running -= 1
        elif kind == "fatal":
            raise JudgeFatalError(payload)
        else:
            raise RuntimeError(f"a judge client process failed: {payload}")

    def drain() -> None:
        """Whatever is already queued: results paid for are kept, even on the way out."""
        while True:
            try:
                message = results.get_nowait()
            except queue_module.Empty:
                return
            with contextlib.suppress(JudgeFatalError, RuntimeError):
                handle(message)

    try:
        while running:
            try:
                message = await loop.run_in_executor(None, results.get, True, 1.0)
            except queue_module.Empty:
                if not any(child.is_alive() for child in children):
                    drain()  # the last words may have come between the two checks
                    if running:
                        raise RuntimeError("a judge client process died without a word") from None
                continue
            try:
                handle(message)
            except BaseException:
                drain()
                raise
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
            child.join(timeout=5)


def _client_process(
    judge_kwargs: dict[str, Any],
    tasks: list[Task],
    limit: int,
    results: Any,
    parent: int,
) -> None:
    """One client process: score its share of the tasks, sending results back in small
    batches; it stops when its parent is gone (a killed job must not keep spending)."""

    def put(message: tuple[str, Any]) -> None:
        if os.getppid() != parent:
            os._exit(1)  # nobody reads the results any more
        results.put(message)

    async def main() -> None:
        judge = make_judge(**judge_kwargs)
        gate = asyncio.Semaphore(limit)
        out: list[tuple[int, str, str, JudgeResult]] = []
        sent = time.monotonic()

        def send() -> None:
            nonlocal sent
            if out:
                put(("results", list(out)))
                out.clear()
            sent = time.monotonic()

        async def one(rid: int, metric: str, prompt: str) -> None:
            async with gate:
                if os.getppid() != parent:
                    os._exit(1)
                result = await judge.score_prompt(prompt)
            out.append((rid, metric, prompt, result))
            if time.monotonic() - sent > _SEND_EVERY_S:
                send()

        try:
            await asyncio.gather(*(one(*task) for task in tasks))
        finally:
            send()
            await judge.aclose()

    try:
        asyncio.run(main())
    except JudgeFatalError as exc:
        put(("fatal", str(exc)))
    except BaseException as exc:  # reported to the parent, which fails the job
        put(("error", redact_keys(f"{type(exc).__name__}: {exc}")))
    else:
        put(("done", None))
    # Wait for the queue's feeder thread to hand everything over, but not for a parent that
    # died meanwhile: its pipe would stay full and this process would never exit.
    results.close()
    flusher = threading.Thread(target=results.join_thread, daemon=True)
    flusher.start()
    while flusher.is_alive():
        flusher.join(0.5)
        if os.getppid() != parent:
            os._exit(1)
