"""The dashboard's screens driven by keys through Pilot, on copies of a generated database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Select
from tui_helpers import text_of, wait_for

from db import PersonaError, Store
from tui.app import PersonaApp
from tui.screens.form import FormModal
from tui.screens.pair_detail import PairDetail
from tui.screens.trait_editor import TraitEditor


async def test_number_keys_switch_the_five_screens(review_db: Path) -> None:
    app = PersonaApp(review_db)
    async with app.run_test(size=(100, 30)) as pilot:
        for key, title in (
            ("2", "Jobs"),
            ("3", "Review"),
            ("4", "Vectors"),
            ("5", "Monitor"),
            ("1", "Traits"),
        ):
            await pilot.press(key)
            await pilot.pause(0.2)
            assert title == app.screen.TITLE


async def test_traits_select_and_edit_with_inline_validation(review_db: Path) -> None:
    app = PersonaApp(review_db)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.3)
        await pilot.press("down", "down", "down", "down", "enter")
        assert app.trait == "paternalism"
        await pilot.press("t")  # the empty template: invalid until filled
        await pilot.pause(0.2)
        assert isinstance(app.screen, TraitEditor)
        assert "problem(s)" in text_of(app, "#editor-problems")
        assert "instruction pair 1 has an empty 'pos'" in text_of(app, "#editor-problems")
        await pilot.press("ctrl+s")  # refused while invalid
        assert isinstance(app.screen, TraitEditor)
        await pilot.press("escape")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, TraitEditor))
        assert "valid: ctrl+s saves it" in text_of(app, "#editor-problems")
        await pilot.press("escape")
        await pilot.press("n")
        await pilot.pause(0.1)
        assert isinstance(app.screen, FormModal)
        await pilot.press("escape")


async def test_review_counts_follow_the_threshold_and_overrides(review_db: Path) -> None:
    app = PersonaApp(review_db, trait="paternalism")
    async with app.run_test(size=(120, 32)) as pilot:
        await pilot.press("3")
        await wait_for(pilot, lambda: "effective of" in text_of(app, "#review-counts"))
        assert text_of(app, "#review-counts").startswith("38 effective of 40 pairs")
        table = app.screen.query_one("#pairs-table", DataTable)
        assert table.row_count == 40
        threshold = app.screen.query_one("#threshold", Input)
        threshold.value = "85"
        await wait_for(pilot, lambda: text_of(app, "#review-counts").startswith("0 effective"))
        threshold.value = "50"
        await wait_for(pilot, lambda: text_of(app, "#review-counts").startswith("38 effective"))
        table.focus()
        await pilot.press("x")  # exclude the first pair by hand
        await wait_for(pilot, lambda: text_of(app, "#review-counts").startswith("37 effective"))
        assert "excluded by hand 1" in text_of(app, "#review-counts")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PairDetail))
        await wait_for(pilot, lambda: "POS" in text_of(app, "#pair-pos"))
        assert "trait 80.0" in text_of(app, "#pair-pos") or "trait 30.0" in text_of(
            app, "#pair-pos"
        )
        await pilot.press("u", "escape")
        await wait_for(pilot, lambda: text_of(app, "#review-counts").startswith("38 effective"))
    with Store(review_db) as store:
        assert store.overrides("paternalism") == {}


async def test_review_search_is_a_bound_parameter(review_db: Path) -> None:
    with Store(review_db) as store:
        before = len(store.responses())  # the shared fixture grows with other tests
    app = PersonaApp(review_db, trait="paternalism")
    async with app.run_test(size=(120, 32)) as pilot:
        await pilot.press("3")
        await wait_for(pilot, lambda: "effective of" in text_of(app, "#review-counts"))
        table = app.screen.query_one("#pairs-table", DataTable)
        search = app.screen.query_one("#search", Input)
        search.value = "x' OR 1=1; DROP TABLE responses; --"
        await wait_for(pilot, lambda: table.row_count == 0)
        search.value = ""
        await wait_for(pilot, lambda: table.row_count == 40)
        search.value = "%"  # a literal percent sign, not a wildcard
        with Store(review_db) as store:
            literal = sum("%" in q for q in store.get_trait("paternalism").questions[:20])
        assert literal < 20
        await wait_for(pilot, lambda: table.row_count == 2 * literal)
        # The headline counts every pair, whatever the search shows.
        assert "of 40 pairs" in text_of(app, "#review-counts")
    with Store(review_db) as store:
        assert len(store.responses()) == before


async def test_vectors_screen_marks_the_recommended_layer(review_db: Path) -> None:
    app = PersonaApp(review_db, trait="paternalism")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("4")
        await wait_for(pilot, lambda: "recommended layer" in text_of(app, "#vectors-summary"))
        assert "★" in text_of(app, "#vectors-table")
        before = text_of(app, "#vectors-cosine")
        assert "cosine" in before


# ---- jobs as detached workers ---------------------------------------------------------------
def _job(db_path: Path, job_id: int):
    with Store(db_path) as store:
        return store.get_job(job_id)


async def _start_generation(
    app, pilot, tiny_model_dir: Path, n: str, tokens: str, batch: str, side: str = "pos"
):
    await pilot.press("2")
    await pilot.pause(0.2)
    await pilot.press("g")
    await wait_for(pilot, lambda: isinstance(app.screen, FormModal))
    form = app.screen
    for name, value in (
        ("side", None),
        ("model", str(tiny_model_dir)),
        ("n", n),
        ("max_new_tokens", tokens),
        ("batch_size", batch),
    ):
        if value is not None:
            form.query_one(f"#field-{name}", Input).value = value
    form.query_one("#field-side").value = side
    await pilot.press("ctrl+s")


async def test_a_job_started_in_the_tui_runs_to_the_end(tmp_path: Path, tiny_model_dir) -> None:
    db_path = tmp_path / "jobs.db"
    Store(db_path).close()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(120, 32)) as pilot:
        await _start_generation(app, pilot, tiny_model_dir, "1", "4", "8")
        await wait_for(pilot, lambda: _job(db_path, 1).status == "done", timeout=120)
        table = app.screen.query_one("#jobs-table", DataTable)
        await wait_for(pilot, lambda: table.get_cell("1", "progress") == "100%")
        assert "20/20 responses" in text_of(app, "#job-summary")


async def test_both_sides_from_the_tui_run_in_one_process(tmp_path: Path, tiny_model_dir) -> None:
    """``g`` with side ``both`` makes two jobs and starts them as the command line's
    ``generate --side both`` runs them: one worker process (one model load, one queue), not
    two loading the model on the same GPUs. Its lines go to the first job's log; the second
    job's log says so."""
    db_path = tmp_path / "jobs.db"
    Store(db_path).close()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(120, 32)) as pilot:
        await _start_generation(app, pilot, tiny_model_dir, "1", "4", "8", side="both")
        await wait_for(pilot, lambda: _job(db_path, 1).pid is not None, timeout=30)
        await wait_for(pilot, lambda: _job(db_path, 2).pid is not None, timeout=30)
        await wait_for(
            pilot, lambda: {_job(db_path, 1).status, _job(db_path, 2).status} == {"done"},
            timeout=180,
        )  # fmt: skip
    first, second = _job(db_path, 1), _job(db_path, 2)
    assert first.pid == second.pid
    assert {first.params["side"], second.params["side"]} == {"pos", "neg"}
    assert first.done == first.total == second.done == second.total == 20
    logs = tmp_path / "jobs.data" / "logs"
    assert (
        "runs in one process with job 1: its lines are in job-1.log"
        in (logs / "job-2.log").read_text()
    )
    lines = (logs / "job-1.log").read_text()
    assert f"job 1: worker {first.pid} started" in lines
    assert f"job 2: worker {first.pid} started" in lines and "job 2: done" in lines


