"""One job's rows across several devices: one worker process a device, each with its own copy
of the model, results sent back to the parent, which alone writes the database.

Rows are dealt round-robin over the job's ordered list (sorted by prompt length), so every
worker gets the same mix of short and long prompts. A worker that dies costs only its rows
in flight: the parent has stored every result it received, and a rerun resumes.

``--gpus`` (``parse_gpus``) names the devices: ``all`` (the default: every visible GPU, when
the model fits on one), a comma list of GPU indices (``0,1``; an index given twice runs two
workers on that GPU), or ``cpu`` entries, which run workers on the CPU (for tests, and to
show the sharding on a machine without GPUs).
"""

from __future__ import annotations

import queue as queue_module
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from db import PersonaError

GPUS_ALL = "all"
MAX_WORKERS = 64
# Seconds between the parent's checks while no result arrives (heartbeat, cancel, deaths).
POLL_SECONDS = 0.5
# A dead worker's last messages may still be in the pipe: read them for this long first.
DRAIN_SECONDS = 2.0

# work(device, payload, items, emit): runs in a worker on its share of ``items`` (index,
# item) and calls ``emit(index, result)`` for each. Module-level, so a spawned process can
# import it.
ShardWork = Callable[..., None]


def parse_gpus(text: str | None) -> str | None:
    """Validate a ``--gpus`` value (``all``, GPU indices or ``cpu``, comma-separated);
    returns it normalised. Which devices exist is checked when the job runs."""
    if text is None:
        return None
    value = text.strip().lower()
    if value == GPUS_ALL:
        return value
    items = [item.strip() for item in value.split(",")]
    if (
        not items
        or len(items) > MAX_WORKERS
        or not all(item == "cpu" or (item.isdigit() and len(item) <= 3) for item in items)
    ):
        raise PersonaError(
            f"--gpus {text!r}: give 'all', GPU indices like 0,1 (at most {MAX_WORKERS}), "
            "or cpu,cpu for CPU workers"
        )
    return ",".join(items)


def worker_devices(
    gpus: str | None, device: str | None, fits_one_gpu: Callable[[], bool]
) -> list[str]:
    """The devices to run workers on; one entry or none means: in this process, as before.
    An explicit ``--device`` keeps the job on it; a model that needs several GPUs keeps
    ``device_map`` sharding in one process."""
    import torch

    if device is not None:
        return []
    count = torch.cuda.device_count()
    if not names_devices(gpus):
        if count < 2 or not fits_one_gpu():
            return []
        return [f"cuda:{index}" for index in range(count)]
    devices = []
    for item in gpus.split(","):
        if item == "cpu":
            devices.append("cpu")
            continue
        if int(item) >= count:
            raise PersonaError(
                f"--gpus {gpus}: GPU {item} is not there (torch sees {count} CUDA GPUs); "
                "list visible GPU indices or leave --gpus out"
            )
        devices.append(f"cuda:{int(item)}")
    if len(devices) > 1 and any(d.startswith("cuda") for d in devices) and not fits_one_gpu():
        raise PersonaError(
            f"--gpus {gpus}: the model does not fit on one GPU, so it is spread over them in "
            "one process; leave --gpus out"
        )
    return devices if len(devices) > 1 else []


def names_devices(gpus: str | None) -> bool:
    """Whether ``--gpus`` names its devices (``0,1``, ``cpu,cpu``), not ``all`` or none."""
    return gpus not in (None, GPUS_ALL)


def first_device(gpus: str | None) -> str | None:
    """The device the first entry of ``--gpus`` names (``1,2`` -> cuda:1), where a model is
    first loaded; None for ``all`` or none given (the default device)."""
    if not names_devices(gpus):
        return None
    first = gpus.split(",")[0]
    return "cpu" if first == "cpu" else f"cuda:{int(first)}"


def single_device(gpus: str | None) -> str | None:
    """The device a one-entry ``--gpus`` names (``--gpus 1`` runs on GPU 1), else None."""
    return None if gpus is not None and "," in gpus else first_device(gpus)


def run_sharded(
    devices: Sequence[str],
    work: ShardWork,
    payload: Any,
    items: Sequence[Any],
    *,
    on_idle: Callable[[], None] = lambda: None,
) -> Iterator[tuple[int, Any]]:
    """Yield (index, result) for every item as the workers produce them. ``on_idle`` runs
    between results (at least every ``POLL_SECONDS``: write, heartbeat, cancel); a worker's
    error or death raises ``PersonaError`` after the others are stopped."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    results = context.Queue()
    shares = [
        [(index, items[index]) for index in range(rank, len(items), len(devices))]
        for rank in range(len(devices))
    ]
    workers = [
        context.Process(
            target=_worker,
            args=(work, rank, device, payload, share, results),
            name=f"persona-shard-{rank}",
            daemon=True,
        )
        for rank, (device, share) in enumerate(zip(devices, shares, strict=True))
    ]
    for worker in workers:
        worker.start()
    finished: set[int] = set()
    try:
        while len(finished) < len(workers):
            try:
                message = results.get(timeout=POLL_SECONDS)
            except queue_module.Empty:
                on_idle()
                message = _last_word_of_a_dead_worker(workers, devices, finished, results)
                if message is None:
                    continue
            kind, rank = message[0], message[1]
            if kind == "item":
                yield message[2], message[3]
                on_idle()
            elif kind == "done":
                finished.add(rank)
            else:  # "error"
                raise PersonaError(message[2])
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=10)


def _last_word_of_a_dead_worker(
    workers: list[Any], devices: Sequence[str], finished: set[int], results
) -> Any:
    """None while every unfinished worker lives; for one that died, the next message still
    in the pipe (its "done" or error may be there), else its death as ``PersonaError``."""
    for rank, worker in enumerate(workers):
        if rank in finished or worker.is_alive():
            continue
        try:
            return results.get(timeout=DRAIN_SECONDS)
        except queue_module.Empty:
            pass
        raise PersonaError(
            f"the worker on {devices[rank]} stopped (exit code {worker.exitcode}) before its "
            "rows were done; rerun the same command to resume (stored rows are kept)"
        )


def _worker(
    work: ShardWork, rank: int, device: str, payload: Any, share: list[tuple[int, Any]], results
) -> None:
    def emit(index: int, result: Any) -> None:
        results.put(("item", rank, index, result))

    try:
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(device)  # the worker's own GPU is its current one
        work(device, payload, share, emit)
    except PersonaError as exc:
        results.put(("error", rank, f"{device}: {exc}"))
    except Exception as exc:  # the parent reports it; the traceback goes to the worker log
        traceback.print_exc()
        results.put(("error", rank, f"the worker on {device} failed: {type(exc).__name__}: {exc}"))
    else:
        results.put(("done", rank))
