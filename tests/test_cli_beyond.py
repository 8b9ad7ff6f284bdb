"""The commands beyond the seed, through the real command line on the tiny model: `vectors
bake`, `vectors export --format gguf`, `shift` and `steer --cap`. Each writes what it says
(read back and checked against steering), and each bad value is one `error:` line, exit 2,
with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from planted import assert_baked_equals_steered, make_planted_db, planted_vector
from test_errors import assert_error, cli, clone, snapshot

from db import Store
from tui.cli import main

TRAIT = "paternalism"
LAYER = 2


@pytest.fixture(scope="module")
def vector() -> torch.Tensor:
    return planted_vector()


@pytest.fixture(scope="module")
def planted_db(tiny_model_dir: Path, vector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database whose paternalism vector (of the tiny model) is planted, not extracted."""
    return make_planted_db(tmp_path_factory.mktemp("beyond") / "persona.db", tiny_model_dir, vector)


def expect_error(capsys, db: Path, argv: list[object], expected: str) -> None:
    """One `error:` line holding ``expected``, exit 2, the database and its files unchanged."""
    before = snapshot(db)
    assert_error(cli(capsys, "--db", db, *argv), expected)
    assert snapshot(db) == before


# ---- vectors bake -------------------------------------------------------------------------
def test_bake_writes_a_folder_that_equals_steering(
    capsys, planted_db: Path, tiny_model_dir: Path, vector, tmp_path: Path
) -> None:
    out = tmp_path / "baked"
    argv = ["vectors", "bake", TRAIT, "--layer", LAYER, "--coef", "2", "--out", out]
    code, stdout, stderr = cli(capsys, "--db", planted_db, *argv)
    assert code == 0, stderr
    assert f"at layer {LAYER} into {out}" in stdout
    assert "model.layers.1.mlp.down_proj.bias" in stdout and "checked:" in stdout
    assert json.loads((out / "persona_bake.json").read_text())["coef"] == 2.0
    assert_baked_equals_steered(tiny_model_dir, out, vector, LAYER, 2.0)
    unchecked = tmp_path / "unchecked"
    argv = ["vectors", "bake", TRAIT, "--layer", "3", "--coef=-1", "--out", unchecked]
    code, stdout, _ = cli(capsys, "--db", planted_db, *argv, "--no-verify")
    assert code == 0 and "not checked against steering (--no-verify)" in stdout
    assert json.loads((unchecked / "persona_bake.json").read_text())["layer"] == 3


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--layer", "0", "--coef", "1"], "--layer 0 is the embedding output; bake at a block"),
        (["--layer", "4", "--coef", "1"], "--layer must be in 1..3 for this model (got 4)"),
        (["--layer", "2", "--coef", "0"], "--coef must be a non-zero number of size at most"),
        (["--layer", "2", "--coef", "1e9"], "--coef must be a non-zero number of size at most"),
        (["--layer", "2", "--coef", "two"], "argument --coef: 'two' is not a number"),
        (["--layer", "2", "--coef", "1", "--vector", "mean"], "--vector must be one of"),
    ],
)
def test_bake_bad_values(capsys, planted_db: Path, tmp_path: Path, options, expected) -> None:
    out = tmp_path / "baked"
    expect_error(capsys, planted_db, ["vectors", "bake", TRAIT, *options, "--out", out], expected)
    assert not out.exists()


