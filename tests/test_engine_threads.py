"""One queue across several engines in one process (``--gpus`` for generation), shown with
engines on the CPU: every request taken once, the rows one engine gives, an engine's error
or the caller's stopping every engine, and the job-level paths (rows, stats, OOM message)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_model import build_tiny_model

from db import PersonaError, Store
from pipeline.chat import prompt_ids
from pipeline.engine import DecodeEngine, DecodeRequest, RequestQueue, SamplingConfig
from pipeline.engine_threads import EngineError, own_errors, stream_on_engines
from pipeline.generate import GenerateParams, find_or_create_job
from pipeline.job_devices import run_generation_jobs
from pipeline.jobs import run_job
from pipeline.models import load_model
from vectors.activations import load_consolidated

QUESTIONS = ["Hi there", "What is 2+2?", "Tell me a story about a cat.", "Why?", "Name a fruit."]


def _requests(tokenizer) -> list[DecodeRequest]:
    return [
        DecodeRequest(prompt_ids(tokenizer, None, q), seed=seed)
        for seed, q in enumerate(QUESTIONS * 3)
    ]


def test_each_request_is_taken_once_by_threads_taking_at_once() -> None:
    waiting = RequestQueue(range(5000))
    taken: list[list[int]] = [[] for _ in range(8)]

    def take(mine: list[int]) -> None:
        while batch := waiting.take(7):
            mine.extend(batch)

    threads = [threading.Thread(target=take, args=(mine,)) for mine in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [i for mine in taken for i in mine]
    assert sorted(everything) == list(range(5000)) and len(waiting) == 0
    assert waiting.take(3) == [] and waiting.waiting() == []


def test_two_engines_on_one_queue_give_the_rows_of_one_engine(tiny_model_dir: Path) -> None:
    """Each row once, with the tokens and captured means one engine gives it, whichever
    engine took it (each engine on its own copy of the model, as a device named twice)."""
    first = load_model(str(tiny_model_dir), device="cpu")
    second = load_model(str(tiny_model_dir), device="cpu", reuse=False)
    assert second.model is not first.model
    requests = _requests(first.tokenizer)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    alone = DecodeEngine(first).run(requests, sampling, slots=4)
    engines = [DecodeEngine(first), DecodeEngine(second)]
    taken = [0, 0]
    for number, engine in enumerate(engines):
        engine.stream = _counting(engine.stream, taken, number)
    results = list(stream_on_engines(engines, [3, 2], requests, sampling))
    assert sorted(index for index, _ in results) == list(range(len(requests)))
    assert all(taken) and sum(taken) == len(requests), taken
    for index, result in results:
        assert result.answer_ids == alone[index].answer_ids
        for kind, value in result.activations.items():
            torch.testing.assert_close(value, alone[index].activations[kind])


def _counting(stream, taken: list[int], number: int):
    """``stream`` counting in ``taken[number]`` the rows it yields."""

    def counted(*args, **kwargs):
        for index, result in stream(*args, **kwargs):
            taken[number] += 1
            yield index, result

    return counted


class _TakenMeanwhile(RequestQueue):
    """A queue whose rows another device's engine takes between a look and a take."""

    def take(self, count: int) -> list[int]:
        super().take(len(self))
        return []


def test_an_engine_finding_its_rows_taken_meanwhile_ends_with_none(tiny_model_dir: Path):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    requests = _requests(loaded.tokenizer)
    sampling = SamplingConfig(max_new_tokens=4)
    queue = _TakenMeanwhile(range(len(requests)))
    engine = DecodeEngine(loaded)
    assert list(engine.stream(requests, sampling, slots=4, queue=queue)) == []
    assert len(queue) == 0


