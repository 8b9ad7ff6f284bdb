from __future__ import annotations

from pathlib import Path

from textual.widgets import DataTable, Static
from tui_helpers import settle, wait_for

from db import Store
from tui.app import PersonaApp
from tui.screens.error import ErrorModal
from tui.screens.traits import TraitsScreen


async def test_traits_screen_lists_the_library_and_shows_the_highlighted_trait(
    db_path: Path,
) -> None:
    Store(db_path).close()
    app = PersonaApp(db_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.3)
        assert isinstance(app.screen, TraitsScreen)
        table = app.screen.query_one(DataTable)
        assert [k.value for k in table.rows] == [
            "alignment_theatre",
            "corrigibility_resistance",
            "deception",
            "manipulativeness",
            "paternalism",
            "power_seeking",
        ]
        detail = app.screen.query_one("#trait-detail-body", Static)
        assert str(detail.render()).startswith("alignment_theatre")
        await pilot.press("j", "down")
        await pilot.pause(0.3)
        assert str(detail.render()).startswith("deception")


async def test_polling_picks_up_changes_by_diff(db_path: Path) -> None:
    Store(db_path).close()
    app = PersonaApp(db_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.3)
        table = app.screen.query_one(DataTable)
        with Store(db_path) as store:  # another process changes the database
            store.delete_trait("deception")
            job = store.create_job("generate", "paternalism", {})
            store.add_responses(
                [
                    {
                        "job": job.id,
                        "trait": "paternalism",
                        "side": "pos",
                        "split": "extract",
                        "question": 0,
                        "instruction": 0,
                        "sample": 0,
                        "question_text": "q",
                        "system_prompt": "s",
                        "prompt_ids": [1],
                        "answer_ids": [2],
                        "answer": "a",
                        "finish_reason": "eos",
                        "model": "m",
                    }
                ]
            )
        await pilot.press("r")
        await pilot.pause(0.3)
        assert "deception" not in [k.value for k in table.rows]
        assert table.get_cell("paternalism", "responses") == 1


async def test_worker_errors_surface_as_a_modal(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 20)
    app = PersonaApp(bad)
    async with app.run_test(size=(100, 30)) as pilot:
        # Waited for, not slept on: the first open of a database also imports sqlite_utils.
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal), timeout=10)
        assert "not a usable persona-studio database" in app.screen.message
        # Every load that was in flight has failed too (into this same modal, not a second
        # one), so none can raise again after escape; the next poll is seconds away.
        await app.workers.wait_for_complete()
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, ErrorModal), timeout=10)
        assert isinstance(app.screen, TraitsScreen)


async def test_help_key_toggles_the_key_panel(db_path: Path) -> None:
    app = PersonaApp(db_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.2)
        await pilot.press("question_mark")
        await pilot.pause(0.1)
        assert app.screen.query("HelpPanel")
        await pilot.press("question_mark")
        await pilot.pause(0.1)
        assert not app.screen.query("HelpPanel")


def test_traits_screen_snapshot(snap_compare, tmp_path: Path) -> None:
    db_path = tmp_path / "snapshot.db"
    Store(db_path).close()

    app = PersonaApp(db_path)
    assert snap_compare(app, terminal_size=(100, 30), run_before=settle(app, []))