async def test_quitting_the_tui_leaves_the_job_running(tmp_path: Path, tiny_model_dir) -> None:
    db_path = tmp_path / "jobs.db"
    Store(db_path).close()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(120, 32)) as pilot:
        await _start_generation(app, pilot, tiny_model_dir, "2", "24", "2")
        await wait_for(pilot, lambda: _job(db_path, 1).pid is not None, timeout=30)
    assert _job(db_path, 1).status in ("pending", "running")
    deadline = time.monotonic() + 180
    while _job(db_path, 1).status != "done" and time.monotonic() < deadline:
        time.sleep(0.2)
    job = _job(db_path, 1)
    assert job.status == "done" and job.done == job.total == 40


async def test_cancel_and_resume_by_key(tmp_path: Path, tiny_model_dir) -> None:
    db_path = tmp_path / "jobs.db"
    Store(db_path).close()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(120, 32)) as pilot:
        await _start_generation(app, pilot, tiny_model_dir, "3", "48", "1")
        await wait_for(pilot, lambda: _job(db_path, 1).done >= 2, timeout=120)
        app.screen.query_one("#jobs-table", DataTable).focus()
        await pilot.press("c")
        await wait_for(pilot, lambda: _job(db_path, 1).status == "cancelled", timeout=60)
        await wait_for(pilot, lambda: "cancelled" in text_of(app, "#job-summary"))
        stopped = _job(db_path, 1).done
        assert stopped < 60
        await pilot.press("r")
        await wait_for(pilot, lambda: _job(db_path, 1).status == "done", timeout=180)
    with Store(db_path) as store:
        assert len(store.responses(job=1)) == 60


