"""A shift job's results shaped for reading (pipeline/shift_report.py), shared by `persona
shift` and the dashboard: the cells come from the stored table, the strongest layer is the
largest |r|, and the newest finished job is the one shown, with a line on any newer one."""

from __future__ import annotations

import pytest
from planted import planted_shift_stats, planted_vector, store_shift_job

from db import Store
from pipeline.shift_report import ShiftReport, latest_shift

TRAIT = "paternalism"
LAYER = 2
BASE = "/models/tiny-base"
TRAITS = {BASE: 40.0, "/ft/paternal": 62.5, "/ft/antipaternal": 21.0}
COEFS = {"/ft/paternal": 2.0, "/ft/antipaternal": -1.5}


@pytest.fixture()
def stats() -> dict:
    return planted_shift_stats(planted_vector(), COEFS, TRAITS, LAYER)


def test_the_report_cells_read_the_stored_table(store: Store, stats: dict) -> None:
    report = ShiftReport.from_job(store.get_job(store_shift_job(store, TRAIT, BASE, stats)))
    assert report.base == BASE and report.checkpoints == [1, 2] and report.n_layers == 4
    assert report.model_rows(lambda m: m.rsplit("/", 1)[-1]) == [
        ("0", "tiny-base (base)", "20", "40.0", "80.0"),
        ("1", "paternal", "20", "62.5", "81.0"),
        ("2", "antipaternal", "20", "21.0", "82.0"),
    ]
    columns = report.layer_columns()
    assert columns == ["layer", "#1 last", "#1 avg", "#2 last", "#2 avg", "r last", "r avg"]
    rows = report.layer_rows()
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    table, correlation = stats["table"], stats["correlation"]
    for layer, row in enumerate(rows):
        cells = dict(zip(columns, row, strict=True))
        assert cells["#2 avg"] == f"{table[2]['response_avg'][layer]:+.3f}"
        r = correlation["prompt_last"][layer]
        assert cells["r last"] == ("-" if r is None else f"{r:+.2f}")
    assert rows[0][1:5] == ("+0.000",) * 4 and rows[0][5:] == ("-", "-")  # no spread, no r
    strongest = max(
        (abs(r), layer) for layer, r in enumerate(correlation["prompt_last"]) if r is not None
    )[1]
    assert report.strongest_layer == strongest and strongest >= LAYER
    r_last = correlation["prompt_last"][strongest]
    assert (
        f"across 3 models (the base at 0): strongest at layer {strongest}, r = {r_last:+.2f}"
        in (report.finding())
    )


def test_under_three_judged_models_there_is_no_correlation(stats: dict) -> None:
    one = planted_shift_stats(planted_vector(), COEFS, {BASE: 40.0, "/ft/paternal": 60.0}, 2)
    report = ShiftReport(TRAIT, "response_avg_diff", one["table"], one["correlation"])
    assert report.strongest_layer is None
    assert report.finding().startswith("no correlation: it needs 3 judged models")
    assert "2 judged here" in report.finding()


def test_the_newest_finished_job_is_shown(store: Store, stats: dict) -> None:
    none = latest_shift(store, TRAIT)
    assert none.report is None and none.status.startswith("no shift job for this trait yet")
    assert f"persona shift {TRAIT} --model" in none.status
    running = store_shift_job(store, TRAIT, BASE, None)
    only_running = latest_shift(store, TRAIT)
    assert only_running.report is None
    assert only_running.status == (
        f"shift job {running} is running (40%); its table appears when it is done"
    )
    finished = store_shift_job(store, TRAIT, BASE, stats)
    shown = latest_shift(store, TRAIT)
    assert shown.report is not None and shown.report.job_id == finished and shown.status == ""
    newer = store_shift_job(store, TRAIT, BASE, None)
    store.update_job(newer, status="failed", message="CUDA out of memory\ntraceback")
    behind = latest_shift(store, TRAIT)
    assert behind.report is not None and behind.report.job_id == finished
    assert behind.status == (
        f"shift job {newer} failed: CUDA out of memory; shown: job {finished}, the newest finished"
    )
