"""Review: the selected trait's pos/neg pairs with scores and the filter's verdict, paged
from SQL; threshold and coherence inputs recount the effective pairs live; filters by status
and question text; enter opens the pair view (``tui.screens.pair_detail``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import DataTable, Footer, Header, Input, Label, Select, Static

from db import PersonaError, Store
from db.store import PairQuery
from pipeline.filter import DEFAULT_FILTER
from tui.screens.base import PersonaScreen
from tui.screens.pair_detail import PairDetail
from tui.validators import FilterValue

PAGE = 200
COLUMNS = (
    ("q", "q"),
    ("i", "i"),
    ("s", "s"),
    ("pos", "pos T"),
    ("neg", "neg T"),
    ("pc", "pos C"),
    ("nc", "neg C"),
    ("reason", "reason"),
    ("question", "question"),
)


@dataclass
class PairsLoaded(Message):
    rows: list[dict[str, Any]]
    offset: int
    source: dict[str, Any]  # pos_job, neg_job, judge


@dataclass
class PairsUnavailable(Message):
    """Nothing to review yet (no generations, or none judged): said in place, not a modal,
    since the screen is often open while those jobs run."""

    reason: str


@dataclass
class CountsLoaded(Message):
    counts: dict[str, int]


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


class ReviewScreen(PersonaScreen):
    TITLE = "Review"
    AUTO_FOCUS = "#pairs-table"
    BINDINGS = [
        Binding("enter", "open", "Open pair"),
        Binding("i", "include", "Include"),
        Binding("x", "exclude", "Exclude"),
        Binding("u", "clear", "Clear"),
        Binding("slash", "search", "Search"),
        Binding("f", "cycle_status", "Filter"),
        Binding("r", "reload", "Reload", show=False),  # it reloads by itself; ? lists it
        Binding("e", "export", "Export"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="review-controls"):
            yield Label("T")
            yield Input(
                f"{DEFAULT_FILTER.threshold:g}",
                id="threshold",
                classes="number",
                validators=[FilterValue("threshold")],
            )
            yield Label("C")
            yield Input(
                f"{DEFAULT_FILTER.coherence:g}",
                id="coherence",
                classes="number",
                validators=[FilterValue("coherence")],
            )
            yield Select(
                [("all", "all"), ("effective", "effective"), ("filtered", "filtered")],
                value="all",
                allow_blank=False,
                id="status",
            )
            yield Input(placeholder="search questions", id="search")
        yield Static("", id="review-counts", markup=False)
        table: DataTable[Any] = DataTable(id="pairs-table", cursor_type="row", zebra_stripes=True)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Footer()

    def on_mount(self) -> None:
        threshold, coherence = self.app.thresholds  # type: ignore[attr-defined]
        self.query_one("#threshold", Input).value = f"{threshold:g}"
        self.query_one("#coherence", Input).value = f"{coherence:g}"
        self.applied = {"threshold": threshold, "coherence": coherence}
        self.source: dict[str, Any] | None = None
        self.exhausted = False
        self.keep_row: str | None = None  # the pair the cursor returns to after a reload
        self.query_one(DataTable).focus()

    def on_screen_resume(self) -> None:
        self.reload()  # also on first show: the trait may have changed meanwhile

    # ---- queries ---------------------------------------------------------------------------
    def filters(self) -> dict[str, Any]:
        """The view's filters. A T or C that is not a number in 0..100 is shown invalid (the
        input's validator) and not applied: the last valid value stays in force."""

        def number(widget_id: str) -> float:
            widget = self.query_one(f"#{widget_id}", Input)
            if widget.validate(widget.value).is_valid:
                self.applied[widget_id] = float(widget.value)
            return self.applied[widget_id]

        return {
            "threshold": number("threshold"),
            "coherence": number("coherence"),
            "status": self.query_one("#status", Select).value,
            "search": self.query_one("#search", Input).value.strip(),
        }

    def invalid_inputs(self) -> list[str]:
        return [
            f"{label} '{widget.value}' is not a number from 0 to 100 (still {self.applied[key]:g})"
            for key, label in (("threshold", "T"), ("coherence", "C"))
            if not (widget := self.query_one(f"#{key}", Input)).validate(widget.value).is_valid
        ]

    def reload(self) -> None:
        trait = getattr(self.app, "trait", None)
        if not trait:
            self.query_one("#review-counts", Static).update(
                "no trait selected: press 1, pick a trait, press enter"
            )
            return
        self.exhausted = False
        table = self.query_one(DataTable)
        if table.row_count:
            self.keep_row = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        filters = self.filters()
        self.app.thresholds = (filters["threshold"], filters["coherence"])
        self.load_page(trait, filters, 0)

    @work(thread=True, exclusive=True, group="review-page", exit_on_error=False)
    def load_page(self, trait: str, filters: dict[str, Any], offset: int) -> None:
        from pipeline.filter import generation_jobs

        with Store(self.db_path) as store:
            try:
                pos_job, neg_job = generation_jobs(store, trait, "extract")
            except PersonaError as exc:
                self.post_message(PairsUnavailable(str(exc)))
                return
            judges = store.judges_of([pos_job, neg_job])
            if not judges:
                reason = f"the responses of '{trait}' are not judged yet (jobs: screen 2)"
                self.post_message(PairsUnavailable(reason))
                return
            source = {"trait": trait, "pos_job": pos_job, "neg_job": neg_job, "judge": judges[0]}
            query = PairQuery(**source, **filters)
            rows = store.pair_rows(query, offset=offset, limit=PAGE)
        self.post_message(PairsLoaded(rows, offset, source))
        if offset == 0:
            # The page paints first; the recount follows, over every pair whatever the view
            # shows (the headline must not change with the status filter or the search).
            self.load_counts(replace(query, status="all", search=""))

    @work(thread=True, exclusive=True, group="review-counts", exit_on_error=False)
    def load_counts(self, query: PairQuery) -> None:
        with Store(self.db_path) as store:
            counts = store.pair_reason_counts(query)
        self.post_message(CountsLoaded(counts))

    def on_pairs_unavailable(self, message: PairsUnavailable) -> None:
        self.source = None
        self.exhausted = True
        self.query_one(DataTable).clear()
        self.query_one("#review-counts", Static).update(message.reason)

    def on_counts_loaded(self, message: CountsLoaded) -> None:
        self.show_counts(message.counts)

    def on_pairs_loaded(self, message: PairsLoaded) -> None:
        self.source = message.source
        table = self.query_one(DataTable)
        with self.app.batch_update():
            if message.offset == 0:
                table.clear()
            for row in message.rows:
                table.add_row(
                    row["question"],
                    row["instruction"],
                    row["sample"],
                    _score(row["pos_trait"]),
                    _score(row["neg_trait"]),
                    _score(row["pos_coherence"]),
                    _score(row["neg_coherence"]),
                    row["reason"],
                    row["question_text"][:60],
                    key=str(row["pos_id"]),
                )
        self.rows_meta = getattr(self, "rows_meta", {}) if message.offset else {}
        for row in message.rows:
            self.rows_meta[str(row["pos_id"])] = row
        self.exhausted = len(message.rows) < PAGE
        if message.offset == 0 and self.keep_row is not None:
            # Back to the pair the user acted on (include/exclude/clear, a recount), not row 0.
            if self.keep_row in self.rows_meta:
                table.move_cursor(row=table.get_row_index(self.keep_row))
            self.keep_row = None

    def show_counts(self, counts: dict[str, int]) -> None:
        effective = counts.get("effective", 0) + counts.get("included by hand", 0)
        total = sum(counts.values())
        text = Text(f"{effective} effective of {total} pairs", style="bold")
        for problem in self.invalid_inputs():
            text.append(f"  {problem}", style="red")
        rest = [f"{k} {v}" for k, v in sorted(counts.items()) if k != "effective" and v]
        if rest:
            text.append("  ·  " + ", ".join(rest))
        if self.source:
            text.append(f"  ·  judge {self.source['judge']}", style="dim")
        self.query_one("#review-counts", Static).update(text)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        table = self.query_one(DataTable)
        if not self.exhausted and event.cursor_row >= table.row_count - 1 and table.row_count:
            self.exhausted = True  # until the next page arrives
            trait = getattr(self.app, "trait", None)
            if trait:
                self.load_page(trait, self.filters(), table.row_count)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id in ("threshold", "coherence", "search"):
            self.reload()

    def on_select_changed(self, _event: Select.Changed) -> None:
        self.reload()

    # ---- actions ---------------------------------------------------------------------------
    def current(self) -> dict[str, Any] | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return getattr(self, "rows_meta", {}).get(key)

    def action_reload(self) -> None:
        self.reload()

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_cycle_status(self) -> None:
        select = self.query_one("#status", Select)
        order = ["all", "effective", "filtered"]
        select.value = order[(order.index(select.value) + 1) % len(order)]

    def action_include(self) -> None:
        self.set_override(True)

    def action_exclude(self) -> None:
        self.set_override(False)

    def action_clear(self) -> None:
        self.set_override(None)

    def set_override(self, include: bool | None) -> None:
        row = self.current()
        trait = getattr(self.app, "trait", None)
        if row is not None and trait:
            self.write_override(
                trait, (row["question"], row["instruction"], row["sample"]), include
            )

    @work(thread=True, group="review-override", exit_on_error=False)
    def write_override(self, trait: str, key: tuple[int, int, int], include: bool | None) -> None:
        with Store(self.db_path) as store:
            store.set_override(trait, key, include, note="set in the review screen")
        self.app.call_from_thread(self.reload)

    def action_export(self) -> None:
        trait = getattr(self.app, "trait", None)
        if trait:
            filters = self.filters()
            self.export_pairs(trait, filters["threshold"], filters["coherence"])

    @work(thread=True, group="review-export", exit_on_error=False, name="Export pairs")
    def export_pairs(self, trait: str, threshold: float, coherence: float) -> None:
        """The effective pairs at the screen's T and C, as the CLI's `pairs export` writes
        them, into the data folder's exports/."""
        from pipeline.pair_export import export_pairs

        with Store(self.db_path) as store:
            folder = store.data_dir / "exports" / f"{trait}-T{threshold:g}-C{coherence:g}"
            done = export_pairs(store, trait, folder, threshold=threshold, coherence=coherence)
        self.app.call_from_thread(
            self.notify, f"{done.pairs} effective pairs written to {folder}", timeout=8
        )

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_open()  # the table takes enter itself

    def action_open(self) -> None:
        row = self.current()
        if row is not None and self.source is not None:
            self.app.push_screen(PairDetail(row, self.source), lambda _r: self.reload())
