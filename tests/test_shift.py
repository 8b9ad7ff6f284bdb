"""The fine-tuning shift: a planted fine-tune (a vector baked into the weights) recovers its
own shift, coef * |v| at the baked layer with its sign, on the same tokens as the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from planted import store_vector

from db import PersonaError, Store
from pipeline.bake import BakeParams, bake_vector
from pipeline.jobs import run_job
from pipeline.shift import ShiftParams, correlations, create_shift_job
from pipeline.shift_report import latest_shift
from vectors.analysis import pearson

LAYER = 2


@pytest.fixture(scope="module")
def planted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The base, two baked checkpoints (coef -1.5 and +2 at layer 2) and the vector."""
    torch.manual_seed(21)
    vector = torch.randn(4, 64)
    folder = tmp_path_factory.mktemp("planted")
    checkpoints = {}
    for coef in (-1.5, 2.0):
        out = folder / f"baked{coef:+g}"
        bake_vector(str(tiny_model_dir), vector, BakeParams(layer=LAYER, coef=coef), out)
        checkpoints[coef] = str(out)
    return tiny_model_dir, checkpoints, vector


def test_a_planted_fine_tune_recovers_its_shift(planted, tmp_path) -> None:
    base, checkpoints, vector = planted
    db = tmp_path / "p.db"
    params = ShiftParams(
        models=tuple(checkpoints.values()),
        base=str(base),
        judge=f"local:{base}",
        max_new_tokens=6,
    )
    with Store(db) as store:
        store_vector(store, "paternalism", str(base), vector)
        job_id = create_shift_job(store, "paternalism", params)
        assert create_shift_job(store, "paternalism", params) == job_id  # found again
    run_job(db, job_id)
    with Store(db) as store:
        job = store.get_job(job_id)
        assert job.status == "done" and job.done == job.total
        table = job.stats["table"]
        responses = store.responses(job=job_id)
        shown = latest_shift(store, "paternalism").report  # what the dashboard shows
    assert [row["model"] for row in table] == [str(base), *checkpoints.values()]
    assert len(responses) == 3 * 20 and {r.system_prompt for r in responses} == {""}
    norm = float(vector[LAYER].norm())
    for row, coef in zip(table[1:], checkpoints, strict=True):
        for readout in ("prompt_last", "response_avg"):
            shifts = row[readout]
            assert shifts[0] == pytest.approx(0.0, abs=1e-5)
            assert shifts[1] == pytest.approx(0.0, abs=1e-5)  # before the baked block
            assert shifts[LAYER] == pytest.approx(coef * norm, rel=1e-4)
    assert table[0]["prompt_last"] == [0.0] * 4
    assert all(row["n"] == 20 and row["trait"] is not None for row in table)
    assert shown is not None and shown.job_id == job_id and shown.table == table
    assert shown.layer_rows()[LAYER][1] == f"{table[1]['prompt_last'][LAYER]:+.3f}"
    r = job.stats["correlation"]["prompt_last"][LAYER]
    expected = pearson(
        [row["prompt_last"][LAYER] for row in table], [row["trait"] for row in table]
    )
    assert r is not None and r == pytest.approx(expected)
    before = len(responses)
    run_job(db, job_id)  # a rerun generates, computes and asks nothing new
    with Store(db) as store:
        assert len(store.responses(job=job_id)) == before
        assert store.get_job(job_id).stats["table"] == table


def test_correlation_needs_three_judged_models() -> None:
    row = {"prompt_last": [0.0, 1.0], "response_avg": [0.0, 1.0]}
    table = [{**row, "trait": 10.0}, {**row, "trait": None}]
    assert correlations(table) == {"prompt_last": [None, None], "response_avg": [None, None]}
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828)
    assert pearson([1, 1, 1], [2, 4, 7]) is None


def test_bad_shift_params(planted, tmp_path) -> None:
    base, checkpoints, vector = planted
    one = next(iter(checkpoints.values()))
    bad = [
        (ShiftParams(models=(), base=str(base)), "at least one fine-tuned checkpoint"),
        (ShiftParams(models=(one, one), base=str(base)), "names a checkpoint twice"),
        (ShiftParams(models=(str(base),), base=str(base)), "is also a --model"),
        (ShiftParams(models=(one,), base=str(base), n_per_question=0), "--n-per-question"),
        (ShiftParams(models=(one,), base=str(base), judge="magic"), "--judge"),
    ]
    for params, message in bad:
        with pytest.raises(PersonaError, match=message):
            params.validate()
    with Store(tmp_path / "p.db") as store, pytest.raises(PersonaError, match="has no"):
        create_shift_job(store, "paternalism", ShiftParams(models=(one,), base=str(base)))
