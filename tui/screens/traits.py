"""Traits: the library with its counts, and the highlighted trait's definition."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Header, Static

from db import Store
from tui.messages import TraitLoaded, TraitsLoaded
from tui.screens.base import PersonaScreen
from tui.widgets.trait_view import render_trait

COLUMNS = (
    ("name", "name"),
    ("questions", "Q"),
    ("responses", "responses"),
    ("judged", "judged"),
    ("vectors", "vectors"),
    ("source", "source"),
)
POLL_SECONDS = 2.0


class TraitsScreen(PersonaScreen):
    TITLE = "Traits"
    BINDINGS = [
        Binding("r", "refresh", "Refresh"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        table: DataTable[str] = DataTable(id="traits-table", cursor_type="row", zebra_stripes=True)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        with VerticalScroll(id="trait-detail"):
            yield Static("", id="trait-detail-body", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.action_refresh()
        self.set_interval(POLL_SECONDS, self.action_refresh)

    # ---- reading SQLite off the UI thread ------------------------------------------------
    def action_refresh(self) -> None:
        self.load_traits()

    @work(thread=True, exclusive=True, group="traits-poll", exit_on_error=False)
    def load_traits(self) -> None:
        with Store(self.db_path) as store:
            summaries = store.list_traits()
        self.post_message(TraitsLoaded(summaries))

    @work(thread=True, exclusive=True, group="trait-detail", exit_on_error=False)
    def load_trait(self, name: str) -> None:
        with Store(self.db_path) as store:
            trait = store.get_trait(name)
        self.post_message(TraitLoaded(trait))

    # ---- applying results ----------------------------------------------------------------
    def on_traits_loaded(self, message: TraitsLoaded) -> None:
        table = self.query_one(DataTable)
        wanted = {s.name: s for s in message.summaries}
        with self.app.batch_update():
            for row_key in list(table.rows):
                if row_key.value not in wanted:
                    table.remove_row(row_key)
            for name, s in wanted.items():
                cells = {
                    "name": s.name,
                    "questions": s.n_questions,
                    "responses": s.n_responses,
                    "judged": s.n_judged,
                    "vectors": s.n_vectors,
                    "source": s.source,
                }
                if name in table.rows:
                    for column, value in cells.items():
                        if table.get_cell(name, column) != value:
                            table.update_cell(name, column, value)
                else:
                    table.add_row(*cells.values(), key=name)

    def on_trait_loaded(self, message: TraitLoaded) -> None:
        self.query_one("#trait-detail-body", Static).update(render_trait(message.trait))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self.load_trait(event.row_key.value)

    def action_cursor_down(self) -> None:
        self.query_one(DataTable).action_cursor_down()

    def action_cursor_up(self) -> None:
        self.query_one(DataTable).action_cursor_up()
