"""The GPUs of this host as NVML reports them (nvidia-ml-py, an optional extra): per GPU its
utilisation, memory and temperature, and the processes computing on it, each matched to the
job whose worker it is (a worker's pid is in its job row; a judge's client processes are its
children). Without nvidia-ml-py or without a GPU the report holds no GPU and says why."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db import Store
from pipeline.jobs import this_host

MIB = 1024 * 1024
PARENT_HOPS = 4  # how far up a process's parents to look for a job's worker


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    memory_mib: float | None  # None when the driver does not say
    job: int | None  # the job whose worker this process is (or descends from)


@dataclass(frozen=True)
class GpuStatus:
    index: int
    name: str
    utilization: int | None  # percent of the last sample period the GPU was busy
    memory_used_mib: float
    memory_total_mib: float
    temperature_c: int | None
    processes: list[GpuProcess] = field(default_factory=list)


@dataclass(frozen=True)
class GpuReport:
    gpus: list[GpuStatus]
    note: str = ""  # why there is no GPU to show


def load_nvml() -> Any | None:
    """The ``pynvml`` module of nvidia-ml-py, or None when it is not installed."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def gpu_status(store: Store | None = None, nvml: Any | None = None) -> GpuReport:
    """Every GPU NVML sees; ``store`` names the jobs holding them (running jobs of this
    host). Never raises for a missing library, driver or GPU: the report says so."""
    nvml = nvml or load_nvml()
    if nvml is None:
        return GpuReport([], "no GPU pane: nvidia-ml-py is not installed (pip install '.[gpu]')")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError: no driver, no GPU
        return GpuReport([], f"no GPU: NVML cannot start ({exc})")
    try:
        workers = _worker_pids(store) if store is not None else {}
        gpus = [_one(nvml, index, workers) for index in range(nvml.nvmlDeviceGetCount())]
    except Exception as exc:  # a GPU that fell off the bus, a driver being reloaded
        return GpuReport([], f"no GPU reading: {exc}")
    finally:
        nvml.nvmlShutdown()
    return GpuReport(gpus, "" if gpus else "no GPU: NVML sees none")


def _one(nvml: Any, index: int, workers: dict[int, int]) -> GpuStatus:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    processes = [
        GpuProcess(
            p.pid,
            p.usedGpuMemory / MIB if isinstance(p.usedGpuMemory, int) else None,
            _job_of(p.pid, workers),
        )
        for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    ]
    return GpuStatus(
        index=index,
        name=name.decode() if isinstance(name, bytes) else str(name),
        utilization=_optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        memory_used_mib=memory.used / MIB,
        memory_total_mib=memory.total / MIB,
        temperature_c=_optional(
            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        ),
        processes=processes,
    )


def _optional(read: Any) -> Any:
    """A reading some GPUs do not support (utilisation under MIG, say): None then."""
    try:
        return read()
    except Exception:
        return None


def _worker_pids(store: Store) -> dict[int, int]:
    """pid -> job id for the running jobs whose worker runs on this host."""
    return {
        job.pid: job.id
        for job in store.list_jobs(status="running")
        if job.pid and (job.host is None or job.host == this_host())
    }


def _job_of(pid: int, workers: dict[int, int]) -> int | None:
    for _ in range(PARENT_HOPS + 1):
        if pid in workers:
            return workers[pid]
        pid = parent_pid(pid)
        if pid <= 1:
            return None
    return None


def parent_pid(pid: int) -> int:
    """A process's parent (Linux /proc); 0 when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0
