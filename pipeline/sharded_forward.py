"""The forward pass of extraction (``ForwardMeans``) across devices (``--gpus``): a copy of
the model a device, each reading in its own thread of this process
(``engine_threads.map_on_devices``) the next waiting piece of the rows, the per-response
means handed to this thread. ``open_forward`` picks this or the one-device ``ForwardMeans``;
both give ``iter_means`` and ``loaded`` (tokenizer, model id, path)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from pipeline.sharding import single_device, worker_devices

# Pieces of the rows a device: a device that finishes its piece early takes another.
PIECES_PER_DEVICE = 4


class ShardedForward:
    def __init__(self, models: Sequence[Any]) -> None:
        """``models``: a loaded copy a device (``models.load_on_devices``)."""
        self.models = list(models)
        self.loaded = self.models[0]

    def iter_means(
        self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], tokens_per_batch: int
    ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """([row index], kind -> [1, L+1, d] on the CPU) per row, as the devices finish
        their pieces (each dealt round-robin over the rows: long and short mixed)."""
        from pipeline.engine_threads import map_on_devices, own_errors
        from pipeline.response_means import ForwardMeans

        def read(loaded: Any) -> Any:
            forward = ForwardMeans(loaded)

            def piece(indices: list[int], check: Any) -> list[tuple[int, dict[str, torch.Tensor]]]:
                out = []
                chunks = forward.iter_means([rows[i] for i in indices], tokens_per_batch)
                for chunk, means in chunks:
                    check()  # a stopped caller is seen within one batch
                    for position, local in enumerate(chunk):
                        row = {kind: value[position].float().cpu() for kind, value in means.items()}
                        out.append((indices[local], row))
                return out

            return piece

        count = min(len(rows), PIECES_PER_DEVICE * len(self.models))
        pieces = [list(range(start, len(rows), count)) for start in range(count)]
        devices = [loaded.device for loaded in self.models]
        work = [read(loaded) for loaded in self.models]
        with own_errors():  # e.g. ForwardMeans' out-of-memory message
            for _number, done in map_on_devices(devices, work, pieces):
                for index, means in done:
                    yield [index], {kind: value[None] for kind, value in means.items()}


def open_forward(spec: str, *, device: str | None = None, gpus: str | None = None) -> Any:
    """``ForwardMeans`` on one device, or ``ShardedForward`` over ``gpus``' devices."""
    from pipeline.models import fits_one_gpu, load_model, load_on_devices
    from pipeline.response_means import ForwardMeans

    devices = worker_devices(gpus, device, lambda: fits_one_gpu(spec))
    if devices:
        return ShardedForward(load_on_devices(spec, devices))
    return ForwardMeans(load_model(spec, device=device or single_device(gpus)))