async def test_a_dead_worker_shows_as_failed_with_its_heartbeat(tmp_path: Path) -> None:
    db_path = tmp_path / "jobs.db"
    with Store(db_path) as store:
        job = store.create_job("generate", "paternalism", {"side": "pos"})
        store.update_job(
            job.id, status="running", pid=2**22 + 12345, heartbeat="2026-01-01T00:00:00.000+00:00"
        )
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(120, 32)) as pilot:
        await pilot.press("2")
        await wait_for(pilot, lambda: _job(db_path, 1).status == "failed")
        await wait_for(pilot, lambda: "worker process died" in text_of(app, "#job-summary"))
        assert "2026-01-01T00:00:00" in _job(db_path, 1).message


async def test_a_trait_created_from_the_template_is_saved(review_db: Path) -> None:
    import json

    from textual.widgets import TextArea

    from db.traits import bundled_traits

    app = PersonaApp(review_db)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.3)
        await pilot.press("t")
        await wait_for(pilot, lambda: isinstance(app.screen, TraitEditor))
        filled = {
            **bundled_traits()[0].to_dict(),
            "name": "from_template",
            "description": "written in the editor",
        }
        app.screen.query_one(TextArea).text = json.dumps(filled)
        await wait_for(pilot, lambda: "valid" in text_of(app, "#editor-problems"))
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, TraitEditor))
        await wait_for(
            pilot,
            lambda: "from_template" in [k.value for k in app.screen.query_one(DataTable).rows],
        )
    with Store(review_db) as store:
        assert store.get_trait("from_template").description == "written in the editor"
        assert store.trait_source("from_template") == "edited"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"name": "x",', "the editor's text is not valid JSON: line 1"),
        ("[" * 100_000 + "]" * 100_000, "nests lists or objects too deeply"),
        ('{"name": ' + "9" * 5000 + "}", "holds a number too long"),
    ],
    ids=["truncated", "too deep", "huge number"],
)
def test_the_editor_lists_unreadable_json_as_a_problem(text: str, problem: str) -> None:
    from tui.screens.trait_editor import problems_of

    trait, problems = problems_of(text)
    assert trait is None and len(problems) == 1
    assert problems[0].startswith("the editor's text ") and problem in problems[0]


def test_the_judge_form_passes_client_processes(db_path: Path) -> None:
    from tui.screens.jobs import start_judging

    values = {"judge": "openai:m", "metrics": "trait", "max_concurrent": "16", "base_url": ""}
    with Store(db_path) as store:
        (job_id,) = start_judging(store, "paternalism", {**values, "processes": "4"})
        assert store.get_job(job_id).params["processes"] == 4
        with pytest.raises(PersonaError, match="--processes must be at least 1"):
            start_judging(store, "paternalism", {**values, "processes": "0"})