def test_bake_into_a_folder_that_is_not_empty(capsys, planted_db: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("keep me")
    argv = ["vectors", "bake", TRAIT, "--layer", "2", "--coef", "1", "--out", tmp_path]
    expect_error(capsys, planted_db, argv, f"--out {tmp_path} exists and is not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ---- vectors export --format gguf ---------------------------------------------------------
def _directions(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}


def test_export_gguf_reads_back(capsys, planted_db: Path, vector, tmp_path: Path) -> None:
    argv = ["vectors", "export", TRAIT, "--format", "gguf", "--out", tmp_path]
    code, stdout, stderr = cli(capsys, "--db", planted_db, *argv, "--layers", "2-3", "--coef", ".5")
    assert code == 0, stderr
    path = tmp_path / f"{TRAIT}_response_avg_diff.gguf"
    assert f"wrote {path}" in stdout
    fields = {name: f.contents() for name, f in GGUFReader(str(path)).fields.items()}
    assert fields["general.architecture"] == "controlvector"
    assert fields["persona.layers"] == "2,3" and fields["persona.coef"] == "0.5"
    tensors = _directions(path)  # our layer l is llama.cpp's direction.(l-1)
    assert sorted(tensors) == ["direction.1", "direction.2"]
    np.testing.assert_array_equal(tensors["direction.1"], (0.5 * vector[2]).numpy())
    np.testing.assert_array_equal(tensors["direction.2"], (0.5 * vector[3]).numpy())
    # The defaults: the recommended layer (2L/3 = 2 without eval answers), coef 1.
    assert cli(capsys, "--db", planted_db, *argv)[0] == 0
    np.testing.assert_array_equal(_directions(path)["direction.1"], vector[2].numpy())
    assert len(_directions(path)) == 1


def test_export_pt_still_writes_the_original_format(
    capsys, generated: Path, tmp_path: Path
) -> None:
    from pipeline.extract import extract

    db = clone(generated, tmp_path / "db")
    with Store(db) as store:
        extract(store, TRAIT)
    out = tmp_path / "out"
    code, stdout, stderr = cli(capsys, "--db", db, "vectors", "export", TRAIT, "--out", out)
    assert code == 0, stderr
    written = torch.load(out / f"{TRAIT}_response_avg_diff.pt", weights_only=True)
    assert written.shape == (4, 64) and written.dtype == torch.float32
    assert f"{TRAIT}_prompt_last_diff.pt" in stdout and not list(out.glob("*.gguf"))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--layers", "1"], "--layers 1 (block 0's output) has no llama.cpp control-vector slot"),
        (["--layers", "3-4"], "--layers [4] are outside 2..3 for this 3-layer model"),
        (["--layers", "2,2"], "--layers [2, 2] names a layer twice"),
        (["--layers", "x"], "argument --layers: 'x' is not a range like 8-24[:step] or a list"),
        (["--layers", ""], "--layers is empty; give a layer such as 20 or a range 16-24"),
        (["--coef", "0"], "--coef must be a non-zero number of size at most"),
        (["--vector", "mean"], "--vector must be one of response_avg_diff"),
        (["--device", "cpu"], "--device only applies to --format pt"),
    ],
)
def test_export_gguf_bad_values(capsys, planted_db: Path, tmp_path: Path, options, expected):
    argv = ["vectors", "export", TRAIT, "--format", "gguf", "--out", tmp_path, *options]
    expect_error(capsys, planted_db, argv, expected)
    assert not list(tmp_path.iterdir())


def test_gguf_options_without_format_gguf(capsys, planted_db: Path, tmp_path: Path) -> None:
    argv = ["vectors", "export", TRAIT, "--out", tmp_path, "--layers", "2", "--coef", "2"]
    expect_error(capsys, planted_db, argv, "--layers, --coef only apply to --format gguf")
    assert not list(tmp_path.iterdir())


# ---- shift --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(planted_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """Planted fine-tunes, baked by the command line: coef -1.5 and +2 at layer 2."""
    folder = tmp_path_factory.mktemp("checkpoints")
    baked = {}
    for coef in (-1.5, 2.0):
        out = folder / f"baked{coef:+g}"
        argv = ["vectors", "bake", TRAIT, "--layer", LAYER, f"--coef={coef}", "--out", out]
        assert main(["--db", str(planted_db), *map(str, argv), "--no-verify"]) == 0
        baked[coef] = out
    return baked


def test_shift_recovers_a_planted_fine_tune(
    capsys, planted_db: Path, tiny_model_dir: Path, checkpoints, vector, tmp_path: Path
) -> None:
    db = make_planted_db(tmp_path / "shift.db", tiny_model_dir, vector)
    models = [arg for path in checkpoints.values() for arg in ("--model", path)]
    argv = ["shift", TRAIT, *models, "--base", tiny_model_dir]
    argv += ["--judge", f"local:{tiny_model_dir}", "--max-new-tokens", "2"]
    code, stdout, stderr = cli(capsys, "--db", db, *argv)
    assert code == 0, stderr
    with Store(db) as store:
        (job,) = store.list_jobs(kind="shift")
    assert job.status == "done"
    table, correlation = job.stats["table"], job.stats["correlation"]
    norm = float(vector[LAYER].norm())
    layer_table = stdout[stdout.index("projected shift") :].splitlines()
    rows = [[c for c in line.split() if c != "│"] for line in layer_table if "│" in line]
    (row,) = [cells for cells in rows if cells[0] == str(LAYER)]
    for index, coef in enumerate(checkpoints, 1):
        for readout, column in (("prompt_last", 2 * index - 1), ("response_avg", 2 * index)):
            shift = table[index][readout][LAYER]
            assert shift == pytest.approx(coef * norm, rel=1e-4)
            assert row[column] == f"{shift:+.3f}"
    strongest = max(
        (abs(r), layer) for layer, r in enumerate(correlation["prompt_last"]) if r is not None
    )[1]
    r = correlation["prompt_last"][strongest]
    assert f"strongest at layer {strongest}, r = {r:+.2f} (last prompt token)" in stdout
    assert "(base)" in stdout
    # A rerun finds the same job and asks nothing new.
    assert cli(capsys, "--db", db, *argv)[0] == 0
    with Store(db) as store:
        assert [j.id for j in store.list_jobs(kind="shift")] == [job.id]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], "give at least one fine-tuned checkpoint with --model"),
        (["--model", "BASE"], "is also a --model; compare it with others"),
        (["--model", "A", "--model", "A"], "--model names a checkpoint twice"),
        (["--model", "A", "--n-per-question", "0"], "--n-per-question must be in 1..100"),
        (["--model", "A", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--model", "A", "--temperature=-1"], "--temperature must be >= 0"),
        (["--model", "A", "--judge", "magic"], "--judge 'magic' must be KIND:MODEL"),
        (["--model", "A", "--vector", "mean"], "--vector must be one of"),
        (["--model", "A", "--seed=-1"], "argument --seed: must be between 0 and"),
    ],
)
def test_shift_bad_values(capsys, planted_db: Path, tiny_model_dir: Path, options, expected):
    replace = {"BASE": str(tiny_model_dir), "A": "checkpoint-a"}
    options = [replace.get(o, o) for o in options]
    argv = ["shift", TRAIT, *options, "--base", tiny_model_dir, "--judge-base-url", "http://x"]
    expect_error(capsys, planted_db, argv, expected)


