"""The GPU pane of the Jobs screen: one line per GPU (utilisation, memory, temperature and
the jobs computing on it), or one line saying why there is none."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from pipeline.gpu_status import GpuReport, GpuStatus

HOT_C = 85  # a temperature worth a colour


def gpu_line(gpu: GpuStatus) -> Text:
    text = Text(f"GPU{gpu.index} ", style="bold")
    text.append(gpu.name)
    busy = "?" if gpu.utilization is None else f"{gpu.utilization}%"
    text.append(f" · {busy} busy · {gpu.memory_used_mib / 1024:.1f}/")
    text.append(f"{gpu.memory_total_mib / 1024:.0f} GiB")
    if gpu.temperature_c is not None:
        hot = gpu.temperature_c >= HOT_C
        text.append(" · ")
        text.append(f"{gpu.temperature_c}°C", style="bold red" if hot else "")
    holders = [
        f"job {p.job}" if p.job is not None else f"pid {p.pid} (no job)" for p in gpu.processes
    ]
    text.append(" · " + (", ".join(dict.fromkeys(holders)) if holders else "idle"), style="dim")
    return text


def gpu_text(report: GpuReport) -> Text:
    if not report.gpus:
        return Text(report.note, style="dim")
    return Text("\n").join(gpu_line(gpu) for gpu in report.gpus)


class GpuPane(Static):
    def show(self, report: GpuReport) -> None:
        self.update(gpu_text(report))
