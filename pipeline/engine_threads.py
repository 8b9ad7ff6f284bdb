"""One queue of work across several devices from one process, a thread a device, while the
calling thread receives the results and does everything else (writes, heartbeat, cancel):
``stream_on_engines`` (generation: an engine a device, each taking the next waiting request
whenever one of its slots frees, ``engine.RequestQueue``) and ``map_on_devices`` (larger
items, such as forward extraction's pieces of rows, each done whole by whichever device is
free).

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
from contextlib import contextmanager
from typing import Any

import torch

from pipeline.engine import DecodeEngine, DecodeRequest, DecodeResult, RequestQueue, SamplingConfig
from vectors.steering import SteeringSpec

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


@contextmanager
def own_errors() -> Iterator[None]:
    """An engine thread's error raised in the caller as itself, not as the ``EngineError``
    around it: for callers that need not know which engine raised it (a caller that does,
    such as generation's out-of-memory message naming that engine's slots, catches
    ``EngineError``)."""
    try:
        yield
    except EngineError as exc:
        raise exc.error from None


# body(emit, check): a device's work in its thread; ``emit(index, result)`` hands a result
# to the caller, ``check()`` raises once the caller stops (call it between pieces of work).
ThreadBody = Callable[[Callable[[int, Any], None], Callable[[], None]], None]


def stream_on_engines(
    engines: Sequence[DecodeEngine],
    slots: Sequence[int],
    requests: Sequence[DecodeRequest],
    sampling: SamplingConfig,
    *,
    on_idle: Callable[[], None] = lambda: None,
    steering: Sequence[SteeringSpec] = (),
) -> Iterator[tuple[int, DecodeResult]]:
    """Yield (request index, result) as the engines finish rows, every request once; engine
    ``i`` holds ``slots[i]`` rows at a time, each steered by ``steering`` (as
    ``DecodeEngine.stream``). ``on_idle`` runs in the calling thread between
    results (at least every ``POLL_SECONDS``). An engine's error stops the others and is
    raised as ``EngineError``; an exception in the caller (``on_idle``'s, or the caller
    closing the iterator) stops every engine at its next host check before it returns."""
    waiting = RequestQueue(range(len(requests)))

    def body(number: int, engine: DecodeEngine) -> ThreadBody:
        def run(emit: Callable[[int, Any], None], check: Callable[[], None]) -> None:
            steps = engine.stream(
                requests,
                sampling,
                lambda _steps: check(),
                slots=slots[number],
                steering=steering,
                queue=waiting,
            )
            for request, result in steps:
                emit(request, result)

        return run

    bodies = [body(number, engine) for number, engine in enumerate(engines)]
    yield from run_in_threads([e.device for e in engines], bodies, on_idle=on_idle)


def map_on_devices(
    devices: Sequence[torch.device],
    work: Sequence[Callable[[Any, Callable[[], None]], Any]],
    items: Sequence[Any],
    *,
    on_idle: Callable[[], None] = lambda: None,
) -> Iterator[tuple[int, Any]]:
    """Yield (item index, ``work[i](item, check)``) for every item once, ``work[i]`` running
    on ``devices[i]`` in its own thread and taking the next waiting item whenever it is free
    (items that each take a while: pieces of a forward extraction's rows). Errors and
    stopping as ``stream_on_engines``: ``check()`` raises once the caller stops, so work that
    takes long calls it as it goes (between its pieces); a device also stops between
    items."""
    waiting = RequestQueue(range(len(items)))

    def body(do: Callable[[Any, Callable[[], None]], Any]) -> ThreadBody:
        def run(emit: Callable[[int, Any], None], check: Callable[[], None]) -> None:
            while taken := waiting.take(1):
                check()
                emit(taken[0], do(items[taken[0]], check))

        return run

    yield from run_in_threads(devices, [body(do) for do in work], on_idle=on_idle)


def run_in_threads(
    devices: Sequence[torch.device],
    bodies: Sequence[ThreadBody],
    *,
    on_idle: Callable[[], None] = lambda: None,
) -> Iterator[tuple[int, Any]]:
    """Run ``bodies[i]`` in its own thread with ``devices[i]`` its current device, yielding
    what they emit in the calling thread; ``on_idle`` runs there between results."""
    results: queue_module.SimpleQueue[tuple[str, int, Any]] = queue_module.SimpleQueue()
    stop = threading.Event()

    def emit(index: int, result: Any) -> None:
        results.put(("item", index, result))

    def check() -> None:
        if stop.is_set():
            raise _Stopped

    def run(number: int, device: torch.device, body: ThreadBody) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the thread's own GPU is its current one
            body(emit, check)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the caller, which raises it
            stop.set()
            results.put(("error", number, exc))
        results.put(("done", number, None))

    threads = [
        threading.Thread(target=run, args=(i, d, b), name=f"persona-device-{i}", daemon=True)
        for i, (d, b) in enumerate(zip(devices, bodies, strict=True))
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
            # A device stops at its next check; one stuck in a failed device does not hold
            # the error back (its thread is a daemon).
            thread.join(timeout=JOIN_SECONDS)