async def test_review_keeps_its_place_and_refuses_bad_thresholds(review_db: Path) -> None:
    """An override keeps the cursor on the pair it was set on; a T that is not a number in
    0..100 is shown invalid and not applied; the headline counts ignore the view filter."""
    app = PersonaApp(review_db, trait="paternalism")
    async with app.run_test(size=(120, 32)) as pilot:
        await pilot.press("3")
        await wait_for(pilot, lambda: "effective of" in text_of(app, "#review-counts"))
        table = app.screen.query_one("#pairs-table", DataTable)
        table.focus()
        await pilot.press("down", "down", "down")
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        await pilot.press("x")
        await wait_for(pilot, lambda: "excluded by hand 1" in text_of(app, "#review-counts"))
        await pilot.pause(0.3)
        assert table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value == key
        await pilot.press("u")  # acts on the same pair, not on row 0
        await wait_for(pilot, lambda: "excluded" not in text_of(app, "#review-counts"))
        with Store(review_db) as store:
            assert store.overrides("paternalism") == {}
        threshold = app.screen.query_one("#threshold", Input)
        for bad in ("abc", "150", ""):
            threshold.value = bad
            await wait_for(
                pilot,
                lambda bad=bad: f"T '{bad}' is not a number" in text_of(app, "#review-counts"),
            )
            assert text_of(app, "#review-counts").startswith("38 effective of 40 pairs")
            assert threshold.has_class("-invalid")
        threshold.value = "85"
        await wait_for(pilot, lambda: text_of(app, "#review-counts").startswith("0 effective"))
        app.screen.query_one("#status", Select).value = "effective"
        await pilot.pause(0.5)
        assert text_of(app, "#review-counts").startswith("0 effective of 40 pairs")


def test_run_tui_opens_on_the_trait_with_the_runs_thresholds(
    monkeypatch: pytest.MonkeyPatch, db_path: Path
) -> None:
    """`persona run TRAIT --threshold 0 --coherence 0 --tui`: the dashboard opens on TRAIT and
    Review uses the run's rule, not 50/50 and no trait."""
    import sys
    from types import SimpleNamespace

    import pipeline.run
    import tui.cli
    import tui.cli.output

    opened = {}
    result = SimpleNamespace(extraction=SimpleNamespace(pairs=None), report=None)
    monkeypatch.setattr(pipeline.run, "run_trait", lambda *a, **k: result)
    monkeypatch.setattr(tui.cli.output, "print_pair_counts", lambda pairs: None)
    monkeypatch.setattr(tui.cli.output, "print_report", lambda report: None)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(
        PersonaApp,
        "run",
        lambda self: opened.update(trait=self.trait, thresholds=self.thresholds),
    )
    argv = ["--db", str(db_path), "run", "paternalism", "--threshold", "0", "--coherence", "5"]
    assert tui.cli.main([*argv, "--tui"]) == 0
    assert opened == {"trait": "paternalism", "thresholds": (0.0, 5.0)}


def test_resume_refuses_a_finished_job(db_path: Path) -> None:
    from pipeline.job_processes import start_worker

    with Store(db_path) as store:
        job = store.create_job("generate", "paternalism", {"side": "pos"})
        store.update_job(job.id, status="done")
        with pytest.raises(PersonaError, match=f"job {job.id} is done; there is nothing to resume"):
            start_worker(store, job.id, rerun_done=False)


async def test_review_exports_the_effective_pairs(review_db: Path) -> None:
    app = PersonaApp(review_db, trait="paternalism")
    folder = review_db.parent / "review.data" / "exports" / "paternalism-T50-C50"
    async with app.run_test(size=(120, 32)) as pilot:
        await pilot.press("3")
        await wait_for(pilot, lambda: "effective of" in text_of(app, "#review-counts"))
        app.screen.query_one("#pairs-table", DataTable).focus()
        await pilot.press("e")
        await wait_for(pilot, lambda: (folder / "paternalism_pairs.jsonl").exists())
    lines = (folder / "paternalism_pairs.jsonl").read_text().splitlines()
    assert len(lines) == 38
    import csv

    with (folder / "paternalism_pos.csv").open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 38
