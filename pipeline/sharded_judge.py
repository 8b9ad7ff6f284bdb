"""A local judge across devices (``--gpus``): a copy of the judge model a device, each
scoring in its own thread of this process (``engine_threads.run_in_threads``) the next
waiting prompts, batched as one device batches them; this process writes every judgment.
Threads, not worker processes: a fresh process spends about 11 s importing torch and
transformers on a GPU host (``tests/bench/profile_workers.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.judge_scores import Judge, JudgeResult
from pipeline.sharding import worker_devices

Task = tuple[int, str, str]  # (response id, metric, prompt)


class ShardedJudge(Judge):
    """Stands for a ``local:`` judge whose model lives in the workers: it carries the spec
    that judgments record and scores whole task lists (``score_all``), not one prompt."""

    def __init__(self, spec: str, devices: Sequence[str], max_concurrent: int) -> None:
        self.spec = spec
        self.devices = list(devices)
        self.max_concurrent = max_concurrent
        self._judges: list[Any] = []  # a LocalJudge a device, loaded at the first score_all

    async def score_prompt(self, prompt: str) -> JudgeResult:
        raise TypeError("a judge over several devices scores task lists: use score_all")

    def score_all(
        self,
        tasks: Sequence[Task],
        collect: Callable[[int, str, str, JudgeResult], None],
        on_idle: Callable[[], None],
    ) -> None:
        """Score every task, calling ``collect(response id, metric, prompt, result)`` in this
        thread as results come; ``on_idle`` runs here between them."""
        from pipeline.engine import RequestQueue
        from pipeline.engine_threads import own_errors, run_in_threads

        if not tasks:  # nothing to score: no copy loaded
            return
        judges = self._load(len(tasks))
        waiting = RequestQueue(range(len(tasks)))

        def body(judge: Any) -> Callable[..., None]:
            def run(emit: Callable[[int, Any], None], check: Callable[[], None]) -> None:
                async def score_next() -> None:
                    while taken := waiting.take(1):
                        check()
                        emit(taken[0], await judge.score_prompt(tasks[taken[0]][2]))

                async def main() -> None:
                    # max_concurrent prompts in flight: the judge batches those waiting.
                    await asyncio.gather(*(score_next() for _ in range(self.max_concurrent)))

                asyncio.run(main())

            return run

        devices = [judge.loaded.device for judge in judges]
        with own_errors():
            for index, result in run_in_threads(
                devices, [body(judge) for judge in judges], on_idle=on_idle
            ):
                collect(*tasks[index], result)

    def _load(self, most: int) -> list[Any]:
        """The judges on at most ``most`` devices (one a task), a copy of the model each
        (``load_on_devices``)."""
        from pipeline.local_judge import LocalJudge
        from pipeline.models import load_on_devices, split_precision

        if not self._judges:
            model = self.spec.partition(":")[2]
            name, dtype = split_precision(model)
            copies = load_on_devices(name, self.devices[:most], dtype=dtype)
            self._judges = [LocalJudge(model, loaded=loaded) for loaded in copies]
        return self._judges


def sharded_judge(
    spec: str, gpus: str | None, device: str | None, max_concurrent: int
) -> ShardedJudge | None:
    """A ``ShardedJudge`` when a local judge runs on several devices, else None."""
    from pipeline.models import fits_one_gpu, split_precision

    if not spec.startswith("local:"):
        return None
    model, dtype = split_precision(spec.partition(":")[2])
    devices = worker_devices(gpus, device, lambda: fits_one_gpu(model, dtype))
    return ShardedJudge(spec, devices, max_concurrent) if devices else None
