"""One queue of requests across several devices from one process: an engine a device, each
stepping in its own thread and taking the next waiting request whenever one of its slots
frees (``engine.RequestQueue``), while the calling thread receives the results and does
everything else (writes, heartbeat, cancel).

Threads, not worker processes: a fresh process on a GPU host spends about 11 s importing
torch and transformers before it loads a model (``tests/bench/profile_workers.py``, NVIDIA
H200), as long as the seed plan's decode saves; here a second GPU costs only its model's
load. A CUDA-graph step is one launch, and the GIL is released while a device works, so
one process drives the GPUs at their speed. A row's tokens depend only on its prompt and
seed, so which device takes it changes nothing.
"""

from __future__ import annotations

import queue as queue_module
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from pipeline.engine import DecodeEngine, DecodeRequest, DecodeResult, RequestQueue, SamplingConfig

# Seconds between the caller's ``on_idle`` calls while no result arrives.
POLL_SECONDS = 0.5
# Seconds to wait for each engine thread to stop once the caller stops.
JOIN_SECONDS = 60.0


class _Stopped(Exception):
    """Raised inside an engine thread at its next host check once the caller stops."""


class EngineError(Exception):
    """An engine thread's error, raised in the caller with the engine it came from."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.index, self.error = index, error


def stream_on_engines(
    engines: Sequence[DecodeEngine],
    slots: Sequence[int],
    requests: Sequence[DecodeRequest],
    sampling: SamplingConfig,
    *,
    on_idle: Callable[[], None] = lambda: None,
) -> Iterator[tuple[int, DecodeResult]]:
    """Yield (request index, result) as the engines finish rows, every request once; engine
    ``i`` holds ``slots[i]`` rows at a time. ``on_idle`` runs in the calling thread between
    results (at least every ``POLL_SECONDS``). An engine's error stops the others and is
    raised as ``EngineError``; an exception in the caller (``on_idle``'s, or the caller
    closing the iterator) stops every engine at its next host check before it returns."""
    waiting = RequestQueue(range(len(requests)))
    results: queue_module.SimpleQueue[tuple[str, int, Any]] = queue_module.SimpleQueue()
    stop = threading.Event()

    def on_step(_steps: int) -> None:
        if stop.is_set():
            raise _Stopped

    def run(index: int, engine: DecodeEngine) -> None:
        try:
            if engine.device.type == "cuda":
                torch.cuda.set_device(engine.device)  # the thread's own GPU is its current one
            for request, result in engine.stream(
                requests, sampling, on_step, slots=slots[index], queue=waiting
            ):
                results.put(("item", request, result))
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the caller, which raises it
            stop.set()
            results.put(("error", index, exc))
        results.put(("done", index, None))

    threads = [
        threading.Thread(target=run, args=(i, e), name=f"persona-engine-{i}", daemon=True)
        for i, e in enumerate(engines)
    ]
    for thread in threads:
        thread.start()
    running = len(threads)
    try:
        while running:
            try:
                kind, index, value = results.get(timeout=POLL_SECONDS)
            except queue_module.Empty:
                on_idle()
                continue
            if kind == "item":
                yield index, value
                on_idle()
            elif kind == "error":
                raise EngineError(index, value)
            else:
                running -= 1
    finally:
        stop.set()
        for thread in threads:
            # An engine stops at its next host check; one stuck in a failed device does not
            # hold the error back (its thread is a daemon).
            thread.join(timeout=JOIN_SECONDS)