class _PartlyTaken(RequestQueue):
    """A queue of which another device's engine takes all but two rows between this
    engine's look at what waits and its first take."""

    other: list[int]

    def take(self, count: int) -> list[int]:
        if not hasattr(self, "other"):
            self.other = super().take(len(self) - 2)
        return super().take(count)


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_an_engine_sizes_its_batch_to_the_rows_it_took(tiny_model_dir: Path, backend: str):
    """Both runners start with only the rows left to them (the HF runner's cache holds
    exactly the rows it starts), each row as one engine alone gives it."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    requests = _requests(loaded.tokenizer)
    sampling = SamplingConfig(max_new_tokens=6)
    alone = DecodeEngine(loaded, backend=backend).run(requests, sampling, slots=8)
    queue = _PartlyTaken(range(len(requests)))
    engine = DecodeEngine(loaded, backend=backend)
    results = dict(engine.stream(requests, sampling, slots=8, queue=queue))
    assert sorted(results) == sorted(set(range(len(requests))) - set(queue.other))
    assert len(results) == 2 and len(queue) == 0
    for index, result in results.items():
        assert result.answer_ids == alone[index].answer_ids


class _FakeEngine:
    """What ``stream_on_engines`` asks of an engine: its device and ``stream``."""

    device = torch.device("cpu")

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.steps, self.stopped = fail, 0, False

    def stream(self, requests, sampling, on_step, *, slots, steering, queue):
        try:
            while True:
                if self.fail and self.steps == 3:
                    raise RuntimeError("the device fell over")
                self.steps += 1
                on_step(self.steps)
                for index in queue.take(1):
                    yield index, f"row {index}"
                time.sleep(0.001)
        finally:
            self.stopped = True


def test_an_engines_error_stops_the_others_and_reaches_the_caller() -> None:
    engines = [_FakeEngine(), _FakeEngine(fail=True)]
    with pytest.raises(EngineError, match="the device fell over") as raised:
        list(stream_on_engines(engines, [1, 1], [None] * 10**5, SamplingConfig(4)))
    assert raised.value.index == 1 and isinstance(raised.value.error, RuntimeError)
    assert all(engine.stopped for engine in engines)


def test_own_errors_raises_an_engines_error_as_itself() -> None:
    engines = [_FakeEngine(), _FakeEngine(fail=True)]
    with pytest.raises(RuntimeError, match="the device fell over") as raised, own_errors():
        list(stream_on_engines(engines, [1, 1], [None] * 10**5, SamplingConfig(4)))
    assert not isinstance(raised.value, EngineError)
    assert raised.value.__suppress_context__  # the wrapper is not shown as its context
    assert all(engine.stopped for engine in engines)


def test_own_errors_leaves_other_errors_alone() -> None:
    with pytest.raises(KeyError), own_errors():
        raise KeyError("not an engine's")


def test_the_callers_error_stops_every_engine() -> None:
    engines = [_FakeEngine(), _FakeEngine()]

    class Cancelled(Exception):
        pass

    def cancelled() -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        for _ in stream_on_engines(
            engines, [1, 1], [None] * 10**5, SamplingConfig(4), on_idle=cancelled
        ):
            pass
    assert all(engine.stopped for engine in engines)


def test_one_job_on_two_engines_writes_the_rows_of_one_device(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """``generate --gpus cpu,cpu``: the rows and activations of the job on one device, all
    written by this process; the job says what each engine chose."""
    results = {}
    for name, extra in (("one", {"device": "cpu"}), ("two", {"gpus": "cpu,cpu"})):
        with Store(tmp_path / f"{name}.db") as store:
            params = GenerateParams(
                side="pos", model=str(tiny_model_dir), n_per_question=1, max_new_tokens=8,
                batch_size=3, **extra,
            )  # fmt: skip
            job_id = find_or_create_job(store, "paternalism", params)
            run_job(store.path, job_id)
            job = store.get_job(job_id)
            assert (job.status, job.done) == ("done", 20)
            acts = load_consolidated(Path(job.stats["activations"]))
            index = {rid: i for i, rid in enumerate(acts["response_ids"].tolist())}
            results[name] = {
                r.key: (r.answer_ids, r.answer, acts["response_avg"][index[r.id]])
                for r in store.responses(job=job_id)
            }
            results[name + " job"] = job
    assert results["two job"].stats["slots"] == {"cpu": "3 slots", "cpu#2": "3 slots"}
    assert results["one"].keys() == results["two"].keys()
    for key, (answer_ids, answer, mean) in results["one"].items():
        assert results["two"][key][:2] == (answer_ids, answer)
        torch.testing.assert_close(results["two"][key][2], mean)


def test_the_plans_jobs_on_two_engines_share_one_queue(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """``run``/``generate --side both`` on several devices: the jobs' rows in one queue over
    an engine a device, each job's rows those of one device, the jobs not pinned anywhere."""
    rows = {}
    for name, gpus in (("one", "cpu"), ("two", "cpu,cpu")):
        with Store(tmp_path / f"{name}.db") as store:
            jobs = []
            for side in ("pos", "neg"):
                params = GenerateParams(
                    side=side, model=str(tiny_model_dir), n_per_question=1, max_new_tokens=6,
                    batch_size=8,
                )  # fmt: skip
                jobs.append(find_or_create_job(store, "paternalism", params))
            messages: dict[int, list[str]] = {}
            done: dict[int, int] = {}

            def progress_for(job_id: int, messages=messages, done=done):
                def record(update) -> None:
                    messages.setdefault(job_id, []).append(update.message)
                    done[job_id] = update.done

                return record

            run_generation_jobs(store.path, jobs, gpus=gpus, on_progress=progress_for)
            assert [store.get_job(j).status for j in jobs] == ["done", "done"]
            assert done == {jobs[0]: 20, jobs[1]: 20}
            assert [store.get_job(j).params.get("gpus") for j in jobs] == [None, None]
            if name == "two":
                engines = "2 engines: cpu: 8 slots, cpu#2: 8 slots"
                assert any(engines in m for m in messages[jobs[0]])
                slots = store.get_job(jobs[0]).stats["slots"]
                assert slots == {"cpu": "8 slots", "cpu#2": "8 slots"}
            rows[name] = {(r.side, r.key): r.answer_ids for r in store.responses()}
    assert rows["one"] == rows["two"] and len(rows["one"]) == 40


