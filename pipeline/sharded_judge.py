"""A local judge across devices: one worker process a device (``--gpus``,
``pipeline.sharding``), each with its own copy of the judge model scoring its share of the
prompts in batches; this process writes every judgment."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.judge_scores import Judge, JudgeResult
from pipeline.sharding import run_sharded, worker_devices

Task = tuple[int, str, str]  # (response id, metric, prompt)


class ShardedJudge(Judge):
    """Stands for a ``local:`` judge whose model lives in the workers: it carries the spec
    that judgments record and scores whole task lists (``score_all``), not one prompt."""

    def __init__(self, spec: str, devices: Sequence[str], max_concurrent: int) -> None:
        self.spec = spec
        self.devices = list(devices)
        self.max_concurrent = max_concurrent

    async def score_prompt(self, prompt: str) -> JudgeResult:
        raise TypeError("a sharded judge scores task lists in its workers: use score_all")

    def score_all(
        self,
        tasks: Sequence[Task],
        collect: Callable[[int, str, str, JudgeResult], None],
        on_idle: Callable[[], None],
    ) -> None:
        payload = {"model": self.spec.partition(":")[2], "max_concurrent": self.max_concurrent}
        prompts = [prompt for _rid, _metric, prompt in tasks]
        for index, result in run_sharded(
            self.devices, judge_shard, payload, prompts, on_idle=on_idle
        ):
            collect(*tasks[index], result)


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


def judge_shard(device: str, payload: dict, share: Sequence, emit, note: Any) -> None:
    """A worker's part: its prompts through its own ``LocalJudge`` (batched as in one
    process: the prompts waiting when the device frees up are scored together)."""
    from pipeline.local_judge import LocalJudge

    if not share:
        return
    judge = LocalJudge(payload["model"], device=device)

    async def main() -> None:
        limit = asyncio.Semaphore(payload["max_concurrent"])

        async def one(index: int, prompt: str) -> None:
            async with limit:
                result = await judge.score_prompt(prompt)
            emit(index, result)

        await asyncio.gather(*(one(index, prompt) for index, prompt in share))

    asyncio.run(main())
