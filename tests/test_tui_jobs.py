"""The Jobs screen: newest first, what each job covers, columns that follow the terminal's
width, and r/c on a finished job as a one-line notice rather than an error dialog."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable
from tui_helpers import text_of, wait_for

from db import Store
from db.store import Job
from tui.app import PersonaApp
from tui.screens.error import ErrorModal
from tui.screens.jobs import CELL_PADDING, COLUMNS, JobsScreen, column_widths, job_cells
from tui.widgets.job_pane import job_scope, job_summary


def _job(kind: str, params: dict, message: str = "") -> Job:
    return Job(
        7, kind, "paternalism", params, "done", None, None, 1, 1, message, {}, "", None, None
    )


def test_what_a_job_covers() -> None:
    assert job_scope(_job("generate", {"side": "pos", "split": "eval", "n_per_question": 3}))[
        "scope"
    ].startswith("3 per question")
    judge = {"judge": "openai:m"}
    assert job_scope(_job("judge", judge))["scope"] == "every response · openai:m"
    assert job_scope(_job("judge", {**judge, "job": 4}))["scope"] == "job 4 · openai:m"
    pair = job_scope(_job("judge", {**judge, "responses": [12, 52]}))
    assert pair == {"side": "", "split": "", "scope": "responses 12, 52 · openai:m"}
    assert job_scope(_job("extract", {"threshold": 0, "coherence": 5}))["scope"] == "T 0 · C 5"
    sweep = job_scope(_job("sweep", {"layers": [8, 12, 16], "coefs": [-2, 1.5]}))
    assert sweep["scope"] == "layers 8-16 · coefs -2,1.5"
    shift = job_scope(_job("shift", {"models": ["/ft/a-sft", "org/b"], "base": "/m/smollm2"}))
    assert shift == {"side": "", "split": "eval", "scope": "a-sft, b vs smollm2"}


def test_the_job_pane_shows_each_gpus_peak_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress stats read each used GPU's peak from torch's allocator (a fake torch here:
    no GPU on CI); the pane shows one figure for one GPU and each GPU's for several."""
    import sys
    from types import SimpleNamespace

    from pipeline.jobs import JobProgress, gpu_memory_gb

    peaks = {0: 80.25 * 2**30, 1: 0, 2: 41.5 * 2**30}  # GPU 1 never used by this process
    cuda = SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: len(peaks),
        max_memory_allocated=lambda index: peaks[index],
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert gpu_memory_gb() == {"0": 80.25, "2": 41.5}
    stats = JobProgress(None, 7, total=1).stats()  # type: ignore[arg-type]  # no store read
    assert stats["gpu_mem_gb"] == 80.25 and stats["gpu_mem_gb_by_gpu"] == {"0": 80.25, "2": 41.5}
    peaks[2] = 0
    stats = JobProgress(None, 7, total=1).stats()  # type: ignore[arg-type]
    assert stats["gpu_mem_gb"] == 80.25 and "gpu_mem_gb_by_gpu" not in stats
    several = _job("generate", {"side": "pos"})
    several.stats.update(gpu_mem_gb=80.25, gpu_mem_gb_by_gpu={"0": 80.25, "2": 41.5})
    assert "GPU 0: 80.2, 2: 41.5 GiB" in job_summary(several).plain
    one = _job("generate", {"side": "pos"})
    one.stats.update(gpu_mem_gb=12.0)
    assert "GPU 12.0 GiB" in job_summary(one).plain
    monkeypatch.setitem(sys.modules, "torch", None)  # a judging job that never loaded torch
    assert gpu_memory_gb() == {}


def test_columns_fit_the_terminal_and_grow_with_it() -> None:
    long = "a message long enough to need more room than an 80-column terminal can give it"
    rows = [
        job_cells(_job("generate", {"side": "neg", "split": "extract", "n_per_question": 10})),
        job_cells(_job("judge", {"judge": "openai:gpt-4.1-mini"}, message=long)),
    ]
    for width in (80, 100):
        widths = column_widths(rows, width)
        assert sum(widths.values()) + CELL_PADDING * len(COLUMNS) <= width - 2
        assert widths["status"] == len("status") and widths["kind"] == len("generate")
    wide = column_widths(rows, 200)
    assert wide["message"] >= len(long) and wide["scope"] == max(len(r["scope"]) for r in rows)