def test_out_of_memory_on_one_engine_names_its_batch_size_and_the_job_resumes(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = DecodeEngine.stream
    calls = []

    def second_runs_out(self, requests, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(self, requests, *args, **kwargs)

    monkeypatch.setattr(DecodeEngine, "stream", second_runs_out)
    with Store(tmp_path / "oom.db") as store:
        params = GenerateParams(
            side="pos", model=str(tiny_model_dir), n_per_question=1, max_new_tokens=6,
            batch_size=3, gpus="cpu,cpu",
        )  # fmt: skip
        job_id = find_or_create_job(store, "paternalism", params)
        with pytest.raises(PersonaError, match=r"at --batch-size 3; rerun the same command"):
            run_job(store.path, job_id)
        assert store.get_job(job_id).status == "failed"
        monkeypatch.setattr(DecodeEngine, "stream", real)
        run_job(store.path, job_id)
        job = store.get_job(job_id)
        keys = [r.key for r in store.responses(job=job_id)]
        assert (job.status, job.done, len(keys), len(set(keys))) == ("done", 20, 20, 20)


@pytest.mark.parametrize(
    ("gpus", "slots", "sharing"),
    [(None, 4, [1]), ("cpu,cpu", {"cpu": "4 slots", "cpu#2": "4 slots"}, [2, 2])],
    ids=["default: one device", "named: both"],
)
def test_a_plan_that_fits_one_devices_slots_stays_on_one_unless_named(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    gpus: str | None,
    slots: object,
    sharing: list[int],
) -> None:
    """With every device visible (the default), a plan whose rows fit one device's slots
    runs on one (a second costs a load for a smaller batch); devices named by ``--gpus``
    are all used, and engines on one device each size their slots from their part of its
    free memory."""
    from pipeline import local_generation, sharding

    monkeypatch.setattr(sharding, "worker_devices", lambda *_args: ["cpu", "cpu"])
    asked: list[int] = []

    def four_slots(_loaded, _length, _capture, sharing: int = 1) -> int:
        asked.append(sharing)
        return 4

    monkeypatch.setattr(local_generation, "auto_slots", four_slots)
    with Store(tmp_path / "plan.db") as store:
        jobs = [
            find_or_create_job(
                store, "paternalism",
                GenerateParams(side=side, model=str(tiny_model_dir), n_per_question=1,
                               max_new_tokens=6, gpus=gpus),
            )
            for side in ("pos", "neg")
        ]  # fmt: skip
        run_generation_jobs(store.path, jobs, gpus=gpus)
        assert [store.get_job(j).stats["slots"] for j in jobs] == [slots, slots]
        assert [store.get_job(j).done for j in jobs] == [20, 20]
    assert asked == sharing


def test_long_work_stops_at_its_next_check_once_the_caller_stops() -> None:
    """``map_on_devices`` hands each item's work a ``check``: an item that works for a while
    stops at its next check when the caller is cancelled, not at its end."""
    from pipeline.engine_threads import JOIN_SECONDS, map_on_devices

    class Cancelled(Exception):
        pass

    stopped = []

    def endless(_item, check) -> None:
        try:
            while True:  # as a long decode, checking between steps
                check()
                time.sleep(0.01)
        finally:
            stopped.append(True)

    def cancel() -> None:
        raise Cancelled

    started = time.monotonic()
    with pytest.raises(Cancelled):
        list(map_on_devices([torch.device("cpu")] * 2, [endless, endless], [1, 2], on_idle=cancel))
    assert stopped == [True, True] and time.monotonic() - started < JOIN_SECONDS / 4


def test_first_device_of_a_gpus_value() -> None:
    """Where a model is first loaded for --gpus (the rest of the list loads after)."""
    from pipeline.sharding import first_device

    assert first_device(None) is None and first_device("all") is None
    assert first_device("1,0") == "cuda:1" and first_device("2") == "cuda:2"
    assert first_device("cpu,cpu") == "cpu"


def test_a_judge_over_devices_with_nothing_to_score_loads_nothing() -> None:
    from pipeline.sharded_judge import ShardedJudge

    judge = ShardedJudge("local:/no/such/model", ["cpu", "cpu"], max_concurrent=4)
    judge.score_all([], lambda *_: None, lambda: None)  # a load would fail on the bad path
    assert judge._judges == []


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")
def test_compiled_engines_in_threads_never_run_compiled_code_while_another_compiles(
    tmp_path: Path,
) -> None:
    """``--compile`` with several engines: one thread compiling its layer while another
    calls the compiled layer failed on an H200 ("FX to symbolically trace a
    dynamo-optimized function"); compiled layer calls are serialised, and each row equals
    one plain engine's."""
    import torch._dynamo

    from pipeline.models import copy_to_device

    torch._dynamo.reset()  # nothing compiled yet: both threads start by compiling
    folder = build_tiny_model(tmp_path / "model", layers=3, seed=5)
    first = load_model(str(folder), device="cpu", reuse=False)
    second = copy_to_device(first, "cpu")
    requests = _requests(first.tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    alone = DecodeEngine(first).run(requests, sampling, slots=4)
    engines = [DecodeEngine(m, compiled=True) for m in (first, second)]
    # Two threads inside compiled layers at once is what raised on the GPU: a compiled call
    # held a moment is enough to see them overlap, were the calls not serialised.
    inside, overlaps, count = [0], [], threading.Lock()

    def held(call):
        def layer(*args):
            with count:
                inside[0] += 1
                overlaps.append(inside[0] > 1)
            try:
                time.sleep(0.002)
                return call(*args)
            finally:
                with count:
                    inside[0] -= 1

        return layer

    for engine in engines:
        engine.runner._layer_call = held(engine.runner._layer_call)
    # One slot: a batch of one is a shape of its own to the compiled layer (other batch sizes
    # share one compile), so the second engine compiles a variant of its own (as an engine
    # on another GPU does) while the first runs the compiled layer.
    results = list(stream_on_engines(engines, [3, 1], requests, sampling))
    assert overlaps and not any(overlaps)
    assert sorted(index for index, _ in results) == list(range(len(requests)))
    for index, result in results:
        assert result.answer_ids == alone[index].answer_ids
        torch.testing.assert_close(
            result.activations["response_avg"], alone[index].activations["response_avg"]
        )
