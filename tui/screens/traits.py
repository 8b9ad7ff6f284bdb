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
    ("pairs", "pairs"),
    ("vectors", "vectors"),
    ("source", "source"),
)
POLL_SECONDS = 2.0


class TraitsScreen(PersonaScreen):
    TITLE = "Traits"
    BINDINGS = [
        Binding("enter", "select", "Select"),
        Binding("n", "new", "New"),
        Binding("e", "edit", "Edit"),
        Binding("t", "template", "Template"),
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
            pairs = {}
            for summary in summaries:
                counts = store.latest_pair_counts(summary.name)
                if counts is not None:
                    found = counts["counts"]
                    pairs[summary.name] = found.get("effective", 0) + found.get(
                        "included by hand", 0
                    )
        self.post_message(TraitsLoaded(summaries, pairs))

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
                    "pairs": message.pairs.get(name, ""),
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

    def highlighted(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def action_select(self) -> None:
        name = self.highlighted()
        if name:
            self.app.trait = name
            self.notify(f"working on {name}: 2 jobs, 3 review, 4 vectors, 5 monitor")

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_select()

    def action_new(self) -> None:
        from pipeline.author import DEFAULT_AUTHOR
        from tui.screens.form import Field, FormModal

        fields = [
            Field("name", "name (lowercase, e.g. sycophancy)"),
            Field("description", "what the trait means"),
            Field("author", "author model", DEFAULT_AUTHOR),
        ]

        def submitted(values: dict[str, str] | None) -> None:
            if values is not None:
                self.author(values)

        note = "An LLM writes the pairs, questions and judge prompt (a job: watch it on screen 2)."
        self.app.push_screen(FormModal("New trait", fields, note), submitted)

    @work(thread=True, group="traits-author", exit_on_error=False)
    def author(self, values: dict[str, str]) -> None:
        from pipeline import job_processes
        from pipeline.author import AuthorParams, create_author_job

        params = AuthorParams(
            name=values["name"], description=values["description"], author=values["author"]
        )
        with Store(self.db_path) as store:
            job_id = create_author_job(store, params)
            job_processes.start_worker(store, job_id)
        self.app.call_from_thread(self.notify, f"authoring {params.name}: job {job_id}")

    def action_edit(self) -> None:
        name = self.highlighted()
        if name:
            self.open_editor(name)

    @work(thread=True, group="traits-edit", exit_on_error=False)
    def open_editor(self, name: str) -> None:
        with Store(self.db_path) as store:
            data = store.get_trait(name).to_dict()
        self.app.call_from_thread(self._edit, data)

    def action_template(self) -> None:
        from db.traits import empty_template

        self._edit(empty_template("new_trait", "what it means"))

    def _edit(self, data: dict) -> None:
        from tui.screens.trait_editor import TraitEditor

        def saved(trait) -> None:
            if trait is not None:
                self.save_trait(trait)

        self.app.push_screen(TraitEditor(data), saved)

    @work(thread=True, group="traits-save", exit_on_error=False)
    def save_trait(self, trait) -> None:
        with Store(self.db_path) as store:
            store.save_trait(trait, source="edited")
        self.app.call_from_thread(self.action_refresh)
        self.app.call_from_thread(self.notify, f"saved {trait.name}")

    def action_cursor_down(self) -> None:
        self.query_one(DataTable).action_cursor_down()

    def action_cursor_up(self) -> None:
        self.query_one(DataTable).action_cursor_up()