async def test_jobs_newest_first_resized_and_finished_jobs_refused_kindly(db_path: Path) -> None:
    with Store(db_path) as store:
        for side in ("pos", "neg"):
            job = store.create_job("generate", "paternalism", {"side": side, "split": "extract"})
            store.update_job(job.id, status="done", message="a finished job " * 8)
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        table = app.screen.query_one("#jobs-table", DataTable)
        await wait_for(pilot, lambda: table.row_count == 2)
        assert [k.value for k in table.rows] == ["2", "1"]
        assert table.get_cell("2", "side") == "neg" and table.get_cell("1", "split") == "extract"
        narrow = table.columns["message"].width
        with Store(db_path) as store:
            store.create_job("judge", "paternalism", {"judge": "openai:m", "responses": [1, 2]})
        await wait_for(pilot, lambda: table.row_count == 3)
        assert [k.value for k in table.rows] == ["3", "2", "1"]  # the new job on top
        assert table.get_cell("3", "scope").startswith("responses 1, 2")
        await pilot.resize_terminal(160, 40)
        await wait_for(pilot, lambda: table.columns["message"].width > narrow)
        table.focus()
        assert table.get_row_index("2") == table.cursor_row  # the cursor stayed on its job
        await wait_for(pilot, lambda: "job 2 " in text_of(app, "#job-summary"))
        await pilot.press("r")
        await wait_for(pilot, lambda: bool(app._notifications))
        notes = [n.message for n in app._notifications]
        assert "job 2 is done; there is nothing to resume" in notes
        await pilot.press("c")
        await wait_for(
            pilot,
            lambda: (
                "job 2 is already done; nothing to cancel"
                in [n.message for n in app._notifications]
            ),
        )
        assert not isinstance(app.screen, ErrorModal)
        with Store(db_path) as store:
            assert store.get_job(2).status == "done"


async def open_form(pilot, key: str) -> dict[str, str]:
    """Press ``key`` on the Jobs screen and wait for its form; the values it opens with."""
    from tui.screens.form import FormModal

    app = pilot.app
    if not isinstance(app.screen, JobsScreen):
        await pilot.press("2")
        await wait_for(pilot, lambda: isinstance(app.screen, JobsScreen))
    await pilot.press(key)
    await wait_for(pilot, lambda: isinstance(app.screen, FormModal))
    return app.screen.values()


async def test_forms_open_with_focus_on_their_first_input(db_path: Path) -> None:
    Store(db_path).close()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(80, 24)) as pilot:
        await open_form(pilot, "J")
        assert app.focused is not None and app.focused.id == "field-judge"
        await pilot.press("end", "x")  # typing lands in the field
        assert app.screen.query_one("#field-judge").value.endswith("x")


async def test_the_sweep_and_extract_forms_open_with_the_steps_defaults(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forms read their defaults from the steps: a grid or a question count changed in
    ``pipeline.sweep`` shows in the form, and T/C are the filter's."""
    from pipeline import sweep
    from pipeline.filter import DEFAULT_FILTER

    monkeypatch.setattr(sweep, "DEFAULT_COEFS", (-3.0, 0.5))
    monkeypatch.setattr(sweep.SweepParams, "n", 7)
    Store(db_path).close()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(80, 24)) as pilot:
        values = await open_form(pilot, "w")
        assert (values["coefs"], values["n"]) == ("-3,0.5", "7")
        await pilot.press("escape")
        values = await open_form(pilot, "x")
        expected = (f"{DEFAULT_FILTER.threshold:g}", f"{DEFAULT_FILTER.coherence:g}")
        assert (values["threshold"], values["coherence"]) == expected


