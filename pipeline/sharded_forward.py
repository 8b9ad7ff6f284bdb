"""The forward pass of extraction (``ForwardMeans``) across devices: one worker process a
device (``--gpus``, ``pipeline.sharding``), each with its own copy of the model, the
per-response means sent back to this process. ``open_forward`` picks this or the one-process
``ForwardMeans``; both give ``iter_means`` and ``loaded`` (tokenizer, model id, path)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.sharding import run_sharded, single_device, worker_devices


@dataclass(frozen=True)
class TokenizerOnly:
    """What callers of a forward read of its model, when the weights live in the workers."""

    tokenizer: Any
    model_id: str
    path: Path


class ShardedForward:
    def __init__(self, spec: str, devices: Sequence[str]) -> None:
        from pipeline.models import load_tokenizer

        tokenizer, resolved = load_tokenizer(spec)
        self.spec = spec
        self.devices = list(devices)
        self.loaded = TokenizerOnly(tokenizer, resolved.model_id, resolved.path)

    def iter_means(
        self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], tokens_per_batch: int
    ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """([row index], kind -> [1, L+1, d]) per row, as the workers finish them."""
        payload = {"model": self.spec, "tokens_per_batch": tokens_per_batch}
        items = [(list(p), list(a)) for p, a in rows]
        for index, means in run_sharded(self.devices, forward_shard, payload, items):
            yield [index], {kind: torch.from_numpy(value)[None] for kind, value in means.items()}


def open_forward(spec: str, *, device: str | None = None, gpus: str | None = None) -> Any:
    """``ForwardMeans`` on one device, or ``ShardedForward`` over ``gpus``' workers."""
    from pipeline.models import fits_one_gpu, load_model
    from pipeline.response_means import ForwardMeans

    devices = worker_devices(gpus, device, lambda: fits_one_gpu(spec))
    if devices:
        return ShardedForward(spec, devices)
    return ForwardMeans(load_model(spec, device=device or single_device(gpus)))


def forward_shard(device: str, payload: dict, share: Sequence, emit, note) -> None:
    """A worker's part (``pipeline.sharding``): the means of its rows."""
    from pipeline.models import load_model
    from pipeline.response_means import ForwardMeans

    if not share:
        return
    forward = ForwardMeans(load_model(payload["model"], device=device))
    rows = [row for _index, row in share]
    for chunk, means in forward.iter_means(rows, payload["tokens_per_batch"]):
        for position, local in enumerate(chunk):
            emit(
                share[local][0],
                {kind: value[position].float().cpu().numpy() for kind, value in means.items()},
            )
