"""Vectors: per-layer magnitude bars of each kind, the eval-split AUROC per layer with the
recommended layer marked, and the cosine similarity between traits at a chosen layer; a key
starts extraction with the review screen's thresholds, another opens the trait's fine-tuning
shift results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Header, Static

from db import Store
from tui.screens.base import PersonaScreen

BAR = 18


@dataclass
class ReportLoaded(Message):
    report: Any
    cosine: tuple[list[str], Any] | None


@dataclass
class ReportUnavailable(Message):
    reason: str


def short_model(model_id: str) -> str:
    """A model folder's name rather than its whole path (screens are narrow)."""
    return model_id.rstrip("/").rsplit("/", 1)[-1] if model_id.startswith("/") else model_id


def bar(value: float, top: float, width: int = BAR, style: str = "cyan") -> Text:
    filled = 0 if top <= 0 else round(width * max(0.0, value) / top)
    return Text("█" * filled + "·" * (width - filled), style=style)


def bar_width(report: Any, width: int) -> int:
    """Bars as long as ``width`` columns allow beside their numbers (at most BAR): each
    column holds a bar, its value (6 characters) and 2 of padding; the layer column 6."""
    columns = len(report.norms) + (report.separation is not None)
    return max(4, min(BAR, (width - 8) // columns - 8))


def report_table(report: Any, width: int = 200) -> Table:
    table = Table(expand=True, box=None, pad_edge=False)
    table.add_column("layer", justify="right")
    kinds = list(report.norms)
    tops = {k: max(report.norms[k]) or 1.0 for k in kinds}
    size = bar_width(report, width)
    for kind in kinds:
        table.add_column(f"|{kind.replace('_diff', '')}|")
    if report.separation is not None:
        table.add_column("eval AUROC")
    for layer in range(len(report.norms[kinds[0]])):
        mark = "★" if layer == report.recommended_layer else " "
        cells: list[Any] = [Text(f"{mark}{layer}", style="bold" if mark == "★" else "")]
        for kind in kinds:
            value = report.norms[kind][layer]
            cell = bar(value, tops[kind], size)
            cell.append(f" {value:.2f}")
            cells.append(cell)
        if report.separation is not None:
            auc = report.separation[layer].auroc
            cell = bar(auc - 0.5, 0.5, size, style="green" if mark == "★" else "magenta")
            cell.append(f" {auc:.3f}")
            cells.append(cell)
        table.add_row(*cells)
    return table


def cosine_table(names: list[str], matrix: Any, layer: int) -> Table:
    table = Table(title=f"cosine similarity at layer {layer}", box=None)
    table.add_column("")
    for name in names:
        table.add_column(name[:10], justify="right")
    for i, name in enumerate(names):
        table.add_row(name, *(Text(f"{float(matrix[i, j]):+.2f}") for j in range(len(names))))
    return table


class VectorsScreen(PersonaScreen):
    TITLE = "Vectors"
    BINDINGS = [
        Binding("x", "extract", "Extract"),
        # Priority: the scrolling body must not take the arrows the layer is chosen with.
        Binding("left", "layer(-1)", "Layer -", priority=True),
        Binding("right", "layer(1)", "Layer +", priority=True),
        Binding("r", "reload", "Reload"),
        Binding("s", "shift", "Shift"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="vectors-body"):
            yield Static("", id="vectors-summary", markup=False)
            yield Static("", id="vectors-table", markup=False)
            yield Static("", id="vectors-cosine", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.report: Any = None
        self.cosine_layer: int | None = None

    def on_screen_resume(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        trait = getattr(self.app, "trait", None)
        if not trait:
            self.query_one("#vectors-summary", Static).update(
                "no trait selected: press 1, pick a trait, press enter"
            )
            return
        self.load(trait, self.cosine_layer)

    @work(thread=True, exclusive=True, group="vectors-load", exit_on_error=False)
    def load(self, trait: str, layer: int | None) -> None:
        from pipeline.analyze import analyze, trait_cosines

        with Store(self.db_path) as store:
            if not store.vectors(trait=trait, kind="response_avg_diff"):
                # A state, not an error: said in place (the screen is open while jobs run).
                self.post_message(
                    ReportUnavailable(f"'{trait}' has no vectors yet: press x to extract")
                )
                return
            report = analyze(store, trait)
            if layer is None:
                layer = report.default_layer
            names, matrix = trait_cosines(store, report.model, layer)
        cosine = (names, matrix) if len(names) > 1 else None
        self.post_message(ReportLoaded(report, (layer, cosine)))

    def on_report_unavailable(self, message: ReportUnavailable) -> None:
        self.report = None
        self.query_one("#vectors-summary", Static).update(message.reason)
        self.query_one("#vectors-table", Static).update("")
        self.query_one("#vectors-cosine", Static).update("")

    def on_report_loaded(self, message: ReportLoaded) -> None:
        report = self.report = message.report
        layer, cosine = message.cosine
        self.cosine_layer = layer
        summary = Text(f"{report.trait} on {short_model(report.model)}", style="bold")
        record = report.records["response_avg_diff"]
        summary.append(f" · {record.n_pairs} pairs · T {record.threshold} · C {record.coherence}")
        if report.recommended_layer is not None:
            best = report.separation[report.recommended_layer]
            how = report.choice.text() if report.choice else f"eval AUROC {best.auroc:.3f}"
            summary.append(
                f"\nrecommended layer {report.recommended_layer}: {how}, d {best.cohens_d:.2f}",
                style="green",
            )
        if report.steering is not None:
            from pipeline.analyze import steering_text

            summary.append(f"\n{steering_text(report.steering)}", style="green")
        for note in report.notes:
            summary.append(f"\n{note}", style="yellow")
        self.query_one("#vectors-summary", Static).update(summary)
        self.show_table()
        if cosine is None:
            self.query_one("#vectors-cosine", Static).update(
                Text("cosine matrix: only one trait has a vector for this model", style="dim")
            )
        else:
            self.query_one("#vectors-cosine", Static).update(cosine_table(*cosine, layer))

    def show_table(self) -> None:
        if self.report is not None:
            table = report_table(self.report, self.app.size.width - 2)  # the body's padding
            self.query_one("#vectors-table", Static).update(table)

    def on_resize(self) -> None:
        self.show_table()  # the bars follow the terminal's width

    def action_layer(self, step: int) -> None:
        if self.report is None or self.cosine_layer is None:
            return
        top = len(self.report.norms["response_avg_diff"]) - 1
        self.cosine_layer = min(max(self.cosine_layer + step, 0), top)
        self.load(self.report.trait, self.cosine_layer)

    def action_shift(self) -> None:
        """The trait's fine-tuning shift results (``persona shift``), in a modal."""
        from tui.screens.shift_view import ShiftView  # it names this module's short_model

        trait = getattr(self.app, "trait", None)
        if not trait:
            self.notify("no trait selected: press 1, pick a trait, press enter", timeout=4)
            return
        self.app.push_screen(ShiftView(trait))

    def action_extract(self) -> None:
        trait = getattr(self.app, "trait", None)
        if trait:
            self.start_extraction(trait)

    @work(thread=True, group="vectors-extract", exit_on_error=False)
    def start_extraction(self, trait: str) -> None:
        from pipeline import job_processes as workers

        threshold, coherence = self.app.thresholds  # type: ignore[attr-defined]
        with Store(self.db_path) as store:
            job = store.create_job(
                "extract", trait, {"threshold": threshold, "coherence": coherence}
            )
            workers.start_worker(store, job.id)
        self.app.call_from_thread(
            self.notify, f"extracting at T {threshold:g} / C {coherence:g}: job {job.id}"
        )