def test_shift_of_a_trait_without_a_vector(capsys, tmp_path: Path, tiny_model_dir) -> None:
    db = tmp_path / "empty.db"
    Store(db).close()
    argv = ["shift", TRAIT, "--model", "a", "--base", tiny_model_dir, "--judge", "local:x"]
    expect_error(capsys, db, argv, f"trait '{TRAIT}' has no response_avg_diff vector")


# ---- steer --cap --------------------------------------------------------------------------
def test_steer_cap(capsys, planted_db: Path) -> None:
    argv = ["steer", TRAIT, "--layer", LAYER, "--prompt", "Hi", "--max-new-tokens", "4"]
    code, stdout, stderr = cli(capsys, "--db", planted_db, *argv, "--cap", "0.5")
    assert code == 0, stderr
    assert "unsteered" in stdout and f"capped at 0.5 at layer {LAYER}" in stdout
    assert "coef" not in stdout  # a cap alone adds no coefficient
    code, stdout, _ = cli(capsys, "--db", planted_db, *argv, "--cap", "0.5", "--coef", "3")
    assert code == 0 and "capped at 0.5" in stdout and f"coef +3 at layer {LAYER}" in stdout
    expect_error(
        capsys, planted_db, [*argv, "--cap", "nan"], "--cap must be a finite projection value"
    )
    expect_error(capsys, planted_db, [*argv, "--cap", "high"], "argument --cap: invalid float")


# ---- options whose defaults live in the step's dataclass ---------------------------------
@pytest.mark.parametrize(
    ("argv", "params", "fields"),
    [
        (["shift"], "ShiftParams", ("n_per_question", "max_new_tokens", "judge", "seed")),
        (["vectors", "bake"], "BakeParams", ("vector",)),
        (["vectors", "export"], "GgufExportParams", ("coef", "vector")),
    ],
)
def test_help_shows_the_dataclass_defaults(capsys, argv, params, fields) -> None:
    import dataclasses

    from pipeline.bake import BakeParams
    from pipeline.gguf_export import GgufExportParams
    from pipeline.shift import ShiftParams

    step = {"ShiftParams": ShiftParams, "BakeParams": BakeParams}.get(params, GgufExportParams)
    assert main([*argv, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    defaults = {f.name: f.default for f in dataclasses.fields(step)}
    for field in fields:
        shown = f"{defaults[field]:g}" if isinstance(defaults[field], float) else defaults[field]
        assert f"--{field.replace('_', '-')}" in text and f"(default {shown})" in text
