"""The shift view (s on Vectors) on a database with a finished shift job written through the
store: the newest job's cells as the CLI prints them, the strongest layer starred and under
the cursor, a line where there is no job, a big table that scrolls at 80x24, the Jobs screen's
row for a shift job, only the 16 standard colours, and a snapshot at 80x24."""

from __future__ import annotations

from pathlib import Path

from planted import make_planted_db, planted_shift_stats, planted_vector, store_shift_job
from rich.style import Style
from textual.widgets import DataTable
from tui_helpers import settle, text_of, wait_for

from db import Store
from pipeline.shift_report import ShiftReport
from tui.app import PersonaApp
from tui.screens.shift_view import STRONGEST, ShiftView
from tui.screens.vectors import VectorsScreen

TRAIT = "paternalism"
LAYER = 2
BASE = "/models/smollm2"
# Judged means that do not line up exactly with the coefficients: a realistic r, below 1.
TRAITS = {BASE: 41.5, "/ft/paternal-sft": 63.0, "/ft/antipaternal-sft": 35.0}
COEFS = {"/ft/paternal-sft": 2.0, "/ft/antipaternal-sft": -1.5}


def shift_db(folder: Path, layers: int = 3, traits: dict | None = None) -> Path:
    """A planted vector of ``layers`` blocks and one finished shift job for it (none when
    ``traits`` is empty)."""
    vector = planted_vector(layers=layers)
    db = make_planted_db(folder / "shift.db", Path(BASE), vector)
    traits = TRAITS if traits is None else traits
    if traits:
        coefs = {model: COEFS.get(model, 0.5 * i) for i, model in enumerate(traits)}
        stats = planted_shift_stats(vector, coefs, traits, LAYER)
        with Store(db) as store:
            store_shift_job(store, TRAIT, BASE, stats)
    return db


async def open_view(pilot, app: PersonaApp) -> DataTable:
    await pilot.press("4")
    await pilot.press("s")
    await wait_for(pilot, lambda: isinstance(app.screen, ShiftView))
    await wait_for(pilot, lambda: "loading" not in text_of(app, "#shift-status"))
    return app.screen.query_one("#shift-layers", DataTable)


async def test_s_shows_the_newest_shift_job_as_the_cli_prints_it(tmp_path: Path) -> None:
    db = shift_db(tmp_path)
    with Store(db) as store:
        (job,) = store.list_jobs(kind="shift")
    report = ShiftReport.from_job(job)
    strongest = report.strongest_layer
    assert strongest is not None and strongest >= LAYER
    app = PersonaApp(db, trait=TRAIT)
    async with app.run_test(size=(80, 24)) as pilot:
        table = await open_view(pilot, app)
        assert f"job {job.id} · base smollm2" in text_of(app, "#shift-title")
        models = text_of(app, "#shift-models")
        for label in ("smollm2 (base)", "paternal-sft", "antipaternal-sft", "63.0", "35.0"):
            assert label in models
        assert [str(column.label) for column in table.columns.values()] == (report.layer_columns())
        rows = report.layer_rows()
        assert table.row_count == len(rows) == 4
        for layer, cells in enumerate(rows):
            shown = [str(cell).strip() for cell in table.get_row_at(layer)]
            star = STRONGEST if layer == strongest else ""
            assert shown == [f"{star}{cells[0]}", *cells[1:]]
        assert table.cursor_row == strongest
        assert f"strongest at layer {strongest}, r = " in text_of(app, "#shift-finding")
        assert not app.screen.query_one("#shift-status").display
        # A newer job, not yet finished: reloading says so above the finished one's table.
        with Store(db) as store:
            running = store_shift_job(store, TRAIT, BASE, None)
        await pilot.press("r")
        await wait_for(pilot, lambda: f"job {running}" in text_of(app, "#shift-status"))
        assert "is running (40%); shown: job" in text_of(app, "#shift-status")
        assert table.row_count == 4
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, VectorsScreen))


async def test_the_key_is_listed_and_no_job_is_said_in_place(tmp_path: Path) -> None:
    app = PersonaApp(shift_db(tmp_path, traits={}), trait=TRAIT)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        keys = {k: b.binding.description for k, b in app.screen.active_bindings.items()}
        assert keys.get("s") == "Shift"  # so the footer and ? list it
        table = await open_view(pilot, app)
        status = text_of(app, "#shift-status")
        assert status == (
            f"no shift job for this trait yet: run persona shift {TRAIT} --model CHECKPOINT "
            "--base BASE"
        )
        assert not table.display and not app.screen.query_one("#shift-finding").display


async def test_a_big_table_scrolls_at_80x24(tmp_path: Path) -> None:
    """30 layers and 4 checkpoints: the table scrolls both ways, the strongest layer (the
    last, where the planted shifts are largest) is in view, the header row stays."""
    traits = {BASE: 40.0, **{f"/ft/sft-{i}": 40.0 + v for i, v in enumerate((9, -7, 4, 2))}}
    app = PersonaApp(shift_db(tmp_path, layers=30, traits=traits), trait=TRAIT)
    async with app.run_test(size=(80, 24)) as pilot:
        table = await open_view(pilot, app)
        await pilot.pause(0.2)
        assert table.row_count == 31 and table.max_scroll_y > 0 and table.max_scroll_x > 0
        assert table.size.height >= 8  # the layers get most of the screen
        strongest = table.cursor_row
        assert table.scroll_y <= strongest < table.scroll_y + table.size.height - 1
        for _ in range(8):
            await pilot.press("right")
        assert table.scroll_x > 0
        await pilot.press("home")
        assert table.scroll_x == 0
        await pilot.press("ctrl+home")
        assert table.cursor_row == 0 and table.scroll_y == 0
        keys = app.screen.query_one("#shift-keys")
        assert keys.region.bottom <= 23  # the key line is not pushed off the screen


async def test_the_jobs_screen_lists_a_shift_job(tmp_path: Path) -> None:
    app = PersonaApp(shift_db(tmp_path), trait=TRAIT)
    async with app.run_test(size=(110, 32)) as pilot:
        await pilot.press("2")
        table = app.screen.query_one("#jobs-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 1)
        row = dict(zip([str(k.value) for k in table.columns], table.get_row_at(0), strict=True))
        assert row["kind"] == "shift" and row["split"] == "eval" and row["trait"] == TRAIT
        assert row["scope"] == "paternal-sft, antipaternal-sft vs smollm2"
        assert row["status"] == "done"


def test_the_view_uses_only_the_16_standard_colours(tmp_path: Path) -> None:
    """Every colour the view sets itself is one of the 16 ANSI ones, so a 16-colour terminal
    shows it as meant (the theme's own colours Textual maps itself); the strongest layer has
    its star where there is no colour at all."""
    from rich.color import ColorType

    from tui.screens.shift_view import MODELS_HEADING, layer_cells, title_text

    with Store(shift_db(tmp_path)) as store:
        report = ShiftReport.from_job(store.list_jobs(kind="shift")[0])
    texts = [cell for row in layer_cells(report) for cell in row]
    texts += [title_text(TRAIT, report), MODELS_HEADING]
    styles = [text.style for text in texts] + [span.style for t in texts for span in t.spans]
    colours = [Style.parse(s).color for s in styles if isinstance(s, str) and s]
    assert colours and all(c is None or c.type is ColorType.STANDARD for c in colours)


def test_shift_view_snapshot_80x24(snap_compare, tmp_path: Path) -> None:
    app = PersonaApp(shift_db(tmp_path), trait=TRAIT)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle(app, ["4", "s"]))
