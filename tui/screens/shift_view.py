"""The shift view (``s`` on the Vectors screen): the trait's newest finished fine-tuning shift
job as ``persona shift`` prints it: the models with their judged trait and coherence, then per
layer each checkpoint's projected shift (last prompt token, answer average) and Pearson's r
across models, the layer with the largest |r| starred and under the cursor. The layers are a
table that scrolls both ways with its header and layer column kept in view, so any number of
checkpoints and layers reads at 80x24."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Static

from db import Store
from pipeline.shift_report import MODEL_COLUMNS, ShiftOverview, ShiftReport
from tui.screens.base import PersonaModal
from tui.screens.vectors import short_model

STRONGEST = "★"
MODELS_HEADING = Text("models: judged means over the eval questions, no system prompt", "bold")


@dataclass
class ShiftLoaded(Message):
    overview: ShiftOverview


def models_table(report: ShiftReport) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in MODEL_COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right")
    for cells in report.model_rows(short_model):
        table.add_row(*(Text(c) for c in cells))
    return table


def layer_cells(report: ShiftReport) -> list[list[Text]]:
    """Per layer the checkpoints' projected shifts and r, as the table's cells; the strongest
    layer starred and in bold green (the star says it where there is no colour)."""
    strongest = report.strongest_layer
    rows = []
    for layer, cells in enumerate(report.layer_rows()):
        mark = layer == strongest
        style = "bold green" if mark else ""
        first = Text(f"{STRONGEST if mark else ' '}{cells[0]}", style=style, justify="right")
        rows.append([first, *(Text(c, style=style, justify="right") for c in cells[1:])])
    return rows


def title_text(trait: str, report: ShiftReport | None) -> Text:
    text = Text(f"{trait}: fine-tuning shift", style="bold")
    if report is not None:
        text.append(f" · job {report.job_id} · base {short_model(report.base)}", style="dim")
    return text


class ShiftView(PersonaModal[None]):
    BINDINGS = [
        Binding("escape,s", "dismiss", "Close"),
        Binding("r", "reload", "Reload"),
    ]
    KEYS = "arrows, pgup/pgdn, home/end scroll the layers · r reload · esc close"

    def __init__(self, trait: str) -> None:
        super().__init__()
        self.trait = trait

    def compose(self) -> ComposeResult:
        with Vertical(id="shift-box"):
            yield Static(title_text(self.trait, None), id="shift-title")
            yield Static("loading…", id="shift-status", markup=False)
            yield Static(MODELS_HEADING, id="shift-models-title")
            with VerticalScroll(id="shift-models-box"):
                yield Static("", id="shift-models")
            yield Static("", id="shift-layers-title")
            # The layer column and the header stay in view while the layers scroll.
            yield DataTable(id="shift-layers", cursor_type="row", fixed_columns=1)
            yield Static("", id="shift-finding")
            yield Static(Text(self.KEYS, style="dim"), id="shift-keys")

    def on_mount(self) -> None:
        self.query_one("#shift-layers", DataTable).focus()
        self.load()

    def action_reload(self) -> None:
        self.load()

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)

    @work(thread=True, exclusive=True, group="shift-load", exit_on_error=False, name="Load shift")
    def load(self) -> None:
        from pipeline.shift_report import latest_shift

        with Store(self.db_path) as store:
            overview = latest_shift(store, self.trait)
        self.post_message(ShiftLoaded(overview))

    def on_shift_loaded(self, message: ShiftLoaded) -> None:
        report, status = message.overview.report, message.overview.status
        self.query_one("#shift-title", Static).update(title_text(self.trait, report))
        self._show("#shift-status", Text(status, style="yellow") if status else None)
        table = self.query_one("#shift-layers", DataTable)
        table.clear(columns=True)
        table.display = report is not None
        if report is None:
            for part in ("models-title", "models-box", "layers-title", "finding"):
                self.query_one(f"#shift-{part}").display = False
            return
        self.query_one("#shift-models-title").display = True
        self.query_one("#shift-models-box").display = True
        self._show("#shift-models", models_table(report))
        self._show("#shift-layers-title", Text(report.layer_title(), style="bold"))
        for column in report.layer_columns():
            table.add_column(Text(column, justify="right"), key=column)
        table.add_rows(layer_cells(report))
        if report.strongest_layer is not None:
            table.move_cursor(row=report.strongest_layer, animate=False)
        found = report.strongest_layer is not None
        self._show("#shift-finding", Text(report.finding(), style="green" if found else "yellow"))

    def _show(self, selector: str, content: Text | Table | None) -> None:
        """Show ``content`` in the Static, or hide it (None) so it takes no line."""
        static = self.query_one(selector, Static)
        static.update(content or "")
        static.display = content is not None