def _workers_started(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The jobs the dashboard starts, recorded instead of started as processes."""
    from pipeline import job_processes

    started: list[int] = []
    monkeypatch.setattr(
        job_processes, "start_worker", lambda store, job_id, **_kw: started.append(job_id)
    )
    return started


async def test_the_generate_and_sweep_forms_choose_gpus_and_compile(
    db_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard offers what the command line does for the local engine: ``--gpus``,
    ``--compile`` and ``--deterministic``. A generation job started from the form carries them;
    a bad GPU list is the step's own one-line error in a dialog, with no job created."""
    from tui.screens.form import FormModal

    started = _workers_started(monkeypatch)
    Store(db_path).close()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(80, 24)) as pilot:
        values = await open_form(pilot, "w")
        assert (values["gpus"], values["compile"], values["deterministic"]) == ("", "no", "no")
        await pilot.press("escape")
        values = await open_form(pilot, "g")
        # all visible, plain
        assert (values["gpus"], values["compile"], values["deterministic"]) == ("", "no", "no")
        form = app.screen
        form.query_one("#field-model").value = str(tiny_model_dir)
        form.query_one("#field-side").value = "pos"
        form.query_one("#field-gpus").value = "cpu,cpu"
        form.query_one("#field-compile").value = "yes"
        form.query_one("#field-deterministic").value = "yes"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: started == [1])
        with Store(db_path) as store:
            params = store.get_job(1).params
        assert (params["gpus"], params["compile"], params["deterministic"]) == (
            "cpu,cpu",
            True,
            True,
        )

        await open_form(pilot, "g")
        assert isinstance(app.screen, FormModal)
        app.screen.query_one("#field-model").value = str(tiny_model_dir)
        app.screen.query_one("#field-gpus").value = "0;1"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        assert "--gpus '0;1': give 'all', GPU indices like 0,1" in text_of(app, "#error-message")
        with Store(db_path) as store:
            assert len(store.list_jobs()) == 1
        assert started == [1]


async def test_the_sweep_form_takes_a_batch_size_and_refuses_a_bad_one(
    extracted_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's one queue takes ``--batch-size`` from the form too (blank: auto, the
    step's default); 0 is the step's one-line error in a dialog, with no job created."""
    from tui_helpers import copy_db

    started = _workers_started(monkeypatch)
    db = copy_db(extracted_db, tmp_path / "sweep.db")
    with Store(db) as store:  # the shared database may hold other tests' sweeps
        before = {job.id for job in store.list_jobs(kind="sweep")}
    app = PersonaApp(db, trait="paternalism")
    async with app.run_test(size=(80, 24)) as pilot:
        values = await open_form(pilot, "w")
        assert values["batch_size"] == ""
        app.screen.query_one("#field-batch_size").value = "0"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
        assert "--batch-size must be at least 1 (got 0)" in text_of(app, "#error-message")
        with Store(db) as store:
            assert {job.id for job in store.list_jobs(kind="sweep")} == before
        await pilot.press("escape")
        await open_form(pilot, "w")
        app.screen.query_one("#field-batch_size").value = "32"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: len(started) == 1)
        with Store(db) as store:
            (job,) = [job for job in store.list_jobs(kind="sweep") if job.id not in before]
            assert job.params["batch_size"] == 32 and started == [job.id]


async def test_the_judge_and_extract_forms_choose_gpus(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--gpus`` for a local judge and for extraction's forward pass, as on the command
    line: an extraction job started from the form carries it; a bad list in either form is
    refused with the one-line error, before any job exists."""
    started = _workers_started(monkeypatch)
    Store(db_path).close()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(80, 24)) as pilot:
        for key in ("J", "x"):
            values = await open_form(pilot, key)
            assert values["gpus"] == ""  # all visible
            app.screen.query_one("#field-gpus").value = "gpu0"
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal))
            assert "--gpus 'gpu0': give 'all'" in text_of(app, "#error-message")
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, JobsScreen))
        with Store(db_path) as store:
            assert store.list_jobs() == []
        await open_form(pilot, "x")
        app.screen.query_one("#field-gpus").value = "1, 0"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: started == [1])
        with Store(db_path) as store:
            assert store.get_job(1).params["gpus"] == "1,0"


@pytest.mark.parametrize("key", ["g", "J", "x", "w"])
async def test_every_form_field_and_the_hint_are_drawn_at_80x24(db_path: Path, key: str) -> None:
    """At 80x24 the fields scroll inside the form's box: tabbing to the last field shows
    it, and the submit hint stays on screen (the fields' area once ran past the box's
    bottom, hiding the last field and the hint)."""
    Store(db_path).close()
    app = PersonaApp(db_path, trait="paternalism")
    async with app.run_test(size=(80, 24)) as pilot:
        await open_form(pilot, key)
        form = app.screen
        for _ in range(len(form.fields) - 1):
            await pilot.press("tab")
        await pilot.pause(0.1)
        assert app.focused is not None and app.focused.id == f"field-{form.fields[-1].name}"
        box = form.query_one("#form-box").region
        fields = form.query_one("#form-fields").region
        for region in (fields, form.query_one("#form-hint").region, app.focused.region):
            assert region.height > 0 and box.contains_region(region), (region, box)
        assert fields.contains_region(app.focused.region)
