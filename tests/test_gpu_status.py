"""The GPU report from a fake NVML module (the real one needs a driver): readings, the job
whose worker holds each GPU (its pid, or a child of it), and the reasons there is none."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from db import Store
from pipeline import gpu_status as gpu_module
from pipeline.gpu_status import gpu_status
from pipeline.jobs import this_host
from tui.widgets.gpu_pane import gpu_text

GIB = 1024**3
REAL_LOAD_NVML = gpu_module.load_nvml


class FakeNvml:
    """The part of pynvml the report reads, for two GPUs."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, processes: dict[int, list[tuple[int, int | None]]], fail_init=False):
        self.processes = processes
        self.fail_init = fail_init
        self.open = 0

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        self.open += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.open -= 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, handle: int):  # noqa: N802
        return SimpleNamespace(used=(40 + handle) * GIB, total=140 * GIB)

    def nvmlDeviceGetUtilizationRates(self, handle: int):  # noqa: N802
        if handle == 1:
            raise RuntimeError("Not Supported")  # MIG: no utilisation
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:  # noqa: N802
        return 61 + 30 * handle

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int):  # noqa: N802
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.processes[handle]]


def test_readings_and_the_jobs_holding_each_gpu(store: Store) -> None:
    job = store.create_job("generate", "paternalism", {"side": "pos"})
    # This test's process stands for the job's worker; its parent is no job's.
    store.update_job(job.id, status="running", pid=os.getpid(), host=this_host())
    fake = FakeNvml({0: [(os.getpid(), 30 * GIB)], 1: [(os.getppid(), None)]})
    report = gpu_status(store, nvml=fake)
    assert fake.open == 0  # NVML shut down after reading
    first, second = report.gpus
    assert (first.name, first.utilization, first.temperature_c) == ("NVIDIA H200", 87, 61)
    assert first.memory_used_mib == 40 * 1024 and first.memory_total_mib == 140 * 1024
    assert first.processes[0].job == job.id and first.processes[0].memory_mib == 30 * 1024
    assert second.utilization is None and second.processes[0].job is None
    lines = gpu_text(report).plain.splitlines()
    assert lines[0] == f"GPU0 NVIDIA H200 · 87% busy · 40.0/140 GiB · 61°C · job {job.id}"
    assert lines[1].startswith("GPU1 NVIDIA H200 · ? busy · 41.0/140 GiB · 91°C · pid ")


def test_a_child_of_a_worker_counts_as_its_job(store: Store, monkeypatch) -> None:
    job = store.create_job("judge", "paternalism", {"judge": "local:m"})
    store.update_job(job.id, status="running", pid=4242, host=this_host())
    monkeypatch.setattr(gpu_module, "parent_pid", {777: 4242}.get)
    report = gpu_status(store, nvml=FakeNvml({0: [(777, None)], 1: []}))
    assert report.gpus[0].processes[0].job == job.id
    assert gpu_text(report).plain.splitlines()[1].endswith("· idle")


def test_no_library_and_no_gpu_are_one_line(store: Store, monkeypatch) -> None:
    monkeypatch.setattr(gpu_module, "load_nvml", REAL_LOAD_NVML)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    report = gpu_status(store)
    assert report.gpus == [] and "nvidia-ml-py is not installed" in report.note
    assert gpu_text(report).plain == report.note
    failing = gpu_status(store, nvml=FakeNvml({}, fail_init=True))
    assert failing.gpus == [] and failing.note.startswith("no GPU: NVML cannot start")


async def test_the_jobs_screen_shows_the_gpu_pane(db_path: Path, monkeypatch) -> None:
    from tui_helpers import text_of, wait_for

    from tui.app import PersonaApp

    fake = FakeNvml({0: [], 1: []})
    monkeypatch.setattr(gpu_module, "load_nvml", lambda: fake)
    Store(db_path).close()
    app = PersonaApp(db_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        await wait_for(pilot, lambda: "GPU1 NVIDIA H200" in text_of(app, "#gpu-pane"))
        monkeypatch.setattr(gpu_module, "load_nvml", lambda: None)
        await wait_for(pilot, lambda: "not installed" in text_of(app, "#gpu-pane"))


def test_pynvml_is_an_optional_extra() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert not any("nvidia-ml-py" in d for d in pyproject["project"]["dependencies"])
    assert any(
        d.startswith("nvidia-ml-py") for d in pyproject["project"]["optional-dependencies"]["gpu"]
    )


@pytest.fixture(autouse=True)
def _no_real_nvml(monkeypatch) -> None:
    """Tests never read a real GPU, even where one is."""
    monkeypatch.setattr(gpu_module, "load_nvml", lambda: None)
